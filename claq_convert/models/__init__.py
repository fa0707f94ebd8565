"""Knowledge about model families (declarative, checked against the module graph) and reading a
Hugging Face checkpoint tensor by tensor."""

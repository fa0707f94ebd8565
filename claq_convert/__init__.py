"""claq-convert: column-level adaptive quantization (CLAQ) of Hugging Face LLMs."""
__version__ = "0.1.0"

"""Running a converted file: the quantized torch modules, the portable Torch decoder, loading a
.claq or .gguf into transformers, and perplexity."""

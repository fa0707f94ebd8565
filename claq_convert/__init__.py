"""claq-convert: column-level adaptive quantization (CLAQ) of Hugging Face LLMs."""
__version__ = "0.1.0"


def __getattr__(name):
    # `load` needs torch and transformers; importing the package (or its NumPy reader) must not.
    if name == "load":
        from .runtime.load import load

        return load
    raise AttributeError(f"module 'claq_convert' has no attribute {name!r}")

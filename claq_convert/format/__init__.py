"""The file formats: the constants (spec), the writer, both readers (.claq and the GGUF extension),
coded codebook levels and the validating summary claq-inspect prints."""

"""The conversion: calibration, the Fisher and sensitivity estimates, the bit allocation and its
budget, GPTQ with per-column codebooks, layer-by-layer quantization, tuning, resumable
checkpoints and the conversion's driver."""

"""Math kernels: Numba K-Means and the GPTQ inner loop with their NumPy twin, shared codebook shapes,
CPU decode and LUT products (Numba, AVX-512 through LLVM IR) and the Triton GPU kernels."""

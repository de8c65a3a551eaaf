"""Fused backends: Triton kernels and the C++/CUDA extension."""

"""Kernels over the paged KV cache: the float32 torch reference and the Triton kernels."""

"""Attention backends: the torch reference (anywhere), flash-attn 2 (CUDA)."""

"""Attention over the paged KV cache: metadata, the backend interface, backends and their kernels."""

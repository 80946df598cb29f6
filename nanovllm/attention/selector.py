"""Picks the attention backend for a device, dtype and KV-cache dtype; never silently the slow one."""
from __future__ import annotations

import logging
import warnings

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.backends.torch_ref import TorchRefBackend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "torch")


def _flash_attn() -> AttentionBackend:
    from nanovllm.attention.backends.flash_attn import FlashAttnBackend
    return FlashAttnBackend()


def select_backend(name: str, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> AttentionBackend:
    """"auto": flash-attn on CUDA with a half dtype, else the torch reference.

    An explicitly named backend that cannot run here is a ValueError. On CUDA, "auto"
    falling back to the torch reference (flash-attn missing) warns once, loudly.
    """
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "flash_attn":
        if device.type != "cuda" or not half:
            raise ValueError(f"attention_backend='flash_attn' needs a CUDA device and float16/bfloat16, "
                             f"got {device} and {dtype}")
        try:
            backend = _flash_attn()
        except ImportError as e:
            raise ValueError(f"attention_backend='flash_attn' but flash-attn does not import ({e}); "
                             "install it with `pip install 'nanovllm[gpu]'`") from e
    elif name == "auto" and device.type == "cuda" and half:
        try:
            backend = _flash_attn()
        except ImportError as e:
            warnings.warn(f"flash-attn does not import ({e}): attention runs on the torch reference backend, "
                          "eagerly and without CUDA graphs, several times slower. Install the fast path with "
                          "`pip install 'nanovllm[gpu]'`.", RuntimeWarning, stacklevel=2)
            backend = TorchRefBackend()
    else:
        backend = TorchRefBackend()
    if kv_cache_dtype not in backend.kv_cache_dtypes:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by the {backend.name} backend "
                         f"(it supports {backend.kv_cache_dtypes})")
    logger.info("attention backend: %s", backend.name)
    return backend

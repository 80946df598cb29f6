"""Picks the attention backend for a device, dtype and KV-cache dtype; never silently the slow one."""
from __future__ import annotations

import logging
import warnings

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.backends.torch_ref import TorchRefBackend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "triton", "torch")
INSTALL_HINT = "install the fast path with `pip install 'nanovllm[gpu]'`"


def _flash_attn() -> AttentionBackend:
    from nanovllm.attention.backends.flash_attn import FlashAttnBackend
    return FlashAttnBackend()


def _triton() -> AttentionBackend:
    from nanovllm.attention.backends.triton import TritonBackend
    return TritonBackend()


def select_backend(name: str, device: torch.device, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> AttentionBackend:
    """"auto": on CUDA with a half dtype our Triton kernels (flash-attn if Triton does not import),
    else the torch reference. Triton at block 16 is the CUDA default because it measured faster
    than flash-attn's 256-token pages on the bench (README, "Performance") and wastes 0.8 % of
    the KV cache instead of 12.5 %.

    An explicitly named backend that cannot run here is a ValueError. On CUDA, "auto"
    falling back to the torch reference warns once, loudly.
    """
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    cuda, half = device.type == "cuda", dtype in (torch.float16, torch.bfloat16)
    if kv_cache_dtype == "fp8" and cuda and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU with FP8 support (compute capability 8.9+, "
                         f"Ada or Hopper); this one is {torch.cuda.get_device_capability(device)}: "
                         "use kv_cache_dtype='auto'")
    if name == "auto" and not (cuda and half):
        name = "torch"
    if name == "auto":
        errors = []
        for make in (_triton, _flash_attn) if kv_cache_dtype == "auto" else (_triton,):
            try:
                return _announce(make())
            except ImportError as e:
                errors.append(str(e))
        warnings.warn(f"no fast attention backend imports ({'; '.join(errors)}): attention runs on the torch "
                      f"reference backend, eagerly and without CUDA graphs, several times slower; {INSTALL_HINT}.",
                      RuntimeWarning, stacklevel=2)
        name = "torch"
    if name in ("flash_attn", "triton") and (not cuda or not half):
        raise ValueError(f"attention_backend={name!r} needs a CUDA device and float16/bfloat16, "
                         f"got {device} and {dtype}")
    if name == "flash_attn" and kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by flash-attn 2: "
                         "use attention_backend='triton' (or 'auto')")
    try:
        backend = {"flash_attn": _flash_attn, "triton": _triton, "torch": TorchRefBackend}[name]()
    except ImportError as e:
        raise ValueError(f"attention_backend={name!r} does not import ({e}); {INSTALL_HINT}") from e
    if kv_cache_dtype not in backend.kv_cache_dtypes:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by the {backend.name} backend "
                         f"(it supports {backend.kv_cache_dtypes})")
    return _announce(backend)


def _announce(backend: AttentionBackend) -> AttentionBackend:
    logger.info("attention backend: %s", backend.name)
    return backend

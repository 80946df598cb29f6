"""Argument checks shared by the Triton kernels over the paged KV cache.

Every check reads shapes, dtypes and strides only (never tensor values), so the entry points stay
free of host syncs and can be captured in CUDA graphs.
"""
from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
HEAD_DIMS = (64, 128)
QUERY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_cache(key_cache: Tensor, value_cache: Tensor, block_size: int | None = None) -> bool:
    """``[num_blocks, block_size, num_kv_heads, head_dim]`` caches with a supported block size and head dim.
    Returns whether the value cache stores each block dim-major (`kv_cache.dim_major`); otherwise it
    has the key cache's strides."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] of one "
            f"dtype, got {key_cache.dtype} {tuple(key_cache.shape)} and {value_cache.dtype} {tuple(value_cache.shape)}"
        )
    block, heads, dim = key_cache.shape[1:]
    v_dim_major = value_cache.stride()[1:] == (1, dim * block, block)
    if key_cache.stride(-1) != 1 or not (value_cache.stride() == key_cache.stride() or v_dim_major):
        raise ValueError(
            f"key_cache needs a contiguous head_dim, and value_cache its strides or dim-major blocks "
            f"([num_kv_heads, head_dim, block_size] each), got {key_cache.stride()} and {value_cache.stride()}"
        )
    if key_cache.dtype not in (*QUERY_DTYPES, FP8_DTYPE):
        raise ValueError(f"cache dtype must be one of {(*QUERY_DTYPES, FP8_DTYPE)}, got {key_cache.dtype}")
    cache_block = key_cache.shape[1]
    if cache_block < 16 or cache_block & (cache_block - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {cache_block}")
    if block_size is not None and block_size != cache_block:
        raise ValueError(f"block_size ({block_size}) != the cache's block size ({cache_block})")
    if key_cache.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {key_cache.shape[3]}")
    return v_dim_major


def check_scales(key_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None) -> bool:
    """Scales are float32 ``[num_kv_heads]`` and given iff the cache is FP8; returns whether it is."""
    fp8 = key_cache.dtype == FP8_DTYPE
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 (float8_e4m3fn) cache needs both k_scale and v_scale")
    if not fp8 and (k_scale is not None or v_scale is not None):
        raise ValueError(f"k_scale/v_scale are only allowed with an fp8 cache, the cache is {key_cache.dtype}")
    num_kv_heads = key_cache.shape[2]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and (scale.shape != (num_kv_heads,) or scale.dtype != torch.float32
                                  or scale.device != key_cache.device):
            raise ValueError(
                f"{name} must be float32 [num_kv_heads={num_kv_heads}] on {key_cache.device}, "
                f"got {scale.dtype} {tuple(scale.shape)} on {scale.device}"
            )
    return fp8


def check_query(query: Tensor, key_cache: Tensor) -> int:
    """``[tokens, num_heads, head_dim]`` query matching the cache; returns the GQA group size."""
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError(f"query must be [tokens, num_heads, head_dim] with a contiguous head_dim, "
                         f"got shape {tuple(query.shape)} strides {query.stride()}")
    if query.dtype not in QUERY_DTYPES:
        raise ValueError(f"query dtype must be one of {QUERY_DTYPES}, got {query.dtype}")
    if key_cache.dtype not in (query.dtype, FP8_DTYPE):
        raise ValueError(f"cache dtype {key_cache.dtype} must be the query's ({query.dtype}) or {FP8_DTYPE}")
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query head_dim ({query.shape[2]}) != cache head_dim ({key_cache.shape[3]})")
    if query.device != key_cache.device:
        raise ValueError(f"query is on {query.device} but the cache is on {key_cache.device}")
    return num_heads // num_kv_heads


def check_int_vector(name: str, tensor: Tensor, length: int) -> None:
    """A 1-D int32 tensor of ``length`` entries."""
    if tensor.shape != (length,) or tensor.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 [{length}], got {tensor.dtype} {tuple(tensor.shape)}")


def check_block_tables(block_tables: Tensor, num_seqs: int) -> None:
    """An int32 ``[num_seqs, max_blocks]`` table with a contiguous last dim."""
    if (block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32
            or block_tables.stride(-1) != 1):
        raise ValueError(f"block_tables must be int32 [num_seqs={num_seqs}, max_blocks] with contiguous rows, "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")


def check_sinks(key_cache: Tensor, value_cache: Tensor, k_sink: Tensor | None, v_sink: Tensor | None) -> int:
    """float16 copies of an FP8 cache's first blocks (`LayerKVCache.k_sink`), each laid out as its cache
    is (one offset addresses both); returns how many blocks they hold (0 without them)."""
    if k_sink is None and v_sink is None:
        return 0
    if k_sink is None or v_sink is None or key_cache.dtype != FP8_DTYPE:
        raise ValueError("k_sink and v_sink go together, with an fp8 cache")
    for name, sink, cache in (("k_sink", k_sink, key_cache), ("v_sink", v_sink, value_cache)):
        if (sink.dtype != torch.float16 or sink.shape[1:] != cache.shape[1:] or sink.stride() != cache.stride()
                or not 0 < sink.shape[0] <= cache.shape[0] or sink.device != cache.device):
            raise ValueError(f"{name} must be float16 [num_sink_blocks, *cache.shape[1:]] with the cache's strides "
                             f"{cache.stride()}, got {sink.dtype} {tuple(sink.shape)} strides {sink.stride()}")
    return k_sink.shape[0]


def check_own_kv(query: Tensor, key_cache: Tensor, new_key: Tensor | None, new_value: Tensor | None,
                 k_offset: Tensor | None) -> bool:
    """The step's own K/V (``[tokens, num_kv_heads, head_dim]``, row for row with the query, contiguous
    head_dim) and the keys' optional float32 ``[num_kv_heads, head_dim]`` offset, with an FP8 cache:
    each query then reads its own token from them (`LayerKVCache`). Returns whether they are given."""
    if new_key is None and new_value is None:
        if k_offset is not None:
            raise ValueError("k_offset goes with new_key/new_value")
        return False
    num_kv_heads, head_dim = key_cache.shape[2:]
    expected = (query.shape[0], num_kv_heads, head_dim)
    if new_key is None or new_value is None or key_cache.dtype != FP8_DTYPE:
        raise ValueError(f"new_key and new_value go together, with an fp8 cache (the cache is {key_cache.dtype})")
    for name, x in (("new_key", new_key), ("new_value", new_value)):
        if tuple(x.shape) != expected or x.stride(-1) != 1 or x.device != query.device:
            raise ValueError(f"{name} must be [tokens, num_kv_heads, head_dim] = {expected} on {query.device} with "
                             f"a contiguous head_dim, got {tuple(x.shape)} strides {x.stride()} on {x.device}")
    if k_offset is not None and (k_offset.shape != (num_kv_heads, head_dim) or k_offset.dtype != torch.float32
                                 or not k_offset.is_contiguous() or k_offset.device != query.device):
        raise ValueError(f"k_offset must be a contiguous float32 [num_kv_heads, head_dim] = [{num_kv_heads}, "
                         f"{head_dim}] tensor on {query.device}, got {k_offset.dtype} {tuple(k_offset.shape)}")
    return True

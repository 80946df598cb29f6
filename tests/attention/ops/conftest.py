"""Run the Triton kernels in Triton's interpreter on machines without CUDA.

``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so it must be set before
the kernel modules are imported; this conftest is loaded before the test modules beside it.
Three gaps of Triton 3.6's interpreter are bridged here (CPU only, GPU runs are untouched):
``range()`` over kernel scalars with numpy >= 2.3, ``tl.dot`` on bfloat16, and float narrowing
(it truncates to bfloat16 and drops the rounding carry into the exponent for fp8), done here by
torch, which rounds to nearest even as the GPU does.
"""
from __future__ import annotations

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import triton.language as tl
    from triton.runtime import interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor
    _create_dot = interpreter.InterpreterBuilder.create_dot

    def _patch_with_scalar_index(tensor, scope) -> None:
        """Scalars are 1-element arrays that ``int()`` refuses for numpy >= 2.3 (1-D, not 0-D)."""
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def _as_float32(handle):
        """bfloat16 is held as its raw uint16 bits; widen the bits to float32 so matmul sees numbers."""
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(bits, tl.float32)

    def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _create_dot(self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)

    _TORCH_FLOATS = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16,
                     tl.float8e4nv: torch.float8_e4m3fn}
    _convert_float = interpreter._convert_float

    def _convert_float_by_torch(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype not in _TORCH_FLOATS or output_dtype not in _TORCH_FLOATS:
            return _convert_float(data, input_dtype, output_dtype, rounding_mode)
        width = lambda dtype: f"uint{dtype.primitive_bitwidth}"  # noqa: E731
        bits = torch.from_numpy(np.ascontiguousarray(data).view(width(input_dtype)).copy())
        out = bits.view(_TORCH_FLOATS[input_dtype]).to(_TORCH_FLOATS[output_dtype])
        return out.view(getattr(torch, width(output_dtype))).numpy()

    interpreter._convert_float = _convert_float_by_torch
    interpreter._patch_lang_tensor = _patch_with_scalar_index
    interpreter.InterpreterBuilder.create_dot = _create_dot_bf16


import pytest  # noqa: E402

from nanovllm.attention.ops.paged_attention_ref import dequantize  # noqa: E402


class PagedKV:
    """Random K/V for sequences of ``lens`` tokens scattered into randomly permuted physical blocks.

    Slots no sequence owns hold NaN and block-table entries past a sequence's last block point at
    other sequences' blocks, so a kernel that reads past a length poisons its output. With
    ``fp8`` the cache is quantized with random per-KV-head scales (``k_scale``/``v_scale``).
    """

    def __init__(self, lens, num_kv_heads, head_dim, block_size, dtype, device, fp8=False, extra_cols=1):
        used = [-(-n // block_size) for n in lens]
        num_blocks = sum(used) + 2
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        keys, values = torch.randn(shape, device=device), torch.randn(shape, device=device)
        physical = torch.randperm(num_blocks, device=device).to(torch.int32)
        cols = max(used, default=0) + extra_cols
        self.block_tables = physical[torch.randint(num_blocks, (len(lens), cols), device=device)]  # padding
        live = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        start = 0
        for i, (n, nb) in enumerate(zip(lens, used)):
            self.block_tables[i, :nb] = physical[start : start + nb]
            live.view(-1)[(physical[start : start + nb].long()[:, None] * block_size
                           + torch.arange(block_size, device=device)).flatten()[:n]] = True
            start += nb
        self.k_scale = self.v_scale = None
        if fp8:
            self.k_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
            self.v_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
            keys = (keys / self.k_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            values = (values / self.v_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            keys, values = keys.to(dtype), values.to(dtype)
        dead = ~live
        keys.view(torch.uint8 if fp8 else keys.dtype)[dead] = 0x7F if fp8 else float("nan")  # 0x7F: fp8 NaN
        values.view(torch.uint8 if fp8 else values.dtype)[dead] = 0x7F if fp8 else float("nan")
        self.key_cache, self.value_cache = keys, values
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.block_size = block_size

    def float_caches(self):
        """The caches as the float32 reference reads them (dequantized when FP8)."""
        return (dequantize(self.key_cache, self.k_scale).float(), dequantize(self.value_cache, self.v_scale).float())


@pytest.fixture
def paged_kv():
    """Builder of :class:`PagedKV` cases."""
    return PagedKV

"""Bridges for Triton's interpreter, which runs the kernels on machines without CUDA.

``conftest.py`` sets ``TRITON_INTERPRET=1`` there (before anything imports triton.language);
the test modules import this module before any kernel module, which repeats it for a direct run.
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


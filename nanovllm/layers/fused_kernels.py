"""Triton kernels for a decoder layer's small elementwise chains on CUDA: RMSNorm (with the residual
add before it), silu(gate) * up and rotary embedding.

Each is one pass over its rows with the roundings of the torch definition it replaces
(`layernorm.py`, `activation.py`, `rotary_embedding.py`: float32 math, the model dtype where HF
rounds to it), and each builds in a fraction of a second. torch.compile fused the same four
functions into the same one kernel each, but compiling them took 14.8 s of a 23.2 s startup on a
fresh H200 machine.

Inputs may be strided views (q and k are slices of the fused QKV output); outputs are contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.utils.pdl import pdl_launch_dependents, pdl_start, pdl_wait, use_pdl


TILE = 2048  # elements per program: rows of a short dim share one, so a 16k-token prefill is not
# 16k x heads programs of 64 elements each (measured: prefill 0.52 -> 0.68 s on the bench)


def _rows_per_program(width: int) -> int:
    return max(1, TILE // width)


# num_rows (the step's tokens) not specialized: its value 1 or a multiple of 16 would build the kernel
# three times over (six with ADD) on a fresh machine, each build ~0.3 s of startup, for a mask's compare
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_xt, stride_xh, stride_rt, num_rows, heads,
                     eps, D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr,
                     PDL: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = token * heads + head
    t, h = rows // heads, rows % heads
    cols = tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
    pdl_start(PDL)
    x = tl.load(x_ptr + (t * stride_xt + h * stride_xh)[:, None] + cols[None, :], mask=mask, other=0.0)
    out_offsets = rows[:, None] * D + cols[None, :]
    if ADD:  # HF adds in the model dtype
        r = tl.load(res_ptr + (t * stride_rt)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + out_offsets, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    normed = (xf * inv_rms[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert x.stride(-1) == 1 and x.dim() in (2, 3) and (residual is None or x.dim() == 2)
    rows = x.unsqueeze(1) if x.dim() == 2 else x  # [tokens, heads, D]
    num_tokens, heads, d = rows.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else None
    if out.numel():
        assert residual is None or residual.stride(-1) == 1
        block = triton.next_power_of_2(d)
        per_program = _rows_per_program(block)
        pdl = use_pdl(x.device)
        _rms_norm_kernel[(triton.cdiv(num_tokens * heads, per_program),)](
            rows, residual if residual is not None else rows, weight, out,
            new_residual if new_residual is not None else out,
            rows.stride(0), rows.stride(1), residual.stride(0) if residual is not None else 0,
            num_tokens * heads, heads, eps, D=d, BLOCK=block, ROWS=per_program, ADD=residual is not None,
            PDL=pdl, launch_pdl=pdl)
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`layernorm.rms_norm` over the last dim of [tokens, D] or [tokens, heads, D]."""
    return _rms_norm(x, weight, eps, None)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`layernorm.add_rms_norm`: (RMSNorm(x + residual), x + residual) for [tokens, D]."""
    return _rms_norm(x, weight, eps, residual)  # type: ignore[return-value]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, I: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pdl_start(PDL)
    mask = cols < I
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + I + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # F.silu rounds to the input dtype
    tl.store(out_ptr + t * I + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`activation.silu_and_mul`: silu(gate) * up for x = [gate | up], [tokens, 2 * I]."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    num_tokens, inner = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inner, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inner))
    if out.numel():
        pdl = use_pdl(x.device)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inner, block))](x, out, x.stride(0), I=inner, BLOCK=block,
                                                                      PDL=pdl, launch_pdl=pdl)
    return out


@triton.jit
def _norm_halves(x1, x2, is_q, cols, q_weight_ptr, k_weight_ptr, eps, HALF: tl.constexpr):
    """RMSNorm of rows held as their two halves [rows, BLOCK] (columns past HALF are 0), q rows with
    q's weight and k rows with k's."""
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)[:, None]
    w_mask = cols[None, :] < HALF
    q_w = tl.load(q_weight_ptr + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
    k_w = tl.load(k_weight_ptr + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
    q_w2 = tl.load(q_weight_ptr + HALF + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
    k_w2 = tl.load(k_weight_ptr + HALF + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
    w1 = tl.where(is_q[:, None], q_w, k_w)
    w2 = tl.where(is_q[:, None], q_w2, k_w2)
    y1 = w1 * (x1f * inv_rms).to(x1.dtype).to(tl.float32)
    y2 = w2 * (x2f * inv_rms).to(x2.dtype).to(tl.float32)
    return y1.to(x1.dtype), y2.to(x2.dtype)


@triton.jit
def _mix_blocks(mix_ptr, cols, HALF: tl.constexpr):
    """The four [HALF, HALF] blocks of a [2 HALF, 2 HALF] matrix, as [BLOCK, BLOCK] tiles padded with zeros."""
    inside = (cols < HALF)[:, None] & (cols < HALF)[None, :]
    top_left = mix_ptr + cols[:, None] * (2 * HALF) + cols[None, :]
    return (tl.load(top_left, mask=inside, other=0.0), tl.load(top_left + HALF, mask=inside, other=0.0),
            tl.load(top_left + 2 * HALF * HALF, mask=inside, other=0.0),
            tl.load(top_left + 2 * HALF * HALF + HALF, mask=inside, other=0.0))


@triton.jit(do_not_specialize=["num_tokens"])  # as _rms_norm_kernel's num_rows
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr, mix_ptr, q_weight_ptr, k_weight_ptr,
                   eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache, num_tokens, q_heads, k_heads,
                   GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                   NORM: tl.constexpr, MIX: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_launch_dependents(PDL)
    cols = tl.arange(0, BLOCK)
    if MIX:  # rows: ROWS tokens of head program_id(1), all rotated by its KV head's matrix
        head = tl.program_id(1)
        t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        h = tl.zeros([ROWS], tl.int32) + head
        live = t < num_tokens
        kv_head = tl.where(head < q_heads, head // GROUP, head - q_heads)
        # written once at calibration, so read before the wait, while the previous kernel finishes
        m11, m12, m21, m22 = _mix_blocks(mix_ptr + kv_head * (4 * HALF * HALF), cols, HALF)
    else:  # rows: token * (q_heads + k_heads) + head
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        t, h = rows // (q_heads + k_heads), rows % (q_heads + k_heads)
        live = rows < num_tokens * (q_heads + k_heads)
    pdl_wait(PDL)
    is_q = h < q_heads
    col_mask = (cols < HALF)[None, :]
    in_q, in_k = (live & is_q)[:, None] & col_mask, (live & ~is_q)[:, None] & col_mask
    q_src = q_ptr + (t * stride_qt + h * stride_qh)[:, None] + cols[None, :]
    k_src = k_ptr + (t * stride_kt + (h - q_heads) * stride_kh)[:, None] + cols[None, :]
    q_dst = q_out_ptr + ((t * q_heads + h) * 2 * HALF)[:, None] + cols[None, :]
    k_dst = k_out_ptr + ((t * k_heads + h - q_heads) * 2 * HALF)[:, None] + cols[None, :]
    x1 = tl.where(is_q[:, None], tl.load(q_src, mask=in_q, other=0.0), tl.load(k_src, mask=in_k, other=0.0))
    x2 = tl.where(is_q[:, None], tl.load(q_src + HALF, mask=in_q, other=0.0),
                  tl.load(k_src + HALF, mask=in_k, other=0.0))
    if NORM:  # Qwen3's per-head RMSNorm before RoPE, with `_rms_norm_kernel`'s roundings
        x1, x2 = _norm_halves(x1, x2, is_q, cols, q_weight_ptr, k_weight_ptr, eps, HALF)
    pos = tl.load(pos_ptr + t, mask=live, other=0)
    cs = (pos * 2 * HALF)[:, None] + cols[None, :]  # both halves of a row hold the same cos (sin)
    cos = tl.load(cos_sin_ptr + cs, mask=live[:, None] & col_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + stride_cache + cs, mask=live[:, None] & col_mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    y1, y2 = x1f * cos - x2f * sin, x2f * cos + x1f * sin
    if MIX:  # [y1 | y2] @ M in M's dtype (float16 for 16-bit models: tf32's mantissa at half the bytes)
        y1, y2 = y1.to(m11.dtype), y2.to(m11.dtype)
        y1, y2 = (tl.dot(y2, m21, tl.dot(y1, m11, input_precision=PRECISION), input_precision=PRECISION),
                  tl.dot(y2, m22, tl.dot(y1, m12, input_precision=PRECISION), input_precision=PRECISION))
    y1, y2 = y1.to(x1.dtype), y2.to(x1.dtype)
    tl.store(q_dst, y1, mask=in_q)
    tl.store(q_dst + HALF, y2, mask=in_q)
    tl.store(k_dst, y1, mask=in_k)
    tl.store(k_dst + HALF, y2, mask=in_k)


# Tokens per program with a mix: 16 (tl.dot's least M), 32 from MIX_MANY_TOKENS on. A program reads its KV head's
# whole matrix, 32 KB in float16 at head dim 128, and 32 rows take 201 registers against 96. On the H200 (call DE,
# Qwen3-0.6B's 16 + 8 heads with their norms, CUDA graphs, us per call; Hadamard = the one shared matrix before):
# 256 tokens 4.5 with 16 rows, 6.1 with 32, Hadamard 5.0; 1,024 tokens 10.9 / 9.6 / 10.3; 16,384 163.6 / 128.5 / 144.9.
MIX_MANY_TOKENS = 1024


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 mix: torch.Tensor | None = None,
                 norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_embedding.apply_rotary` (neox layout): q [tokens, heads, D], k [tokens, kv_heads, D];
    `cos_sin_cache` [2, max_position, D] float32, contiguous; `mix`: None or [kv_heads, D, D], contiguous, float32
    or float16 (q head h takes matrix h // (heads / kv_heads)); `norm`: None or (q's weight [D], k's weight [D],
    eps) of a per-head RMSNorm before RoPE."""
    num_tokens, q_heads, d = q.shape
    k_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.is_contiguous() and d % 2 == 0
    assert mix is None or (mix.is_contiguous() and mix.dtype in (torch.float32, torch.float16)
                           and mix.shape == (k_heads, d, d))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        block = triton.next_power_of_2(d // 2)
        if mix is None:
            per_program = _rows_per_program(block)
            grid = (triton.cdiv(num_tokens * (q_heads + k_heads), per_program),)
        else:  # tl.dot's least M and K are 16
            block, per_program = max(16, block), 32 if num_tokens >= MIX_MANY_TOKENS else 16
            grid = (triton.cdiv(num_tokens, per_program), q_heads + k_heads)
        pdl = use_pdl(q.device)
        warps = 8 if mix is not None and mix.dtype == torch.float32 else 4  # float32 dots spill with 4
        _rotary_kernel[grid](
            q, k, q_out, k_out, positions, cos_sin_cache, cos_sin_cache if mix is None else mix,
            *(norm if norm is not None else (cos_sin_cache, cos_sin_cache, 0.0)), q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), cos_sin_cache.stride(0), num_tokens, q_heads, k_heads,
            GROUP=q_heads // k_heads, HALF=d // 2, BLOCK=block, ROWS=per_program, NORM=norm is not None,
            MIX=mix is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 below bf16's rounding
            PDL=pdl, launch_pdl=pdl, num_warps=warps)
    return q_out, k_out

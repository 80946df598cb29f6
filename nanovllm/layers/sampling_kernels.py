"""Triton kernels of the sampler. Each row of logits is cut into `CHUNKS` chunks, one program each,
so that a batch of a few hundred rows still spreads over every SM (one program per row streamed at
about 1.1 TB/s on the H200, a quarter of its bandwidth); a small per-row kernel then merges the chunks.

`row_pass` reads the logits once. It yields each row's statistics (max and sum of exp of the scaled
logits, the raw logsumexp), a token (the argmax of scaled logit + Gumbel noise over the entries >= the
row's threshold, plain argmax on greedy rows) for the rows it is asked to draw, and, when filtering,
each row's pivot: a lower bound of the row's top-k / top-p / min-p threshold (and of its top
`num_logprobs` logits), taken from the chunks' lane maxima (the largest two of each group of lanes,
a sub-multiset of the row). `gather_candidates` copies the entries at or above the pivot into a small
buffer (a fixed region per chunk, so the order, and every sum over it, is deterministic), and
`select_and_draw` finds the exact threshold there without sorting and draws the filtered rows from the
candidates: every entry the filters keep is one of them, so no third read of the logits is needed. The
rare row whose sets did not fit its candidates is read whole by `exact_rows`, on the device too.
Logprobs asked for are written by the kernels too (`Logprobs`): the drawn token's by the merge or the
select kernel, the top K by the select kernel from the candidates, which then hold the raw logits.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

CHUNKS = 8  # programs per row
BLOCK = 1024  # logits per program per loop step
LANES = CHUNKS * BLOCK  # lane maxima per row: each chunk keeps the top two of BLOCK // 2 lane pairs
PIVOT_ITERS = 18  # bisection steps for a pivot: a lower bound within 2**14 order keys (~0.2 %) is enough
# Which rows `row_pass` draws a token for: none, all, or those with no top-k / top-p / min-p filter.
DRAW_NONE, DRAW_ALL, DRAW_UNFILTERED = 0, 1, 2  # (the kernels compare DRAW with these numbers)
CHUNK_WARPS = 4
GATHER_BLOCK, GATHER_WARPS = 1024, 4  # (4096 with 8 warps: top-k 72 -> 209 us at 256 rows, call AP)
# The noise's two logs use the GPU's approximate log2 (lg2.approx, ~2**-22 relative error): tl.log is a
# libdevice polynomial, and with it the noise, not the read, bounded the draw (125 us at 256 rows on
# the H200, 1.2 TB/s). The interpreter has no fast_logf, and runs tl.log.
FAST_LOG = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _gumbel(index, key, key2):
    """Gumbel noise of token `index` (int32) under the row's 32-bit keys; see sampler.noise_bits."""
    bits = _fmix32(_fmix32(index.to(tl.uint32) + key) ^ key2)
    uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # 23 bits: < 1 exactly
    if FAST_LOG:
        return -libdevice.fast_logf(-libdevice.fast_logf(uniform))
    return -tl.log(-tl.log(uniform))


@triton.jit
def _lowest_argmax(best, best_idx):
    """(the largest of the best scores, the lowest index holding it): ties go to the lowest token, as
    one argmax over the whole row gives them."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, best_idx, 2147483647), 0)


@triton.jit
def _lane_online(m, s, z):
    """Each lane's running (max, sum of exp(. - max)) after one more value z, with one exp: the sum is
    rescaled by exp(m - z) when z is the new max, else grows by exp(z - m). No reduction across lanes
    in the loop, so the loads stream."""
    e = tl.where(z == float("-inf"), 0.0, tl.exp(-tl.abs(z - m)))
    return tl.maximum(m, z), tl.where(z > m, s * e + 1.0, s + e)


@triton.jit
def _merge(ms, ss):
    """(max, sum of exp(. - max)) of several (max, sum) pairs: lanes' or chunks'."""
    m = tl.max(ms, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(ss * tl.exp(ms - safe), 0)


@triton.jit
def _chunk_step(z, r, idx, first, second, s, rm, rs, best, best_idx, draw, greedy, key, key2, offset,
                FILTER: tl.constexpr, SUMS: tl.constexpr, RAW_STATS: tl.constexpr):
    """One tile of `_chunk_kernel`: the lanes' top two (and with SUMS online sums) of the scaled logits
    z, the raw logits' online sums, and the running Gumbel-max draw (column idx is token idx + offset)."""
    if FILTER:
        second = tl.maximum(second, tl.minimum(first, z))
        if SUMS:
            first, s = _lane_online(first, s, z)
        else:
            first = tl.maximum(first, z)
    if RAW_STATS:
        rm, rs = _lane_online(rm, rs, r)
    if draw:
        if greedy:
            score = z
        else:
            score = z + _gumbel(idx + offset, key, key2)
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    return first, second, s, rm, rs, best, best_idx


@triton.jit
def _chunk_kernel(
    x_ptr, x_stride, raw_ptr, raw_stride, V, chunk_len, inv_t_ptr, greedy_ptr, key_ptr,
    top_k_ptr, top_p_ptr, min_p_ptr, part_ptr, best_ptr, best_idx_ptr, lanes_ptr, offset,
    DRAW: tl.constexpr, FILTER: tl.constexpr, SUMS: tl.constexpr, RAW_STATS: tl.constexpr,
    RAW_IS_X: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one row: partial statistics, lane maxima and the chunk's best draw."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    part = row.to(tl.int64) * tl.num_programs(1) + chunk
    row64 = row.to(tl.int64)
    inv_t = tl.load(inv_t_ptr + row)
    lane = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    draw = False
    greedy = False
    key = tl.zeros((), tl.uint32)
    key2 = tl.zeros((), tl.uint32)
    if DRAW != 0:  # DRAW_NONE
        if DRAW == 1:  # DRAW_ALL
            draw = True
        else:  # DRAW_UNFILTERED
            draw = ((tl.load(top_k_ptr + row) >= V) & (tl.load(top_p_ptr + row) >= 1.0)
                    & (tl.load(min_p_ptr + row) <= 0.0))
        greedy = tl.load(greedy_ptr + row) != 0
        key = tl.load(key_ptr + 2 * row).to(tl.uint32)
        key2 = tl.load(key_ptr + 2 * row + 1).to(tl.uint32)
    best = tl.full([BLOCK], neg_inf, tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    first = tl.full([BLOCK], neg_inf, tl.float32)
    second = tl.full([BLOCK], neg_inf, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    rm = tl.full([BLOCK], neg_inf, tl.float32)
    rs = tl.zeros([BLOCK], tl.float32)
    lo = chunk * chunk_len
    hi = tl.minimum(lo + chunk_len, V)
    for start in range(lo, hi, 2 * BLOCK):  # two tiles a step: twice the loads in flight
        idx0 = start + lane
        idx1 = idx0 + BLOCK
        x0 = tl.load(x_ptr + row64 * x_stride + idx0, mask=idx0 < hi, other=neg_inf).to(tl.float32)
        x1 = tl.load(x_ptr + row64 * x_stride + idx1, mask=idx1 < hi, other=neg_inf).to(tl.float32)
        r0 = x0
        r1 = x1
        if RAW_STATS:
            if not RAW_IS_X:
                r0 = tl.load(raw_ptr + row64 * raw_stride + idx0, mask=idx0 < hi, other=neg_inf).to(tl.float32)
                r1 = tl.load(raw_ptr + row64 * raw_stride + idx1, mask=idx1 < hi, other=neg_inf).to(tl.float32)
        first, second, s, rm, rs, best, best_idx = _chunk_step(
            x0 * inv_t, r0, idx0, first, second, s, rm, rs, best, best_idx, draw, greedy, key, key2, offset,
            FILTER, SUMS, RAW_STATS)
        first, second, s, rm, rs, best, best_idx = _chunk_step(
            x1 * inv_t, r1, idx1, first, second, s, rm, rs, best, best_idx, draw, greedy, key, key2, offset,
            FILTER, SUMS, RAW_STATS)
    if DRAW != 0:
        top, token = _lowest_argmax(best, best_idx)
        tl.store(best_ptr + part, top)
        tl.store(best_idx_ptr + part, token)
    if FILTER:
        if SUMS:
            m, total = _merge(first, s)
        else:  # only top-p uses the sum: it stays NaN, so that a use without it shows
            m = tl.max(first, 0)
            total = float("nan")
        tl.store(part_ptr + 4 * part, m)
        tl.store(part_ptr + 4 * part + 1, total)
    if RAW_STATS:
        m, total = _merge(rm, rs)
        tl.store(part_ptr + 4 * part + 2, m)
        tl.store(part_ptr + 4 * part + 3, total)
    if FILTER:  # the top two of each pair of lanes
        a1, b1 = tl.split(tl.reshape(first, [BLOCK // 2, 2]))
        a2, b2 = tl.split(tl.reshape(second, [BLOCK // 2, 2]))
        half = tl.arange(0, BLOCK // 2)
        tl.store(lanes_ptr + part * BLOCK + half, tl.maximum(a1, b1))
        tl.store(lanes_ptr + part * BLOCK + BLOCK // 2 + half, tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2)))


@triton.jit
def _merge_kernel(
    part_ptr, best_ptr, best_idx_ptr, lanes_ptr, token_ptr, score_ptr, stats_ptr, pivot_ptr, ok_ptr,
    top_k_ptr, top_p_ptr, min_p_ptr, num_logprobs, V, offset, raw_ptr, raw_stride, token_lp_ptr,
    CHUNKS: tl.constexpr, NUM_LANES: tl.constexpr, SAMPLE: tl.constexpr, FILTER: tl.constexpr,
    RAW_STATS: tl.constexpr, TOKEN_LP: tl.constexpr, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr,
    DO_MIN_P: tl.constexpr, PIVOT_ITERS: tl.constexpr,
):
    """One row: merges its chunks' partials; when filtering, also its pivot (`_lane_pivot`); with
    TOKEN_LP, the drawn token's raw logprob."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    part = row64 * CHUNKS + tl.arange(0, CHUNKS)
    log_z = 0.0
    if RAW_STATS:
        rm, rs = _merge(tl.load(part_ptr + 4 * part + 2), tl.load(part_ptr + 4 * part + 3))
        log_z = rm + tl.log(rs)
        tl.store(stats_ptr + 4 * row + 2, rm)
        tl.store(stats_ptr + 4 * row + 3, log_z)
    if SAMPLE:
        top, token = _lowest_argmax(tl.load(best_ptr + part), tl.load(best_idx_ptr + part))
        tl.store(token_ptr + row, token.to(tl.int64) + offset)
        tl.store(score_ptr + row, top)
        if TOKEN_LP:
            tl.store(token_lp_ptr + row, tl.load(raw_ptr + row64 * raw_stride + token).to(tl.float32) - log_z)
    if FILTER:
        m, total = _merge(tl.load(part_ptr + 4 * part), tl.load(part_ptr + 4 * part + 1))
        tl.store(stats_ptr + 4 * row, m)
        tl.store(stats_ptr + 4 * row + 1, total)
        lanes = tl.load(lanes_ptr + row64 * NUM_LANES + tl.arange(0, NUM_LANES))
        pivot, ok = _lane_pivot(lanes, m, total, tl.load(top_k_ptr + row), tl.load(top_p_ptr + row),
                                tl.load(min_p_ptr + row), num_logprobs, V, DO_TOP_K, DO_TOP_P, DO_MIN_P, NUM_LANES,
                                PIVOT_ITERS)
        tl.store(pivot_ptr + row, pivot)
        tl.store(ok_ptr + row, ok.to(tl.int8))


class Filters(NamedTuple):
    """The per-row filter parameters `row_pass` bounds with pivots ([B] tensors, as in SamplingTensors),
    the top logprobs to gather too, and which filters any row uses."""
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    num_logprobs: int
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool


class Logprobs(NamedTuple):
    """Where the kernels write raw-logit logprobs: the drawn token's [B] float32, and the top K [B, K]
    float32 with their token ids [B, K] int64 (None: not asked, or computed elsewhere)."""
    token: torch.Tensor
    top: torch.Tensor | None
    top_ids: torch.Tensor | None


class RowPass(NamedTuple):
    token: torch.Tensor  # [B] int64: the draw of the rows asked to draw (others undefined)
    score: torch.Tensor  # [B] float32: its scaled logit plus noise
    # [B, 4] float32: max and sum of exp(. - max) of x * inv_t (filtering; the sum only with top-p,
    # else NaN), raw max and raw logsumexp (raw_stats)
    stats: torch.Tensor
    pivot: torch.Tensor | None  # [B] float32 (filtering): gather the scaled logits >= pivot; +inf: none
    ok: torch.Tensor | None  # [B] int8 (filtering): 1 where the lane maxima could bound the row's sets


def _chunk_len(vocab: int) -> int:
    return triton.cdiv(triton.cdiv(vocab, CHUNKS), BLOCK) * BLOCK


def row_pass(
    x: torch.Tensor, raw: torch.Tensor, inv_t: torch.Tensor, greedy: torch.Tensor, keys: torch.Tensor,
    draw: int, raw_stats: bool, offset: int = 0, filters: Filters | None = None,
    token_logprobs: torch.Tensor | None = None,
) -> RowPass:
    """One read of each row. `draw` (DRAW_NONE / DRAW_ALL / DRAW_UNFILTERED) picks the rows that get a
    token, drawn over the whole row; column j of x is token `offset + j` (a
    tensor-parallel shard). `filters` asks for the statistics and the pivots that the filters need
    (DRAW_UNFILTERED reads its parameters too). `token_logprobs` [B] (with raw_stats, offset 0)
    receives each drawn token's raw logprob."""
    batch, vocab = x.shape
    dev = x.device
    parts = torch.empty(batch, CHUNKS, 4, dtype=torch.float32, device=dev)
    best = torch.empty(batch, CHUNKS, dtype=torch.float32, device=dev)
    best_idx = torch.empty(batch, CHUNKS, dtype=torch.int32, device=dev)
    lanes = torch.empty(batch if filters else 1, LANES, dtype=torch.float32, device=dev)
    f = filters or Filters(inv_t, inv_t, inv_t, 0, False, False, False)
    _chunk_kernel[(batch, CHUNKS)](
        x, x.stride(0), raw, raw.stride(0), vocab, _chunk_len(vocab), inv_t, greedy, keys,
        f.top_k, f.top_p, f.min_p, parts, best, best_idx, lanes, offset,
        DRAW=draw, FILTER=filters is not None, SUMS=f.do_top_p, RAW_STATS=raw_stats,
        RAW_IS_X=raw is x, BLOCK=BLOCK, num_warps=CHUNK_WARPS,
    )
    token = torch.empty(batch, dtype=torch.int64, device=dev)
    score = torch.empty(batch, dtype=torch.float32, device=dev)
    stats = torch.empty(batch, 4, dtype=torch.float32, device=dev)
    pivot = torch.empty(batch, dtype=torch.float32, device=dev) if filters else None
    ok = torch.empty(batch, dtype=torch.int8, device=dev) if filters else None
    assert token_logprobs is None or (raw_stats and draw != DRAW_NONE and offset == 0)
    _merge_kernel[(batch,)](
        parts, best, best_idx, lanes, token, score, stats, pivot, ok, f.top_k, f.top_p, f.min_p, f.num_logprobs,
        vocab, offset, raw, raw.stride(0), token_logprobs,
        CHUNKS=CHUNKS, NUM_LANES=LANES, SAMPLE=draw != DRAW_NONE, FILTER=filters is not None, RAW_STATS=raw_stats,
        TOKEN_LP=token_logprobs is not None, DO_TOP_K=f.do_top_k, DO_TOP_P=f.do_top_p, DO_MIN_P=f.do_min_p,
        PIVOT_ITERS=PIVOT_ITERS, num_warps=8,
    )
    return RowPass(token, score, stats, pivot, ok)


@triton.jit
def _lane_pivot(lanes, m, total, top_k, top_p, min_p, num_logprobs, V, DO_TOP_K: tl.constexpr,
                DO_TOP_P: tl.constexpr, DO_MIN_P: tl.constexpr, NUM_LANES: tl.constexpr, ITERS: tl.constexpr):
    """A row's pivot from its lane maxima (a sub-multiset of the row, so their k-th largest is <= the
    row's and their mass above a value <= the row's): the entries >= pivot hold every entry the row's
    filters keep (top-k, else top-p, then min-p) and its top `num_logprobs`; +inf where nothing is
    needed. Returns (pivot, ok): ok is 0 where the lanes could not bound it (fewer lanes than k, or
    less mass than top_p). The bisections stop after ITERS steps: any lower bound is sound."""
    keys = _order_key(lanes).to(tl.int64)
    draw_key = _order_key(tl.full((), float("inf"), tl.float32)).to(tl.int64)
    ok = tl.full((), 1, tl.int32)
    filtered = tl.full((), 0, tl.int32)
    if DO_TOP_K:
        if top_k < V:
            ok = (top_k <= NUM_LANES).to(tl.int32)
            draw_key = _kth_largest_key(keys, tl.minimum(top_k, NUM_LANES), ITERS)
            filtered = 1
    if DO_TOP_P:
        if (top_p < 1.0) & (filtered == 0):
            w = tl.exp(lanes - m)
            target = top_p.to(tl.float32) * total
            ok = (tl.sum(w, 0) >= target).to(tl.int32)
            lo = tl.min(keys, 0)
            hi = tl.max(keys, 0)
            for _ in range(ITERS):  # the largest lane value whose lanes at or above it hold the target mass
                if lo < hi:
                    mid = lo + (hi - lo + 1) // 2
                    if tl.sum(tl.where(keys >= mid, w, 0.0), 0) >= target:
                        lo = mid
                    else:
                        hi = mid - 1
            draw_key = lo
            filtered = 1
    if DO_MIN_P:
        if min_p > 0.0:
            floor = _order_key(m + tl.log(min_p)).to(tl.int64)
            draw_key = tl.where(filtered != 0, tl.maximum(draw_key, floor), floor)
    pivot_key = draw_key
    if num_logprobs > 0:
        ok = ok & (num_logprobs <= NUM_LANES).to(tl.int32)
        pivot_key = tl.minimum(pivot_key, _kth_largest_key(keys, tl.minimum(num_logprobs, NUM_LANES), ITERS))
    return _from_order_key(pivot_key.to(tl.int32)), ok


@triton.jit
def _gather_kernel(x_ptr, x_stride, V, chunk_len, inv_t_ptr, pivot_ptr, count_ptr, val_ptr, idx_ptr,
                   CAP: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk of one row: its entries with x * inv_t >= the row's pivot, into the chunk's CAP slots
    (the count may exceed CAP: the row then did not fit), the rest of the slots padded with -inf."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    part = row.to(tl.int64) * tl.num_programs(1) + chunk
    row64 = row.to(tl.int64)
    lane = tl.arange(0, BLOCK)
    pivot = tl.load(pivot_ptr + row)
    count = tl.full((), 0, tl.int32)
    if pivot != float("inf"):
        inv_t = tl.load(inv_t_ptr + row)
        lo = chunk * chunk_len
        hi = tl.minimum(lo + chunk_len, V)
        for start in range(lo, hi, BLOCK):  # (two tiles a step, as `_chunk_kernel` takes them, was slower:
            idx = start + lane             # top-k 72 -> 128 us at 256 rows, call AQ)
            valid = idx < hi
            x = tl.load(x_ptr + row64 * x_stride + idx, mask=valid, other=float("-inf")).to(tl.float32)
            keep = (x * inv_t >= pivot) & valid
            n = tl.sum(keep.to(tl.int32), 0)
            if n > 0:  # rare: the scan runs only on tiles that keep something
                slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
                in_cap = keep & (slot < CAP)
                tl.store(val_ptr + part * CAP + slot, x, mask=in_cap)
                tl.store(idx_ptr + part * CAP + slot, idx, mask=in_cap)
                count += n
    slots = tl.arange(0, CAP)
    tl.store(val_ptr + part * CAP + slots, float("-inf"), mask=slots >= count)
    tl.store(idx_ptr + part * CAP + slots, 0, mask=slots >= count)
    tl.store(count_ptr + part, count)


def gather_candidates(x: torch.Tensor, inv_t: torch.Tensor, pivot: torch.Tensor,
                      cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's entries with x * inv_t >= its pivot (`row_pass`): (values [B, cap] float32 of x,
    -inf padded, token ids [B, cap] int32, counts [B, CHUNKS] int32), `cap // CHUNKS` slots per chunk.
    A row fits when no chunk's count exceeds its slots."""
    batch, vocab = x.shape
    per_chunk = max(1, cap // CHUNKS)
    counts = torch.empty(batch, CHUNKS, dtype=torch.int32, device=x.device)
    values = torch.empty(batch, CHUNKS * per_chunk, dtype=torch.float32, device=x.device)
    ids = torch.empty(batch, CHUNKS * per_chunk, dtype=torch.int32, device=x.device)
    _gather_kernel[(batch, CHUNKS)](x, x.stride(0), vocab, _chunk_len(vocab), inv_t, pivot, counts, values, ids,
                                    CAP=per_chunk, BLOCK=GATHER_BLOCK, num_warps=GATHER_WARPS)
    return values, ids, counts


@triton.jit
def _order_key(z):
    """int32 keys whose signed order is the float32 order of z (-inf included)."""
    bits = z.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_order_key(key):
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(keys, k, ITERS: tl.constexpr):
    """The k-th largest of `keys` (k >= 1, at most their count) by bisection on the int32 order: exact
    after 33 steps (the keys span at most 2**32 values), a lower bound after fewer."""
    lo = tl.min(keys, 0)  # count(keys >= lo) >= k always holds
    hi = tl.max(keys, 0)
    for _ in range(ITERS):
        if lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if tl.sum((keys >= mid).to(tl.int32), 0) >= k:
                lo = mid
            else:
                hi = mid - 1
    return lo


@triton.jit
def _select_kernel(val_ptr, idx_ptr, count_ptr, inv_t_ptr, greedy_ptr, key_ptr, stats_ptr, top_k_ptr,
                   top_p_ptr, min_p_ptr, tau_ptr, ok_ptr, token_ptr, V, raw_ptr, raw_stride, token_lp_ptr,
                   top_lp_ptr, top_id_ptr, num_top, CAP: tl.constexpr, CHUNKS: tl.constexpr,
                   DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr, DO_MIN_P: tl.constexpr,
                   TOKEN_LP: tl.constexpr, TOP: tl.constexpr):
    """Each row's threshold tau from its candidates (`gather_candidates`), without sorting them. Top-k: the k-th
    largest scaled logit; top-p: the smallest candidate value whose strictly larger candidates hold less than top_p
    of the mass (HF keeps a token while the mass ranked above it is below top_p); min-p: m + log(min_p). A filtered
    sampled row then draws its token: the Gumbel-max over the candidates >= tau, which hold every entry >= tau when
    ok. With TOKEN_LP, the row's token's raw logprob; with TOP, the top `num_top` raw logprobs from the candidates
    (the values are the raw logits then), ties to the lowest id."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    slots = tl.arange(0, CAP)
    inv_t = tl.load(inv_t_ptr + row)
    z = tl.load(val_ptr + row64 * CAP + slots) * inv_t
    keys = _order_key(z).to(tl.int64)
    m = tl.load(stats_ptr + 4 * row)
    tau_key = _order_key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
    covered = tl.max(tl.load(count_ptr + row64 * CHUNKS + tl.arange(0, CHUNKS)), 0) <= CAP // CHUNKS
    mass = tl.load(stats_ptr + 4 * row + 1)
    filtered = tl.full((), 0, tl.int32)
    if DO_TOP_K:
        top_k = tl.load(top_k_ptr + row)
        if top_k < V:
            filtered = 1
            covered = covered & (top_k <= CAP)
            tau_key = _kth_largest_key(keys, tl.minimum(top_k, CAP), 33)
            mass = tl.sum(tl.where(keys >= tau_key, tl.exp(z - m), 0.0), 0)
    if DO_TOP_P:
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            filtered = 1
            w = tl.where(keys >= tau_key, tl.exp(z - m), 0.0)
            target = top_p.to(tl.float32) * mass
            covered = covered & (tl.sum(w, 0) >= target)
            lo = tau_key
            hi = tl.max(keys, 0)  # nothing is strictly above the largest key: less than any target
            for _ in range(33):
                if lo < hi:
                    mid = lo + (hi - lo) // 2
                    if tl.sum(tl.where(keys > mid, w, 0.0), 0) < target:
                        hi = mid
                    else:
                        lo = mid + 1
            tau_key = tl.maximum(tau_key, lo)
    tau = _from_order_key(tau_key.to(tl.int32))
    if DO_MIN_P:
        min_p = tl.load(min_p_ptr + row)
        if min_p > 0.0:
            filtered = 1
            tau = tl.maximum(tau, m + tl.log(min_p))
    tl.store(tau_ptr + row, tau)
    tl.store(ok_ptr + row, (tl.load(ok_ptr + row) != 0) & covered)
    ids = tl.load(idx_ptr + row64 * CAP + slots)
    token = tl.load(token_ptr + row)  # an unfiltered row's draw, from `row_pass`
    if (filtered != 0) & (tl.load(greedy_ptr + row) == 0):
        key = tl.load(key_ptr + 2 * row).to(tl.uint32)
        key2 = tl.load(key_ptr + 2 * row + 1).to(tl.uint32)
        score = tl.where(z >= tau, z + _gumbel(ids, key, key2), float("-inf"))
        token = _lowest_argmax(score, ids)[1].to(tl.int64)
        tl.store(token_ptr + row, token)
    if TOKEN_LP:
        log_z = tl.load(stats_ptr + 4 * row + 3)
        tl.store(token_lp_ptr + row, tl.load(raw_ptr + row64 * raw_stride + token).to(tl.float32) - log_z)
        if TOP:
            left = tl.load(val_ptr + row64 * CAP + slots)
            for i in range(num_top):
                top, top_id = _lowest_argmax(left, ids)
                tl.store(top_lp_ptr + row64 * num_top + i, top - log_z)
                tl.store(top_id_ptr + row64 * num_top + i, top_id.to(tl.int64))
                left = tl.where(ids == top_id, float("-inf"), left)


def select_and_draw(values: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, inv_t: torch.Tensor,
                    greedy: torch.Tensor, keys: torch.Tensor, stats: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, min_p: torch.Tensor, vocab_size: int, ok: torch.Tensor, tokens: torch.Tensor,
                    do_top_k: bool, do_top_p: bool, do_min_p: bool, raw: torch.Tensor | None = None,
                    logprobs: Logprobs | None = None) -> torch.Tensor:
    """Each row's threshold tau [B] float32 from its candidates (`gather_candidates`), as sorting them would give it
    (`_select_kernel`'s rule), and the token of each filtered sampled row, written into `tokens`. `ok` [B] int8 (in
    place) keeps only the rows whose candidates held enough of the row for tau, the draw and the top logprobs to be
    exact. `stats`: `row_pass`'s (its raw logsumexp when `logprobs` is given). `logprobs` receives every row's token
    logprob (from `raw`) and, when its `top` is not None, the top K from the candidates, which must then be raw."""
    batch, cap = values.shape
    tau = torch.empty(batch, dtype=torch.float32, device=values.device)
    token_lp, top, top_ids = logprobs if logprobs is not None else (None, None, None)
    _select_kernel[(batch,)](values, ids, counts, inv_t, greedy, keys, stats, top_k, top_p, min_p, tau,
                             ok, tokens, vocab_size, raw, 0 if raw is None else raw.stride(0), token_lp, top, top_ids,
                             0 if top is None else top.shape[1], CAP=cap, CHUNKS=counts.shape[1], DO_TOP_K=do_top_k,
                             DO_TOP_P=do_top_p, DO_MIN_P=do_min_p, TOKEN_LP=token_lp is not None, TOP=top is not None,
                             num_warps=8)
    return tau


EXACT_BLOCK = 4096  # logits per loop step of `exact_rows`' one program per row


@triton.jit
def _scaled_tile(x_ptr, base, start, V, inv_t, BLOCK: tl.constexpr):
    """(token ids, valid, scaled logits: -inf past V) of one tile of a row."""
    idx = start + tl.arange(0, BLOCK)
    valid = idx < V
    return idx, valid, tl.load(x_ptr + base + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _count_at_least(x_ptr, base, V, inv_t, key, BLOCK: tl.constexpr):
    """How many of the row's scaled logits have an order key >= key."""
    n = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx, valid, z = _scaled_tile(x_ptr, base, start, V, inv_t, BLOCK)
        n += ((_order_key(z).to(tl.int64) >= key) & valid).to(tl.int32)
    return tl.sum(n, 0)


@triton.jit
def _mass_above(x_ptr, base, V, inv_t, m, floor_key, key, BLOCK: tl.constexpr):
    """The row's sum of exp(z - m) over the scaled logits z with order key > key and >= floor_key."""
    w = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        idx, valid, z = _scaled_tile(x_ptr, base, start, V, inv_t, BLOCK)
        k = _order_key(z).to(tl.int64)
        w += tl.where((k > key) & (k >= floor_key), tl.exp(z - m), 0.0)
    return tl.sum(w, 0)


@triton.jit
def _draw_above(x_ptr, base, V, inv_t, key, key2, bound, STRICT: tl.constexpr, BLOCK: tl.constexpr):
    """(the row's Gumbel-max draw over the scaled logits >= bound, or > bound when STRICT; its scaled logit)."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    best_z = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        idx, valid, z = _scaled_tile(x_ptr, base, start, V, inv_t, BLOCK)
        if STRICT:
            above = z > bound
        else:
            above = z >= bound
        score = tl.where(above, z + _gumbel(idx, key, key2), float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
        best_z = tl.where(better, z, best_z)
    token = _lowest_argmax(best, best_idx)[1]
    return token, tl.max(tl.where(best_idx == token, best_z, float("-inf")), 0)


@triton.jit
def _exact_kernel(x_ptr, x_stride, raw_ptr, raw_stride, V, ok_ptr, inv_t_ptr, key_ptr, stats_ptr, top_k_ptr, top_p_ptr,
                  min_p_ptr, token_ptr, token_lp_ptr, top_lp_ptr, top_id_ptr, num_top, DO_TOP_K: tl.constexpr,
                  DO_TOP_P: tl.constexpr, DO_MIN_P: tl.constexpr, TOKEN_LP: tl.constexpr, TOP: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One row whose candidates did not hold its sets (ok == 0; the others return at once), read whole: its
    token, drawn above its exact threshold, and its logprobs. See `exact_rows`."""
    row = tl.program_id(0)
    if tl.load(ok_ptr + row) == 0:
        row64 = row.to(tl.int64)
        base = row64 * x_stride
        inv_t = tl.load(inv_t_ptr + row)
        key = tl.load(key_ptr + 2 * row).to(tl.uint32)
        key2 = tl.load(key_ptr + 2 * row + 1).to(tl.uint32)
        m = tl.load(stats_ptr + 4 * row)
        neg_inf_key = _order_key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
        top_k_on = tl.full((), 0, tl.int32)
        top_p_on = tl.full((), 0, tl.int32)
        top_p = tl.full((), 1.0, tl.float32)
        if DO_TOP_K:
            top_k_on = (tl.load(top_k_ptr + row) < V).to(tl.int32)
        if DO_TOP_P:
            top_p = tl.load(top_p_ptr + row).to(tl.float32)
            top_p_on = (top_p < 1.0).to(tl.int32)
        floor = tl.full((), float("-inf"), tl.float32)  # min-p's threshold, exact already
        if DO_MIN_P:
            min_p = tl.load(min_p_ptr + row)
            if min_p > 0.0:
                floor = m + tl.log(min_p)
        token = tl.load(token_ptr + row)  # row_pass's draw: right for a row that no filter touches
        if (top_p_on != 0) & (top_k_on == 0):
            # The nucleus by rejection: the draw at or above the min-p floor (a superset of the nucleus) is in
            # the nucleus when the mass strictly above it is below top_p of the row's; if not, nothing at or
            # below it is, and the next candidate is the draw strictly above it. Most rows end at the first.
            target = top_p * tl.load(stats_ptr + 4 * row + 1)
            cand, z_cand = _draw_above(x_ptr, base, V, inv_t, key, key2, floor, False, BLOCK)
            mass = _mass_above(x_ptr, base, V, inv_t, m, neg_inf_key, _order_key(z_cand).to(tl.int64), BLOCK)
            while mass >= target:
                cand, z_cand = _draw_above(x_ptr, base, V, inv_t, key, key2, z_cand, True, BLOCK)
                mass = _mass_above(x_ptr, base, V, inv_t, m, neg_inf_key, _order_key(z_cand).to(tl.int64), BLOCK)
            token = cand.to(tl.int64)
        elif (top_k_on != 0) | (floor > float("-inf")):
            tau_key = neg_inf_key
            if top_k_on != 0:  # the k-th largest scaled logit, by bisection on the order keys
                top_k = tl.load(top_k_ptr + row)
                hi = _order_key(m).to(tl.int64)
                while tau_key < hi:
                    mid = tau_key + (hi - tau_key + 1) // 2
                    if _count_at_least(x_ptr, base, V, inv_t, mid, BLOCK) >= top_k:
                        tau_key = mid
                    else:
                        hi = mid - 1
                if top_p_on != 0:  # within top-k's set: the smallest key with less than top_p of its mass above it
                    target = top_p * _mass_above(x_ptr, base, V, inv_t, m, tau_key, tau_key - 1, BLOCK)
                    lo = tau_key
                    hi = _order_key(m).to(tl.int64)
                    while lo < hi:
                        mid = lo + (hi - lo) // 2
                        if _mass_above(x_ptr, base, V, inv_t, m, tau_key, mid, BLOCK) < target:
                            hi = mid
                        else:
                            lo = mid + 1
                    tau_key = lo
            tau = tl.maximum(_from_order_key(tau_key.to(tl.int32)), floor)
            token = _draw_above(x_ptr, base, V, inv_t, key, key2, tau, False, BLOCK)[0].to(tl.int64)
        tl.store(token_ptr + row, token)
        if TOKEN_LP:
            log_z = tl.load(stats_ptr + 4 * row + 3)
            tl.store(token_lp_ptr + row, tl.load(raw_ptr + row64 * raw_stride + token).to(tl.float32) - log_z)
            if TOP:  # the top K raw logits one by one, each the largest after the last (ties: lowest id first)
                last = tl.full((), float("inf"), tl.float32)
                last_id = tl.full((), -1, tl.int32)
                for i in range(num_top):
                    best = tl.full([BLOCK], float("-inf"), tl.float32)
                    best_idx = tl.zeros([BLOCK], tl.int32)
                    for start in range(0, V, BLOCK):
                        idx, valid, r = _scaled_tile(raw_ptr, row64 * raw_stride, start, V, 1.0, BLOCK)
                        after = (r < last) | ((r == last) & (idx > last_id))
                        score = tl.where(after & valid, r, float("-inf"))
                        better = score > best
                        best = tl.where(better, score, best)
                        best_idx = tl.where(better, idx, best_idx)
                    last, last_id = _lowest_argmax(best, best_idx)
                    tl.store(top_lp_ptr + row64 * num_top + i, last - log_z)
                    tl.store(top_id_ptr + row64 * num_top + i, last_id.to(tl.int64))


def exact_rows(x: torch.Tensor, raw: torch.Tensor, inv_t: torch.Tensor, keys: torch.Tensor, stats: torch.Tensor,
               top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, ok: torch.Tensor, tokens: torch.Tensor,
               do_top_k: bool, do_top_p: bool, do_min_p: bool, logprobs: Logprobs | None = None) -> None:
    """Finish, on the device, the rows whose candidates did not hold their sets (`ok` == 0 after
    `select_and_draw`): each is read whole by one program, and the others cost a launch, so no host sync
    waits to learn which rows they are. A row with top-p and no top-k is drawn by rejection over the
    nucleus; a row with top-k finds its exact threshold by bisection over its order keys (and then its
    top-p threshold within top-k's set by bisection over the mass), min-p's floor is exact already; the
    token is the Gumbel-max draw over the entries above it, the same token the candidates would have
    given (filters are off on greedy rows). `tokens` is written in place, and `logprobs` (the drawn
    token's, and with `top` the top K raw logprobs, from `raw`) for those rows."""
    token_lp, top, top_ids = logprobs if logprobs is not None else (None, None, None)
    _exact_kernel[(x.shape[0],)](x, x.stride(0), raw, raw.stride(0), x.shape[1], ok, inv_t, keys, stats, top_k, top_p,
                                 min_p, tokens, token_lp, top, top_ids, 0 if top is None else top.shape[1],
                                 DO_TOP_K=do_top_k, DO_TOP_P=do_top_p, DO_MIN_P=do_min_p,
                                 TOKEN_LP=token_lp is not None, TOP=top is not None, BLOCK=EXACT_BLOCK, num_warps=8)

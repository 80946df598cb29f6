"""Triton kernels of the sampler: one program per row, each streaming its row of logits once.

`row_pass` reads a row once and yields its statistics (max and sum of exp of the scaled
logits, the raw logsumexp), its per-lane maxima (a cheap upper sample that bounds top-k and
top-p thresholds from below), and a token: the argmax of scaled logit + Gumbel noise over the
entries >= the row's threshold (plain argmax on greedy rows). `gather_candidates` bounds each row's
top-k / top-p set from below with its lane maxima and copies the entries at or above that pivot into
a small buffer, where `select_thresholds` then finds the exact thresholds, without sorting.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LANES = 1024  # lanes per row in row_pass: also the length of each row's lane-maxima vector


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
    return -tl.log(-tl.log(uniform))


@triton.jit
def _lowest_argmax(best, best_idx):
    """(the largest of the lanes' best scores, the lowest index holding it): ties go to the lowest
    token, as one argmax over the whole row gives them."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, best_idx, 2147483647), 0)


@triton.jit
def _row_pass_kernel(
    x_ptr, x_stride, raw_ptr, raw_stride, V: tl.constexpr,
    inv_t_ptr, greedy_ptr, key_ptr, tau_ptr,
    token_ptr, score_ptr, stats_ptr, lanes_ptr, offset,
    SAMPLE: tl.constexpr, STATS: tl.constexpr, RAW_STATS: tl.constexpr, RAW_IS_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    inv_t = tl.load(inv_t_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    key = tl.load(key_ptr + 2 * row).to(tl.uint32)
    key2 = tl.load(key_ptr + 2 * row + 1).to(tl.uint32)
    tau = tl.load(tau_ptr + row)
    lane = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    best = tl.full([BLOCK], neg_inf, tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    lane_max = tl.full([BLOCK], neg_inf, tl.float32)
    m = neg_inf
    s = 0.0
    rm = neg_inf
    rs = 0.0
    for start in range(0, V, BLOCK):
        idx = start + lane
        valid = idx < V
        x = tl.load(x_ptr + row64 * x_stride + idx, mask=valid, other=neg_inf).to(tl.float32)
        z = x * inv_t
        if STATS:
            lane_max = tl.maximum(lane_max, z)
            new_m = tl.maximum(m, tl.max(z, 0))
            safe = tl.where(new_m == neg_inf, 0.0, new_m)
            s = s * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), 0)
            m = new_m
        if RAW_STATS:
            if RAW_IS_X:
                r = x
            else:
                r = tl.load(raw_ptr + row64 * raw_stride + idx, mask=valid, other=neg_inf).to(tl.float32)
            new_rm = tl.maximum(rm, tl.max(r, 0))
            safe_r = tl.where(new_rm == neg_inf, 0.0, new_rm)
            rs = rs * tl.exp(rm - safe_r) + tl.sum(tl.exp(r - safe_r), 0)
            rm = new_rm
        if SAMPLE:
            if greedy:
                score = z
            else:
                score = tl.where(z >= tau, z + _gumbel(idx + offset, key, key2), neg_inf)
            better = score > best
            best = tl.where(better, score, best)
            best_idx = tl.where(better, idx, best_idx)
    if SAMPLE:
        top, token = _lowest_argmax(best, best_idx)
        tl.store(token_ptr + row, token.to(tl.int64) + offset)
        tl.store(score_ptr + row, top)
    if STATS:
        tl.store(stats_ptr + 4 * row, m)
        tl.store(stats_ptr + 4 * row + 1, s)
        tl.store(lanes_ptr + row64 * BLOCK + lane, lane_max)
    if RAW_STATS:
        tl.store(stats_ptr + 4 * row + 2, rm)
        tl.store(stats_ptr + 4 * row + 3, rm + tl.log(rs))


def row_pass(
    x: torch.Tensor, raw: torch.Tensor, inv_t: torch.Tensor, greedy: torch.Tensor, keys: torch.Tensor,
    tau: torch.Tensor, sample: bool, stats: bool, raw_stats: bool, offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of each row. Returns (token [B] int64, its score [B] float32 (scaled logit plus
    noise), stats [B, 4] float32 = max and sum-of-exp of x * inv_t, raw max, raw logsumexp; lane
    maxima [B, LANES] float32). Column j of x is token `offset + j` (a tensor-parallel shard)."""
    batch, vocab = x.shape
    token = torch.empty(batch, dtype=torch.int64, device=x.device)
    score = torch.empty(batch, dtype=torch.float32, device=x.device)
    out_stats = torch.empty(batch, 4, dtype=torch.float32, device=x.device)
    lanes = torch.empty(batch if stats else 1, LANES, dtype=torch.float32, device=x.device)
    _row_pass_kernel[(batch,)](
        x, x.stride(0), raw, raw.stride(0), vocab, inv_t, greedy, keys, tau, token, score, out_stats, lanes, offset,
        SAMPLE=sample, STATS=stats, RAW_STATS=raw_stats, RAW_IS_X=raw is x, BLOCK=LANES, num_warps=8,
    )
    return token, score, out_stats, lanes


@triton.jit
def _lane_pivot(lanes, m, total, top_k, top_p, num_logprobs, V, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr,
                NUM_LANES: tl.constexpr):
    """A row's pivot from its lane maxima (a subset of the row, so their k-th largest is <= the row's
    and their prefix mass <= the row's): the entries >= pivot hold the top-k set (top-k on), else the
    nucleus (top-p on), and the top `num_logprobs`; +inf where nothing is needed. Returns (pivot,
    ok): ok is 0 where the lanes could not bound it (fewer lanes than k, or less mass than top_p)."""
    keys = _order_key(lanes).to(tl.int64)
    pivot_key = _order_key(tl.full((), float("inf"), tl.float32)).to(tl.int64)
    ok = tl.full((), 1, tl.int32)
    if DO_TOP_P:
        if top_p < 1.0:
            w = tl.exp(lanes - m)
            target = top_p.to(tl.float32) * total
            ok = (tl.sum(w, 0) >= target).to(tl.int32)
            lo = tl.min(keys, 0)
            hi = tl.max(keys, 0)
            for _ in range(33):  # the largest lane value whose lanes at or above it hold the target mass
                if lo < hi:
                    mid = lo + (hi - lo + 1) // 2
                    if tl.sum(tl.where(keys >= mid, w, 0.0), 0) >= target:
                        lo = mid
                    else:
                        hi = mid - 1
            pivot_key = lo
    if DO_TOP_K:
        if top_k < V:
            ok = ok & (top_k <= NUM_LANES).to(tl.int32)
            pivot_key = _kth_largest_key(keys, tl.minimum(top_k, NUM_LANES))
    if num_logprobs > 0:
        ok = ok & (num_logprobs <= NUM_LANES).to(tl.int32)
        pivot_key = tl.minimum(pivot_key, _kth_largest_key(keys, tl.minimum(num_logprobs, NUM_LANES)))
    return _from_order_key(pivot_key.to(tl.int32)), ok


@triton.jit
def _gather_kernel(x_ptr, x_stride, V: tl.constexpr, inv_t_ptr, lanes_ptr, m_ptr, total_ptr, top_k_ptr, top_p_ptr,
                   num_logprobs, count_ptr, ok_ptr, val_ptr, idx_ptr, DO_TOP_K: tl.constexpr,
                   DO_TOP_P: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    lane = tl.arange(0, BLOCK)
    pivot, ok = _lane_pivot(tl.load(lanes_ptr + row64 * BLOCK + lane), tl.load(m_ptr + row), tl.load(total_ptr + row),
                            tl.load(top_k_ptr + row), tl.load(top_p_ptr + row), num_logprobs, V, DO_TOP_K, DO_TOP_P,
                            BLOCK)
    count = tl.full((), 0, tl.int32)
    if pivot != float("inf"):
        inv_t = tl.load(inv_t_ptr + row)
        for start in range(0, V, BLOCK):
            idx = start + lane
            valid = idx < V
            x = tl.load(x_ptr + row64 * x_stride + idx, mask=valid, other=float("-inf")).to(tl.float32)
            keep = (x * inv_t >= pivot) & valid
            slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
            in_cap = keep & (slot < CAP)
            tl.store(val_ptr + row64 * CAP + slot, x, mask=in_cap)
            tl.store(idx_ptr + row64 * CAP + slot, idx, mask=in_cap)
            count += tl.sum(keep.to(tl.int32), 0)
    tl.store(count_ptr + row, count)
    tl.store(ok_ptr + row, (ok != 0) & (count <= CAP))


def gather_candidates(x: torch.Tensor, inv_t: torch.Tensor, lanes: torch.Tensor, m: torch.Tensor, total: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, num_logprobs: int, do_top_k: bool, do_top_p: bool,
                      cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's entries with x * inv_t >= its pivot (`_lane_pivot`, from `row_pass`'s lane maxima and
    stats): (ok [B] bool: the pivot is sound and the candidates fit, values [B, cap] float32 of x padded
    with -inf, token ids [B, cap] int32). Rows with nothing to gather keep no candidates."""
    batch, vocab = x.shape
    count = torch.empty(batch, dtype=torch.int32, device=x.device)
    ok = torch.empty(batch, dtype=torch.bool, device=x.device)
    values = torch.full((batch, cap), float("-inf"), dtype=torch.float32, device=x.device)
    ids = torch.zeros(batch, cap, dtype=torch.int32, device=x.device)
    _gather_kernel[(batch,)](x, x.stride(0), vocab, inv_t, lanes, m.contiguous(), total.contiguous(), top_k, top_p,
                             num_logprobs, count, ok, values, ids, DO_TOP_K=do_top_k, DO_TOP_P=do_top_p, CAP=cap,
                             BLOCK=LANES, num_warps=8)
    return ok, values, ids


@triton.jit
def _order_key(z):
    """int32 keys whose signed order is the float32 order of z (-inf included)."""
    bits = z.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_order_key(key):
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(keys, k):
    """The k-th largest of `keys` (k >= 1, at most their count): bisection on the int32 order."""
    lo = tl.min(keys, 0)  # count(keys >= lo) >= k always holds
    hi = tl.max(keys, 0)
    for _ in range(33):  # the keys span at most 2**32 values
        if lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if tl.sum((keys >= mid).to(tl.int32), 0) >= k:
                lo = mid
            else:
                hi = mid - 1
    return lo


@triton.jit
def _select_kernel(val_ptr, inv_t_ptr, m_ptr, total_ptr, top_k_ptr, top_p_ptr, min_p_ptr, tau_ptr, covered_ptr,
                   V, CAP: tl.constexpr, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr, DO_MIN_P: tl.constexpr):
    """Each row's threshold tau from its candidates (`gather_candidates`): `sampler.thresholds_from_sorted`
    without the sort. Top-k: the k-th largest scaled logit; top-p: the smallest candidate value whose
    strictly larger candidates hold less than top_p of the mass (HF keeps a token while the mass ranked
    above it is below top_p); min-p: m + log(min_p)."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    z = tl.load(val_ptr + row64 * CAP + tl.arange(0, CAP)) * tl.load(inv_t_ptr + row)
    keys = _order_key(z).to(tl.int64)
    m = tl.load(m_ptr + row)
    tau_key = _order_key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
    covered = tl.full((), 1, tl.int32)
    mass = tl.load(total_ptr + row)
    if DO_TOP_K:
        top_k = tl.load(top_k_ptr + row)
        if top_k < V:
            covered = (top_k <= CAP).to(tl.int32)
            tau_key = _kth_largest_key(keys, tl.minimum(top_k, CAP))
            mass = tl.sum(tl.where(keys >= tau_key, tl.exp(z - m), 0.0), 0)
    if DO_TOP_P:
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            w = tl.where(keys >= tau_key, tl.exp(z - m), 0.0)
            target = top_p.to(tl.float32) * mass
            covered = covered & (tl.sum(w, 0) >= target).to(tl.int32)
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
            tau = tl.maximum(tau, m + tl.log(min_p))
    tl.store(tau_ptr + row, tau)
    tl.store(covered_ptr + row, covered.to(tl.int8))


def select_thresholds(values: torch.Tensor, inv_t: torch.Tensor, m: torch.Tensor, total: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, vocab_size: int,
                      do_top_k: bool, do_top_p: bool, do_min_p: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau [B] float32, covered [B] bool) of each row from its candidates `values` [B, CAP] (x, -inf
    padded; they must hold every entry >= the row's pivot), as `sampler.thresholds_from_sorted` gives
    them from the sorted candidates. `covered`: the candidates held enough of the row for tau to be exact."""
    batch, cap = values.shape
    tau = torch.empty(batch, dtype=torch.float32, device=values.device)
    covered = torch.empty(batch, dtype=torch.int8, device=values.device)
    m, total = m.contiguous(), total.contiguous()  # (columns of row_pass's stats)
    _select_kernel[(batch,)](values, inv_t, m, total, top_k, top_p, min_p, tau, covered, vocab_size, CAP=cap,
                             DO_TOP_K=do_top_k, DO_TOP_P=do_top_p, DO_MIN_P=do_min_p, num_warps=8)
    return tau, covered.bool()


@triton.jit
def _nucleus_round_kernel(x_ptr, x_stride, V: tl.constexpr, rows_ptr, inv_t_ptr, key_ptr, m_ptr, total_ptr,
                          top_p_ptr, token_ptr, done_ptr, BLOCK: tl.constexpr):
    """One round of `nucleus_sample` for one row: accept the candidate token if the mass strictly above
    its scaled logit is below top_p of the row's mass (so it is in the nucleus), else take the
    Gumbel-max draw over the entries strictly above it as the next candidate."""
    i = tl.program_id(0)
    if tl.load(done_ptr + i) == 0:
        row64 = tl.load(rows_ptr + i)
        inv_t = tl.load(inv_t_ptr + row64)
        key = tl.load(key_ptr + 2 * row64).to(tl.uint32)
        key2 = tl.load(key_ptr + 2 * row64 + 1).to(tl.uint32)
        m = tl.load(m_ptr + row64)
        z_token = tl.load(x_ptr + row64 * x_stride + tl.load(token_ptr + i)).to(tl.float32) * inv_t
        lane = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        mass = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], neg_inf, tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + lane
            z = tl.load(x_ptr + row64 * x_stride + idx, mask=idx < V, other=neg_inf).to(tl.float32) * inv_t
            above = z > z_token
            mass += tl.where(above, tl.exp(z - m), 0.0)
            score = tl.where(above, z + _gumbel(idx, key, key2), neg_inf)
            better = score > best
            best = tl.where(better, score, best)
            best_idx = tl.where(better, idx, best_idx)
        if tl.sum(mass, 0) < tl.load(top_p_ptr + row64).to(tl.float32) * tl.load(total_ptr + row64):
            tl.store(done_ptr + i, 1)
        else:  # (something is above a token outside the nucleus: the nucleus is never empty)
            tl.store(token_ptr + i, _lowest_argmax(best, best_idx)[1].to(tl.int64))


def nucleus_sample(x: torch.Tensor, inv_t: torch.Tensor, keys: torch.Tensor, m: torch.Tensor, total: torch.Tensor,
                   top_p: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max draw over each row's top-p nucleus (and min-p set), without finding the nucleus.

    `tokens` [R] are the draws of `rows` over the entries at or above their min-p threshold (-inf
    where min-p is off): the argmax of scaled logit + Gumbel noise over a superset of the nucleus.
    Such a draw is in the nucleus, and then also its argmax, when the mass strictly above its
    scaled logit is below top_p of the row's (HF keeps a token while the mass ranked above it is
    below top_p). Otherwise every entry at or below it is outside the nucleus too, and the next
    candidate is the argmax over the entries strictly above it. The draw lands outside the
    nucleus with probability about 1 - top_p, so most rows finish in the first round; each round
    reads the unfinished rows once, where sorting them read and wrote each many times.
    For rows with top-k off (top-k's set would change the mass that top-p counts)."""
    tokens = tokens.clone()
    done = torch.zeros(len(rows), dtype=torch.int8, device=x.device)
    m, total = m.contiguous(), total.contiguous()  # (columns of row_pass's stats)
    while True:
        _nucleus_round_kernel[(len(rows),)](x, x.stride(0), x.shape[1], rows, inv_t, keys, m, total, top_p, tokens,
                                            done, BLOCK=LANES, num_warps=8)
        if bool(done.all()):
            return tokens

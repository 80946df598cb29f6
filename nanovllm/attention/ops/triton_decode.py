"""Triton PagedAttention decode: one query token per sequence over the paged KV cache.

One program handles one (sequence, KV head, partition): it loads each K/V tile of the partition
once for all the query heads that share the KV head (the GQA group, padded to 16 rows for
``tl.dot``) and keeps an online softmax in float32. A tile is ``BLOCK_N`` tokens gathered through
the block table, so the tile size does not depend on the cache's block size.

- v1 (``num_partitions == 1``): one pass over the whole context, output written directly.
- v2 (``num_partitions > 1``): the context is cut into ``num_partitions`` equal partitions (a
  multiple of ``BLOCK_N`` tokens) of ``max_context_len``; each writes its unnormalized output,
  running max and sum, and the last of a (sequence, KV head)'s partitions to finish merges them
  (see below). Partitions that start past a sequence's length exit at once, so a CUDA graph
  captured for ``max_model_len`` costs little on short contexts; a sequence with one partition
  that has tokens (an empty context included) writes its output as v1 does.

The merge runs in the decode kernel, not in a kernel of its own: in a latency-bound decode step (~13
kernels per layer at batch 1-16) each kernel boundary costs a couple of microseconds. On the H200
(call AG, before and after in one call) `bench.py` went 5.24 -> 5.10 ms per decode step and batch 16
1.78 -> 1.76; batch 1 stayed at 0.92. Each (sequence, KV head) has an int32 arrival counter
(`arrival_counters`, zero between kernels). A partition program writes its partials, then adds 1 to
the counter (acq_rel, GPU scope; `nanovllm.utils.arrival` has the ordering argument); the one that reads
``live - 1``, where ``live`` = cdiv(context length, partition size) counts the partitions that do
not exit early, resets the counter to 0 for the next layer (or graph replay) and merges all partials
as the separate reduce kernel did: the rows' global max, weights 2^(max - global max), float32 sums
(`_merge_partials`). Ordering across kernels: every kernel of the step waits for its predecessor
(`nanovllm.utils.pdl`) before touching step data, the counters included, so the next user of a
counter sees the reset. Nothing spins, so programs need not be resident together. The merge reads
``live x rows x HEAD_DIM`` floats (4 KB for 4 partitions of a GQA group of 2 at head dim 128).
Compiled for sm90 (4 warps, head dim 128) v2 keeps its shared memory and spills nothing; registers
per thread at GQA groups 2/4/8: bf16 140/140/128 -> 141/146/140, FP8 132/134/134 -> 132/132/132, 5
query tokens at group 2 (bf16) 140 -> 148 (before `_global_max` moved its reduction out of the
loop). That is 3 programs per SM as before, except bf16 at group 8 (4 before): the atomic alone
takes ptxas there, and with ``maxnreg=128`` every variant fits in 128 registers without spills (not
measured; v1 compiles without any of this).

Several query tokens per sequence (``query_start_loc``; speculative verification's few tokens over
a long prefix) take the same path: a program's rows are then its sequence's query tokens times
the GQA group, each masked causally at its own position, and the partitions and the merge work
per query row (one counter for all of a program's rows). The prefill kernel would give such a step
one program per sequence and KV head.

A context of length 0 (padding rows of a CUDA-graph batch) yields zeros. With an FP8 cache the
key scale is folded into the softmax scale per KV head and the value scale is applied once to
the output, and each query row's own token comes from the step's K/V (``new_key``/``new_value``),
unrounded: the online softmax starts from it and the cache's tiles mask it (`_start`).

Heuristic (:func:`choose_num_partitions`): with few sequences (``num_seqs * num_kv_heads`` programs
per partition < 1.5 x SMs, one wave or less) up to 3 x SMs programs, and each sequence cuts its own
length into its partitions (whole tiles; two tiles or fewer stay whole; see "Own lengths" below);
otherwise 512 tokens below 3 x SMs programs per partition, else 1024 (FP8: v1, see below), the same
partition size for every sequence. v1 whenever ``max_context_len`` fits in one partition. Measured on an
H100 (132 SMs), bf16, 8 KV heads, head dim 128, block 16, us per call in a CUDA graph
(``scripts/bench_attention.py --sweep``; * = the heuristic's pick, for batches 1-16 the earlier rule
below; the first rows' short partitions were measured on an H200, the same column otherwise within 1 us;
v2 then merged in a separate reduce kernel):

=====  ======  =======  ======  ======  ======  ======  =======  =======
batch  ctx     v1       ps=64   ps=128  ps=256  ps=512  ps=1024  ps=2048
=====  ======  =======  ======  ======  ======  ======  =======  =======
1      512     11.4     6.3*    5.9     9.0     -       -        -
1      2048    40.4     8.1*    7.5     11.6    13.3    24.5     -
1      8192    208.6    26.1    19.8    16.8*   17.7    37.5     54.0
4      512     14.9     7.7*    8.5     11.3    -       -        -
4      2048    58.9     17.1    15.1    15.6*   18.2    37.4     -
4      8192    220.3    71.1    54.3    46.9*   49.0    48.9     67.0
16     512     19.5     17.0    16.6    14.4*   -       -        -
16     2048    75.5     53.9    45.5    46.3*   50.6    47.5     -
16     8192    287.1    204.3   164.7   149.3*  147.9   145.6    173.5
32     512     29.7*    -       -       33.6    -       -        -
32     2048    98.4     -       -       104.1   100.9*  110.6    -
32     8192    372.1    -       -       378.9   372.9*  385.7    370.0
64     2048    212.7    -       -       196.7   196.5   190.3*   -
64     8192    825.8    -       -       753.9   741.4   728.8*   749.4
128    512     97.9*    -       -       104.4   -       -        -
128    2048    368.6    -       -       384.6   379.5   382.2*   -
128    8192    1447.1   -       -       1504.2  1466.3  1440.7*  1448.8
256    2048    748.5    -       -       762.7   748.7   735.3*   -
256    8192    2970.8   -       -       3003.9  2930.1  2885.9*  2863.4
=====  ======  =======  ======  ======  ======  ======  =======  =======

The pick is within 8% of the row's best everywhere (4% from batch 4 on); v1 alone loses up to 13x at small batches
and 13% at batch 64 (a partial second wave of programs), so there is no cliff where the path
switches. With a CUDA graph's ``max_context_len`` = 8192 over real contexts of 2048, v2 costs
1-3% over its time at ``max_context_len`` = 2048 (2 us at batch 4); partitions past a length exit at once.
Scoring by elementwise multiply-reduce instead of ``tl.dot`` (group padded to 16) measured
2.6-4.2x slower at every shape, so only ``tl.dot`` is kept.

Own lengths: the rule behind the table's picks for batches 1-16 took the shortest partitions of 64, 128 or 256
tokens that kept the grid within 2 x SMs programs for ``max_context_len``, which the engine's CUDA graphs set
to ``max_model_len``: at batch 1 under a graph of 4,096 tokens every context was cut into 128-token
partitions, at batch 4-16 into 256-token ones, however short it was. Now the grid has up to 3 x SMs //
(sequences x KV heads) partitions per sequence and KV head (at most one per 64 tokens of ``max_context_len``),
and each sequence sizes them from its own length: cdiv(length, partitions) rounded up to whole tiles, one
partition up to two tiles (a merge costs more than a second tile). On the H200 (calls CJ and CK,
max_context_len 4,096, us per call, before -> after): batch 1 at 640 / 1,152 tokens 7.4 / 8.7 -> 6.6 / 7.8,
batch 4 10.9 / 13.2 -> 7.7 / 10.0, batch 16 16.7 / 28.8 -> 16.1 / 26.2, FP8 at batch 4 and 640 tokens 12.7 ->
9.3. Aiming at 2 x SMs programs was slower from batch 8 (batch 24 at 4,096 tokens 151.7 against 103.4 us), at
4 x SMs at some long contexts (batch 16 at 4,096 tokens 91.7 against 72.8; ``--num-seqs 16`` 1.69 / 1.67 ms
per step against 1.62 at 3 x SMs in CJ). Short contexts cost a little more: bf16 up to 128 tokens at batch
4-16 +0.2-1.0 us, though both rules keep them whole, and FP8 up to 256 tokens at batch 1 and 16 +0.3-1.6 us,
where FP8 at batch 4 gains 2.5-3.7 us (not explained; a one-wave grid's fixed costs). ``bench.py --num-seqs
1`` (128-token prompts, 1,024 tokens out) went 0.86 -> 0.82 ms per step, ``--num-seqs 16`` 1.67 -> 1.63 ms,
``bench.py`` 4.82 / 4.86 -> 4.84 / 4.87 ms (CK / CJ; its 256 sequences take the other path, with one compare
more per program). With ``num_partitions`` given, every sequence takes the same partition size, as before.

FP8: the first version widened FP8 to bfloat16 and ran at only 0.85-0.9x flash-attn bf16's time
(bound by the conversion, not memory). Widening to float16 (native ``cvt.rn.f16x2.e4m3x2``, checked
in the sm90 PTX) with 128-token tiles replaced it. On the H200 (``bench_attention.py``, the bench's
mix of 256 sequences of 200-2,048 tokens) it took 276 us per call against 285 us with 64-token
tiles, 310 us for bf16 and 326 us for flash-attn bf16: 0.85x flash-attn, at 2.1 TB/s of FP8 KV.
Storing FP8 values dim-major in each block (see `_load_v_dim_major`) brought it to 189 us, 0.58x
flash-attn's 327 us in the same run (3.1 TB/s of FP8 KV); 64-token tiles took 199 us.

FP8 reads half the bytes per token, so a partition's fixed costs (its partial writes, the merge;
a reduce kernel when this was measured) weigh twice as much: from 3 x SMs programs per partition
the FP8 kernel runs v1. On the H200 at the bench's graph ``max_context_len`` of 4096 over the
first n of the bench's mix (call S, us; ps = partition size, * = the pick):

=====  ========  ======  ======  ======  ======
batch  cache     v1      ps=512  ps=1024 ps=2048
=====  ========  ======  ======  ======  ======
48     FP8       53.3    50.5*   54.1    57.3
64     FP8       56.8*   62.7    64.5    63.7
64     bf16      108.7   94.2    96.3*   113.4
128    FP8       96.5*   104.5   102.0   101.1
256    FP8       173.4*  198.8   188.4   181.1
256    bf16      310.2   317.2   317.8*  319.0
=====  ========  ======  ======  ======  ======

``bench.py --kv-cache-dtype fp8`` (same call) went from 3.93 to 3.80 ms per decode step; bf16 was
unchanged with v1 there (5.30 ms either way), so it keeps its 1024-token partitions.

Grid order: the GPU starts a grid's programs roughly in order, and ~500 of them run at a time. Taking
the sequences in row order, the last programs to start could be a long sequence's, running on while
the rest of the GPU idles; taking them longest first (``seq_order``, which the engine builds on the
host with each step's lengths) the short ones fill the tail. On the H200 (call BT, us per call over the
bench's contexts at steps 50/300/600/900 of its run, CUDA graphs): FP8 104.1/107.7/88.9/51.5 ->
102.3/105.5/82.5/49.6, bf16 178.5/184.2/153.3/78.1 -> 175.0/185.0/146.0/78.1; ``bench.py`` decode
5.00 -> 4.89 ms per step (bf16) and 3.61-3.68 -> 3.50 ms (FP8). Only past one wave of (sequence, KV
head) pairs (:func:`longest_first_pays`): below it the order's dependent load at each program's start
only cost (call BV: batch 1 0.86 -> 0.89, batch 16 1.67 -> 1.70 ms per step).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.attention.ops.paged_cache_checks import (
    check_block_tables,
    check_cache,
    check_int_vector,
    check_own_kv,
    check_query,
    check_scales,
    check_sinks,
)
from nanovllm.utils.arrival import arrival_counters, last_to_arrive
from nanovllm.utils.pdl import pdl_start, use_pdl

BLOCK_N = 64  # tokens per K/V tile
FP8_BLOCK_N = 128  # the same bytes per tile from an FP8 cache
# Warps per program with an FP8 cache: on the H200 8 warps made the bench's decode step slower (4.75
# against 3.91 ms per step with dim-major values; 294 against 275 us per call with token-major ones).
FP8_NUM_WARPS = 4
# K/V tiles in flight per program (bf16 and FP8 caches): 3 or 4 were slower on the bench's contexts on the H200
# (call BT, FP8 166 -> 180 us per call over the 256-sequence mix, bf16 306 -> 309 us).
NUM_STAGES = 2
FP8_NUM_STAGES = 2
# Live decode programs per SM that a grid of one wave or less (`longest_first_pays` false) aims at: each sequence's
# own length is cut into up to this many x SMs / (sequences x KV heads) partitions (`choose_num_partitions`).
FEW_PROGRAMS_PER_SM = 3


def _max_registers(split_p: bool, head_dim: int, rows: int, many: bool) -> int | None:
    """A register cap for the program, or None for the compiler's choice.

    bf16 queries at head dim 128 (probabilities split in two bf16 halves, ``SPLIT_P``) compile to 144-150
    registers for sm90, so 3 programs of 4 warps share an SM; at 128 (a few bytes of spill) 4 fit. On the
    H200 (call BU, the bench's contexts): 305 -> 295 us per call over the 256-sequence mix, ``bench.py``
    4.90 -> 4.83 ms per decode step. Only with ``many`` programs (`longest_first_pays`), where programs
    wait for room on an SM; not for FP8 (128 registers already: 96-112 gained nothing), other head dims
    or float16 (under 128 already: a cap makes ptxas use more), or more rows (several query tokens:
    spills grow to kilobytes)."""
    return 128 if many and split_p and head_dim == 128 and rows == 16 else None


LOG2E = 1.4426950408889634


@triton.jit
def _dot_probs(probs, v, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr):
    """``probs @ v`` in float32 with ``probs`` cast to ``v``'s dtype. With ``SPLIT_P`` the bf16 rounding
    of ``probs`` is cancelled by a second dot over the residual: bf16 probabilities alone cost ~2e-3
    relative error, more than the output's own rounding, and decode is bound by memory, not MMA."""
    high = probs.to(v.dtype)
    out = tl.dot(high, v, input_precision=PRECISION)
    if SPLIT_P:
        out = tl.dot((probs - high.to(tl.float32)).to(v.dtype), v, out, input_precision=PRECISION)
    return out


@triton.jit
def _scaled_query(q, scale_log2, k_scale_ptr, kv_head, FP8: tl.constexpr):
    """The query as the dots take it and the factor that turns its dot with K into log2-domain scores.

    An FP8 cache is widened to float16 (one native conversion per pair on sm90; bfloat16 needs
    several), so the query goes to float16 pre-multiplied by the softmax scale (far from float16's
    range) and the key scale joins ``qk_scale``."""
    qk_scale = scale_log2
    if FP8:  # one return: Triton wants one type per return site, and these differ between the branches
        q = (q.to(tl.float32) * scale_log2).to(tl.float16)
        qk_scale = tl.load(k_scale_ptr + kv_head)
    return q, qk_scale


@triton.jit
def _with_sinks(k, v, k_sink_ptr, v_sink_ptr, offsets, v_offsets, sink):
    """K/V tiles [tokens, head_dim] with the rows where `sink` is set read from the float16 sink
    blocks instead (see `LayerKVCache.k_sink`: each laid out as its cache, same units)."""
    k = tl.where(sink[:, None], tl.load(k_sink_ptr + offsets, mask=sink[:, None], other=0.0).to(k.dtype), k)
    v = tl.where(sink[:, None], tl.load(v_sink_ptr + v_offsets, mask=sink[:, None], other=0.0).to(v.dtype), v)
    return k, v


@triton.jit
def _load_v_dim_major(v_cache_ptr, table, tile, valid_end, v_head_offset, stride_vb, stride_vd,
                      HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The V tile [BLOCK_N, HEAD_DIM] from `tile` (a multiple of BLOCK_N or of BLOCK_SIZE) of a dim-major
    value cache (`kv_cache.dim_major`): loaded as [blocks, tokens, dims], each block's tokens one run
    of adjacent entries per dim, which a gathered [tokens, dims] tile could not tell the compiler.

    Unmasked, so that the runs load as vectors: entries past a length (stale or zero, never NaN: the
    stores write none) meet probabilities of 0. Compiled for sm90 (FP8, 128-token tiles, 4 warps) the
    tile loop takes 817 instructions per thread against 1,333 for token-major values, and 128
    registers against 205."""
    TOKENS: tl.constexpr = BLOCK_N if BLOCK_N < BLOCK_SIZE else BLOCK_SIZE  # a tile's tokens per block
    starts = tile + tl.arange(0, BLOCK_N // TOKENS) * TOKENS  # each block's first position in the tile
    token = tl.arange(0, TOKENS)
    dims = tl.arange(0, HEAD_DIM)
    if MASKED:
        blocks = tl.load(table + starts // BLOCK_SIZE, mask=starts < valid_end, other=0).to(tl.int64)
    else:
        blocks = tl.load(table + starts // BLOCK_SIZE).to(tl.int64)
    if BLOCK_N >= BLOCK_SIZE:  # whole blocks: each run starts its block (a known alignment keeps loads wide)
        first = 0
    else:  # part of one block
        first = tl.multiple_of(tile % BLOCK_SIZE, BLOCK_N)
    offsets = ((blocks * stride_vb + first + v_head_offset)[:, None, None] + token[None, :, None]
               + (dims * stride_vd)[None, None, :])
    v = tl.load(v_cache_ptr + offsets)  # in bounds (block 0 past the table); a token mask would stop vector loads
    return tl.reshape(v, [BLOCK_N, HEAD_DIM])


@triton.jit
def _attend_tile(acc, running_max, running_sum, q, q_pos, tile, valid_end,
                 k_cache_ptr, v_cache_ptr, k_sink_ptr, v_sink_ptr, num_sink_blocks, table, head_offset, v_head_offset,
                 qk_scale, stride_cb, stride_ct, stride_vb, stride_vd, HEAD_DIM: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 SINK: tl.constexpr, V_DIM_MAJOR: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr):
    """The online softmax over the ``BLOCK_N`` tokens from ``tile``: tokens at or past ``valid_end`` are
    masked (``MASKED``), and so are those past each row's own position ``q_pos`` (``CAUSAL``). With
    ``SINK`` the tile's tokens in sink blocks come from the float16 sinks."""
    dims = tl.arange(0, HEAD_DIM)
    pos = tile + tl.arange(0, BLOCK_N)
    if MASKED:
        valid = pos < valid_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    offsets = (block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head_offset)[:, None] + dims[None, :]
    v_offsets = offsets  # a value cache with the keys' strides
    if V_DIM_MAJOR:
        v_offsets = (block * stride_vb + pos % BLOCK_SIZE + v_head_offset)[:, None] + dims[None, :] * stride_vd
    if MASKED:
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + offsets).to(q.dtype)
    if V_DIM_MAJOR and not SINK:
        v = _load_v_dim_major(v_cache_ptr, table, tile, valid_end, v_head_offset, stride_vb, stride_vd, HEAD_DIM,
                              BLOCK_SIZE, BLOCK_N, MASKED).to(q.dtype)
    elif MASKED:
        v = tl.load(v_cache_ptr + v_offsets, mask=valid[:, None], other=0.0).to(q.dtype)
    else:
        v = tl.load(v_cache_ptr + v_offsets).to(q.dtype)
    if SINK:
        sink = block < num_sink_blocks
        if MASKED:
            sink = sink & valid
        k, v = _with_sinks(k, v, k_sink_ptr, v_sink_ptr, offsets, v_offsets, sink)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    probs = tl.math.exp2(scores - new_max[:, None])
    alpha = tl.math.exp2(running_max - new_max)
    running_sum = running_sum * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + _dot_probs(probs, v, PRECISION, SPLIT_P)
    return acc, new_max, running_sum


@triton.jit
def _attend_tiles(acc, running_max, running_sum, q, q_pos, lo, hi, valid_end,
                  k_cache_ptr, v_cache_ptr, k_sink_ptr, v_sink_ptr, num_sink_blocks, table, head_offset, v_head_offset,
                  qk_scale, stride_cb, stride_ct, stride_vb, stride_vd, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  SINK: tl.constexpr, V_DIM_MAJOR: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr):
    """:func:`_attend_tile` over the tiles from ``lo`` (a multiple of ``BLOCK_N``) below ``hi``.

    With ``SINK`` the tokens of a sequence's first block (the only sink block) run first, in a loop of
    their own with 16-token tiles and no software pipelining, so that the main loop has no
    branch: pipelined ``BLOCK_N`` tiles there gave the FP8 decode kernel 107 KB of shared memory
    against 41 KB without sinks, two programs per SM instead of five (FP8 decode steps with sink
    blocks 6.34 against 4.91 ms without, on the H200). The main loop then starts mid-tile, so it masks."""
    if SINK:
        SINK_N: tl.constexpr = 16  # tl.dot's smallest N; with 8-token blocks the tile's second block is no sink
        sink_hi = tl.minimum(hi, tl.maximum(lo, BLOCK_SIZE))
        for tile in tl.range(lo, sink_hi, SINK_N, num_stages=1):
            acc, running_max, running_sum = _attend_tile(
                acc, running_max, running_sum, q, q_pos, tile, valid_end, k_cache_ptr, v_cache_ptr, k_sink_ptr,
                v_sink_ptr, num_sink_blocks, table, head_offset, v_head_offset, qk_scale, stride_cb, stride_ct,
                stride_vb, stride_vd, HEAD_DIM, BLOCK_SIZE, SINK_N, True, CAUSAL, True, V_DIM_MAJOR, PRECISION,
                SPLIT_P)
        lo = lo + tl.cdiv(sink_hi - lo, SINK_N) * SINK_N
        valid_end = tl.minimum(valid_end, hi)
    for tile in range(lo, hi, BLOCK_N):
        acc, running_max, running_sum = _attend_tile(
            acc, running_max, running_sum, q, q_pos, tile, valid_end, k_cache_ptr, v_cache_ptr, k_sink_ptr,
            v_sink_ptr, num_sink_blocks, table, head_offset, v_head_offset, qk_scale, stride_cb, stride_ct, stride_vb,
            stride_vd, HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASKED or SINK, CAUSAL, False, V_DIM_MAJOR, PRECISION, SPLIT_P)
    return acc, running_max, running_sum


@triton.jit
def _start(q, own, new_k_ptr, new_v_ptr, k_rows, v_rows, k_offset_ptr, v_scale_ptr, kv_head, ROWS: tl.constexpr,
           HEAD_DIM: tl.constexpr, OWN: tl.constexpr, K_OFFSET: tl.constexpr):
    """The online softmax's first state (acc, running max, running sum): empty, or (``OWN``) each row's
    own token where ``own`` is set, its K/V read unrounded from the step's own (``k_rows``/``v_rows``: per
    row, the offset of its token's head_dim vector) rather than from the FP8 cache, whose tiles then
    mask that position. The key less its offset and the value over its scale are in the units of the
    cache's entries, so the score joins the tiles' unchanged (``q`` carries the softmax scale, see
    `_scaled_query`) and the output's value scale applies to it too.

    First, not last: the two loads are then in flight with the first tile's. At the end of the loop their
    latency showed: on the H200 `bench.py --kv-cache-dtype fp8` took 3.58 against 3.47 ms per decode step."""
    if OWN:
        dims = tl.arange(0, HEAD_DIM)
        k = tl.load(new_k_ptr + k_rows[:, None] + dims[None, :], mask=own[:, None], other=0.0).to(tl.float32)
        v = tl.load(new_v_ptr + v_rows[:, None] + dims[None, :], mask=own[:, None], other=0.0).to(tl.float32)
        if K_OFFSET:
            k = k - tl.load(k_offset_ptr + kv_head * HEAD_DIM + dims)[None, :]
        acc = v / tl.load(v_scale_ptr + kv_head)  # zeros where not own
        running_max = tl.where(own, tl.sum(q.to(tl.float32) * k, axis=1), -1.0e30)
        running_sum = own.to(tl.float32)
    else:
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        running_max = tl.full([ROWS], -1.0e30, tl.float32)
        running_sum = tl.zeros([ROWS], tl.float32)
    return acc, running_max, running_sum


@triton.jit
def _rows(kv_head, q_start, q_len, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """Row r of a program: query token r // GROUP of its sequence (query row ``q_start`` + that), head
    r % GROUP of the KV head's group; returns the rows' query rows, heads and which rows exist."""
    rows = tl.arange(0, ROWS)
    token = rows // GROUP
    return q_start + token, kv_head * GROUP + rows % GROUP, token < q_len


@triton.jit
def _store_out(out_ptr, acc, denom, v_scale_ptr, kv_head, q_row, heads, row_mask, stride_os, stride_oh,
               HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
    """The normalized output of the rows ``acc`` [rows, HEAD_DIM] over ``denom`` [rows]."""
    out = acc / tl.maximum(denom, 1e-30)[:, None]  # empty context: 0 / tiny = 0
    if FP8:
        out = out * tl.load(v_scale_ptr + kv_head)
    dims = tl.arange(0, HEAD_DIM)
    tl.store(out_ptr + q_row[:, None] * stride_os + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _global_max(part_max_ptr, base, row_mask, used, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Each row's largest partition max (row r's partitions at ``base[r]`` on), at least -1e30."""
    maxes = tl.full([ROWS, CHUNK], -1.0e30, tl.float32)  # no partition: stays finite
    for first in tl.range(0, used, CHUNK, num_stages=1):
        idx = first + tl.arange(0, CHUNK)
        live = row_mask[:, None] & (idx < used)[None, :]
        maxes = tl.maximum(maxes, tl.load(part_max_ptr + base[:, None] + idx[None, :], mask=live,
                                          other=float("-inf"), cache_modifier=".cg"))
    return tl.max(maxes, axis=1)  # once, after the loop: Triton 3.6 asserts on this reduction inside it


@triton.jit
def _merge_partials(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, v_scale_ptr, kv_head, q_start, q_len, used,
                    num_partitions, num_heads, stride_os, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    FP8: tl.constexpr, ROWS: tl.constexpr, STAT_CHUNK: tl.constexpr, ACC_CHUNK: tl.constexpr):
    """The output of the program's rows from their ``used`` partitions' partials, each partition
    weighted by 2^(its max - the row's global max); ``ROWS`` covers the rows without ``tl.dot``'s padding.

    Loads with ``.cg`` (from L2): other programs wrote these entries in this kernel, and a line of
    them may sit in this SM's L1 from a merge of other rows (the maxes and sums of several rows share
    lines). The chunks bound the live tiles ([ROWS, ACC_CHUNK, HEAD_DIM] floats) while still loading
    a decode step's few partitions at once."""
    q_row, heads, row_mask = _rows(kv_head, q_start, q_len, GROUP, ROWS)
    base = (q_row * num_heads + heads) * num_partitions
    global_max = _global_max(part_max_ptr, base, row_mask, used, ROWS, STAT_CHUNK)
    dims = tl.arange(0, HEAD_DIM)
    denom = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for first in tl.range(0, used, ACC_CHUNK, num_stages=1):
        idx = first + tl.arange(0, ACC_CHUNK)
        live = row_mask[:, None] & (idx < used)[None, :]
        stat = base[:, None] + idx[None, :]
        weights = tl.math.exp2(tl.load(part_max_ptr + stat, mask=live, other=float("-inf"), cache_modifier=".cg")
                               - global_max[:, None])
        sums = tl.load(part_sum_ptr + stat, mask=live, other=0.0, cache_modifier=".cg")
        denom += tl.sum(sums * weights, axis=1)
        partial = tl.load(part_acc_ptr + stat[:, :, None] * HEAD_DIM + dims[None, None, :], mask=live[:, :, None],
                          other=0.0, cache_modifier=".cg")
        acc += tl.sum(partial * weights[:, :, None], axis=1)
    _store_out(out_ptr, acc, denom, v_scale_ptr, kv_head, q_row, heads, row_mask, stride_os, stride_oh, HEAD_DIM, FP8)


@triton.jit
def _decode_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, counters_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr, seq_order_ptr,
    k_scale_ptr, v_scale_ptr, k_sink_ptr, v_sink_ptr, new_k_ptr, new_v_ptr, k_offset_ptr, num_sink_blocks, scale_log2,
    min_partition_size, whole_up_to, num_partitions, stride_qs, stride_qh, stride_os, stride_oh, stride_cb, stride_ct,
    stride_ch, stride_bt, stride_vb, stride_vh, stride_vd, stride_nkt, stride_nkh, stride_nvt, stride_nvh, num_heads,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, FP8: tl.constexpr, SINK: tl.constexpr, OWN: tl.constexpr, K_OFFSET: tl.constexpr,
    V_DIM_MAJOR: tl.constexpr, SINGLE: tl.constexpr,
    MULTI: tl.constexpr, MERGE_ROWS: tl.constexpr, STAT_CHUNK: tl.constexpr, ACC_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT_P: tl.constexpr, ORDERED: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)  # before the counters too: the previous layer's merges reset them
    if ORDERED:  # the programs launched first take the longest sequences, all their KV heads together
        flat = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        seq = tl.load(seq_order_ptr + flat // tl.num_programs(1))
        kv_head = flat % tl.num_programs(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # the sequence's own length cut into at most num_partitions of at least min_partition_size tokens, or whole up to
    # whole_up_to tokens (see `paged_attention`)
    partition_size = tl.maximum(min_partition_size, tl.cdiv(tl.cdiv(context_len, num_partitions), BLOCK_N) * BLOCK_N)
    if context_len <= whole_up_to:
        partition_size = tl.maximum(partition_size, whole_up_to)
    num_live = 1  # partitions with tokens (one for an empty context, which writes zeros)
    if not SINGLE:  # clamped: a context past max_context_len must not leave its counter short of num_live
        num_live = tl.minimum(tl.maximum(tl.cdiv(context_len, partition_size), 1), num_partitions)
        if part >= num_live:  # never arrives
            return
    start = part * partition_size
    end = tl.minimum(start + partition_size, context_len)

    if MULTI:
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    else:
        q_start = seq
        q_len = 1
    q_row, heads, row_mask = _rows(kv_head, q_start, q_len, GROUP, ROWS)
    q_pos = context_len - q_len + q_row - q_start  # each row's own position: it sees the K/V up to it
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_row[:, None] * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    q, qk_scale = _scaled_query(q, scale_log2, k_scale_ptr, kv_head, FP8)
    head_offset = kv_head * stride_ch
    table = block_tables_ptr + seq * stride_bt

    own = row_mask & (q_pos >= start) & (q_pos < end)  # (OWN) a row's own token is in this partition
    acc, running_max, running_sum = _start(
        q, own, new_k_ptr, new_v_ptr, q_row * stride_nkt + kv_head * stride_nkh, q_row * stride_nvt
        + kv_head * stride_nvh, k_offset_ptr, v_scale_ptr, kv_head, ROWS, HEAD_DIM, OWN, K_OFFSET)
    tiles_end = end
    if OWN and not MULTI:  # the query's own token, the context's last, comes from the step's K/V
        tiles_end = tl.minimum(end, context_len - 1)
    acc, running_max, running_sum = _attend_tiles(
        acc, running_max, running_sum, q, q_pos - OWN, start, tiles_end, tiles_end, k_cache_ptr, v_cache_ptr,
        k_sink_ptr, v_sink_ptr, num_sink_blocks, table, head_offset, kv_head * stride_vh, qk_scale, stride_cb,
        stride_ct, stride_vb, stride_vd, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, MULTI, SINK, V_DIM_MAJOR, PRECISION,
        SPLIT_P)

    if num_live == 1:  # v1, or v2 over a short context: what the merge of one partition gives, without it
        _store_out(out_ptr, acc, running_sum, v_scale_ptr, kv_head, q_row, heads, row_mask, stride_os, stride_oh,
                   HEAD_DIM, FP8)
    else:
        stat = (q_row * num_heads + heads) * num_partitions + part
        tl.store(part_max_ptr + stat, running_max, mask=row_mask)
        tl.store(part_sum_ptr + stat, running_sum, mask=row_mask)
        tl.store(part_acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask[:, None])
        counter = counters_ptr + seq * tl.num_programs(1) + kv_head
        if last_to_arrive(counter, num_live):
            tl.store(counter, 0)  # all live partitions have arrived: zero for the next call (or graph replay)
            _merge_partials(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, v_scale_ptr, kv_head, q_start, q_len,
                            num_live, num_partitions, num_heads, stride_os, stride_oh, GROUP, HEAD_DIM, FP8,
                            MERGE_ROWS, STAT_CHUNK, ACC_CHUNK)


def own_strides(new_key: Tensor | None, new_value: Tensor | None) -> tuple[int, int, int, int]:
    """The token and head strides of the step's own K/V (zeros without them)."""
    if new_key is None:
        return 0, 0, 0, 0
    return new_key.stride(0), new_key.stride(1), new_value.stride(0), new_value.stride(1)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """The device's SMs; an H100's 132 for the CPU (the interpreter), so that it takes the GPU's paths."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


MERGE_ELEMENTS = 4096  # floats of a merge chunk's partials: 32 registers per thread at 4 warps
MERGE_STAT_PARTS = 64  # most partitions per chunk of the maxes
MERGE_ACC_PARTS = 16  # most partitions per chunk of the outputs (as the separate reduce kernel had)


def _merge_constexprs(group: int, max_query_len: int, head_dim: int) -> dict[str, int]:
    """The merge's rows (the group's query rows, without ``tl.dot``'s padding to 16) and partitions per
    chunk: a decode step's few partitions in one load, and no new compilation per partition count."""
    rows = triton.next_power_of_2(group * max_query_len)
    return dict(MERGE_ROWS=rows, STAT_CHUNK=max(1, min(MERGE_STAT_PARTS, MERGE_ELEMENTS // rows)),
                ACC_CHUNK=max(1, min(MERGE_ACC_PARTS, MERGE_ELEMENTS // (rows * head_dim))))


def choose_num_partitions(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device,
                          fp8: bool = False) -> int:
    """Partition count for decode (1 = v1); see the table in the module docstring."""
    num_sms = _sm_count(device)
    programs = num_seqs * num_kv_heads  # per partition
    if fp8 and programs >= 3 * num_sms:
        return 1
    if not longest_first_pays(num_seqs, num_kv_heads, device):  # one wave or less: cut from each own length
        return max(1, min(FEW_PROGRAMS_PER_SM * num_sms // programs, triton.cdiv(max_context_len, BLOCK_N)))
    partition_size = 512 if programs < 3 * num_sms else 1024
    return triton.cdiv(max_context_len, partition_size)


def longest_first_pays(num_seqs: int, num_kv_heads: int, device: torch.device) -> bool:
    """Whether to pass ``seq_order``: only with more (sequence, KV head) pairs than one wave of programs
    takes, where a tail can form (the heuristic's threshold for short partitions, 1.5 x SMs). Below it the
    order's extra dependent load at each program's start is all it brings: batch 1 went 0.86 -> 0.89 ms
    per step and batch 16 1.67 -> 1.70 ms with it (call BV, H200).
    """
    return 2 * num_seqs * num_kv_heads >= 3 * _sm_count(device)


def paged_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    max_context_len: int,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    out: Tensor | None = None,
    num_partitions: int | None = None,
    query_start_loc: Tensor | None = None,
    max_query_len: int = 1,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
    seq_order: Tensor | None = None,
    new_key: Tensor | None = None,
    new_value: Tensor | None = None,
    k_offset: Tensor | None = None,
) -> Tensor:
    """Decode attention: ``query`` ``[num_seqs, num_heads, head_dim]`` over each sequence's first
    ``context_lens[i]`` cached tokens (``<= max_context_len``). Returns ``[num_seqs, num_heads, head_dim]``
    in the query's dtype, written into ``out`` when given.

    ``num_partitions`` = 1 forces v1, > 1 forces v2 with that many partitions of one size (cut from
    ``max_context_len``), ``None`` lets :func:`choose_num_partitions` pick; with one wave of programs or
    less each sequence then sizes its partitions from its own length (the module docstring's "Own lengths").

    With ``query_start_loc`` (``[num_seqs + 1]`` int32) sequence ``i`` has up to ``max_query_len``
    query rows, ``query_start_loc[i]:[i+1]``, the last positions of its context, each attending
    causally (speculative verification: a few tokens over a long prefix). All of a program's rows
    share each K/V tile, and the partitions split the context as for decode, which a prefill
    kernel's grid (one program per sequence and KV head at this size) cannot. Query rows no
    sequence owns (a CUDA graph's padding) are not written: zeroing them cost a fill kernel per
    layer, which also broke the chain of PDL launches.

    ``k_sink``/``v_sink`` (an FP8 cache's float16 first blocks, see ``check_sinks``): the tokens of
    blocks below ``k_sink.shape[0]``, which must be sequences' first blocks, are read from them.

    ``seq_order`` (``[num_seqs]`` int32, a permutation of the sequences, longest first): the order in
    which the grid's programs take the sequences, all KV heads of one after another. The GPU starts
    programs in grid order, so in row order a long sequence's programs may start last and run alone
    while the rest of the GPU idles; longest first, the short ones fill the tail.

    ``new_key``/``new_value`` (FP8 only; ``[tokens, num_kv_heads, head_dim]``, the step's own K/V, row
    for row with the query) and ``k_offset`` (the offset the store took off the keys, see `store_kv`):
    each query row reads its own position's K/V from them, unrounded, instead of from the cache.
    """
    v_dim_major = check_cache(key_cache, value_cache, block_size)
    fp8 = check_scales(key_cache, k_scale, v_scale)
    num_sink_blocks = check_sinks(key_cache, value_cache, k_sink, v_sink)
    group = check_query(query, key_cache)
    own = check_own_kv(query, key_cache, new_key, new_value, k_offset)
    num_heads, head_dim = query.shape[1:]
    multi = query_start_loc is not None
    if max_query_len < 1 or (max_query_len > 1 and not multi):
        raise ValueError(f"max_query_len ({max_query_len}) must be >= 1, and 1 without query_start_loc")
    num_seqs = block_tables.shape[0] if multi else query.shape[0]
    num_kv_heads = key_cache.shape[2]
    check_block_tables(block_tables, num_seqs)
    check_int_vector("context_lens", context_lens, num_seqs)
    if multi:
        check_int_vector("query_start_loc", query_start_loc, num_seqs + 1)
    if seq_order is not None:
        check_int_vector("seq_order", seq_order, num_seqs)
    if not 0 <= max_context_len <= block_tables.shape[1] * block_size:
        raise ValueError(f"max_context_len ({max_context_len}) must be in [0, block table capacity "
                         f"{block_tables.shape[1] * block_size}]")
    if num_partitions is not None and num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1 or None, got {num_partitions}")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1 or multi:
        raise ValueError(f"out must be {query.dtype} {tuple(query.shape)} with a contiguous head_dim "
                         f"(and no query_start_loc), got {out.dtype} {tuple(out.shape)}")
    if num_seqs == 0:
        return out
    chosen = num_partitions is None
    if chosen:
        num_partitions = choose_num_partitions(num_seqs, num_kv_heads, max_context_len, query.device, fp8)
    block_n = FP8_BLOCK_N if fp8 else BLOCK_N
    partition_size = triton.cdiv(triton.cdiv(max(max_context_len, 1), num_partitions), block_n) * block_n
    num_partitions = triton.cdiv(max(max_context_len, 1), partition_size)
    many = longest_first_pays(num_seqs, num_kv_heads, query.device)
    # A one-wave grid cuts each sequence's own length into up to num_partitions (each a multiple of block_n), but
    # keeps two tiles or fewer whole: a merge costs more than a second tile. Otherwise, or with num_partitions
    # given, every sequence takes the same partition size.
    few = chosen and not many
    min_partition_size = block_n if few else partition_size
    whole_up_to = 2 * block_n if few else 0
    single = num_partitions == 1
    rows = max(16, triton.next_power_of_2(max_query_len * group))  # tl.dot needs M >= 16
    if single:
        part_acc = part_max = part_sum = out  # unused
        counters = context_lens  # unused
    else:
        part_max = torch.empty(query.shape[0], num_heads, num_partitions, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(query.shape[0], num_heads, num_partitions, head_dim, dtype=torch.float32,
                               device=query.device)
        counters = arrival_counters(query.device, num_seqs * num_kv_heads)
    pdl = use_pdl(query.device)
    split_p = query.dtype == torch.bfloat16 and not fp8
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_max, part_sum, counters,
        query, key_cache, value_cache, block_tables, context_lens, query_start_loc, seq_order, k_scale, v_scale,
        k_sink, v_sink, new_key, new_value, k_offset, num_sink_blocks, scale * LOG2E, min_partition_size, whole_up_to,
        num_partitions, query.stride(0), query.stride(1), out.stride(0), out.stride(1), *key_cache.stride()[:3],
        block_tables.stride(0), value_cache.stride(0), value_cache.stride(2), value_cache.stride(3),
        *own_strides(new_key, new_value), num_heads,
        GROUP=group, ROWS=rows, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        FP8=fp8, SINK=num_sink_blocks > 0, OWN=own, K_OFFSET=k_offset is not None, V_DIM_MAJOR=v_dim_major,
        SINGLE=single, MULTI=multi,
        **_merge_constexprs(group, max_query_len, head_dim),
        PRECISION="ieee" if query.dtype == torch.float32 and not fp8 else "tf32",
        SPLIT_P=split_p, ORDERED=seq_order is not None,
        PDL=pdl, num_warps=FP8_NUM_WARPS if fp8 else 4, num_stages=FP8_NUM_STAGES if fp8 else NUM_STAGES,
        maxnreg=_max_registers(split_p, head_dim, rows, many),
        launch_pdl=pdl,
    )
    return out

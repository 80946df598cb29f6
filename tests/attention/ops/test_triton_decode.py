"""Triton decode (PagedAttention v1 and v2) against the float32 torch reference.

On CPU the kernels run in Triton's interpreter (see triton_cpu.py) on small shapes; the
``gpu`` tests sweep block sizes, head dims, GQA ratios and contexts on CUDA, FP8 caches and a
padded batch replayed in a CUDA graph.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton_cpu  # noqa: F401  (before the kernels: interpreter on CPU)
from paged_kv_case import PagedKV

from nanovllm.attention.ops.paged_attention_ref import paged_attention_v1, paged_prefill_attention
from nanovllm.attention.ops.triton_decode import choose_num_partitions, longest_first_pays, paged_attention
from nanovllm.utils.arrival import arrival_counters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def decode(case, query, max_context_len=None, sinks=True, **kwargs):
    """The kernel over the case's cache (and its sink blocks unless `sinks` is False)."""
    max_context_len = case.block_tables.shape[1] * case.block_size if max_context_len is None else max_context_len
    return paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, case.block_size,
                           max_context_len, query.shape[-1] ** -0.5, case.k_scale, case.v_scale,
                           k_sink=case.k_sink if sinks else None, v_sink=case.v_sink if sinks else None, **kwargs)


def reference(case, query):
    """Float32 reference over the (dequantized) cache, returned in the query's dtype as the kernel is."""
    key_cache, value_cache = case.float_caches()
    out = paged_attention_v1(query.float(), key_cache, value_cache, case.block_tables, case.lens, case.block_size,
                             case.block_tables.shape[1] * case.block_size, query.shape[-1] ** -0.5)
    return out.to(query.dtype)


# -- CPU (interpreter) ----------------------------------------------------------------------------

SHAPES = [(8, 2, 64, 16), (6, 2, 128, 32), (4, 4, 64, 16), (16, 2, 64, 64)]  # (heads, kv heads, head dim, block)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-3}


CASES = [(shape, torch.float32) for shape in SHAPES] + [(SHAPES[0], torch.float16), (SHAPES[1], torch.bfloat16)]


@pytest.mark.parametrize("num_partitions", [1, 3, None])
@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_decode_matches_reference(shape, dtype, num_partitions):
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block = shape
    case = PagedKV([1, block, 2 * block + 5, 0, 77], kv_heads, head_dim, block, dtype, DEVICE)
    query = torch.randn(5, heads, head_dim, device=DEVICE).to(dtype)
    out = decode(case, query, num_partitions=num_partitions)
    assert out.shape == query.shape and out.dtype == dtype
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # empty context (a padding row) -> zeros
    assert rel_err(out, reference(case, query)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_fp8_cache_matches_dequantized_reference(dtype):
    torch.manual_seed(1)
    case = PagedKV([3, 40, 100], 2, 64, 16, dtype, DEVICE, fp8=True)
    query = torch.randn(3, 8, 64, device=DEVICE).to(dtype)
    for num_partitions in (1, 2):  # an FP8 cache is multiplied in float16: 1e-3 even for a float32 query
        assert rel_err(decode(case, query, num_partitions=num_partitions), reference(case, query)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 64])  # 64: the first block spans four of the sink loop's 16-token tiles
def test_decode_reads_first_blocks_from_float16_sinks(dtype, block):
    torch.manual_seed(6)
    case = PagedKV([3, 40, 100, 0], 2, 64, block, dtype, DEVICE, fp8=True, sinks=True)
    query = torch.randn(4, 8, 64, device=DEVICE).to(dtype)
    ref = reference(case, query)
    for num_partitions in (1, 2):
        assert rel_err(decode(case, query, num_partitions=num_partitions), ref) < 2e-3
    assert rel_err(decode(case, query, sinks=False), ref) > 5e-3  # their FP8 copies give another answer


def verify_case(q_lens, lens, heads, kv_heads, head_dim, block, dtype, fp8=False, pad_tokens=2, sinks=False):
    """Several query tokens per sequence (the last q_lens[i] positions of lens[i]), tokens no sequence
    owns after them; returns the case, the query, query_start_loc and the float32 causal reference."""
    case = PagedKV(lens, kv_heads, head_dim, block, dtype, DEVICE, fp8=fp8, sinks=sinks)
    query = torch.randn(sum(q_lens) + pad_tokens, heads, head_dim, device=DEVICE).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return case, query, qsl, causal_reference(case, query, qsl)


def causal_reference(case, query, qsl, **own):
    """Float32 reference of the query rows the sequences own (``qsl``) over the case's current lengths
    (each query's own K/V from ``own``'s new_key/new_value when given)."""
    key_cache, value_cache = case.float_caches()
    cu_k = torch.cat([case.lens.new_zeros(1), case.lens.cumsum(0)]).int()
    ref = paged_prefill_attention(query[: qsl[-1]].float(), key_cache, value_cache, qsl, cu_k, case.block_tables,
                                  query.shape[-1] ** -0.5, **own)
    return ref.to(query.dtype)


def own_kv(num_tokens, kv_heads, head_dim, dtype):
    """A step's own K/V of the cache's magnitude, and a key offset (see `LayerKVCache`)."""
    return dict(new_key=torch.randn(num_tokens, kv_heads, head_dim, device=DEVICE).to(dtype),
                new_value=torch.randn(num_tokens, kv_heads, head_dim, device=DEVICE).to(dtype),
                k_offset=torch.randn(kv_heads, head_dim, device=DEVICE))


@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_decode_reads_each_querys_own_kv_from_the_step(dtype, sinks):
    """Each sequence's last position comes from new_key/new_value (the key less k_offset), not from the
    cache: v1, equal partitions, and partitions cut from each own length (one partition of 129 tokens
    holds only the own token), against the float32 reference prefill of one token per sequence."""
    torch.manual_seed(9)
    lens = [3, 40, 100, 129]
    case = PagedKV(lens, 2, 64, 16, dtype, DEVICE, fp8=True, sinks=sinks)
    query = torch.randn(len(lens), 8, 64, device=DEVICE).to(dtype)
    own = own_kv(len(lens), 2, 64, dtype)
    ref = causal_reference(case, query, torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE), **own)
    for num_partitions in (1, 2, None):
        assert rel_err(decode(case, query, num_partitions=num_partitions, **own), ref) < 2e-3
    assert rel_err(decode(case, query), ref) > 5e-2  # the cache's entries at the last positions


def test_fp8_decode_of_several_query_tokens_reads_each_own_kv():
    torch.manual_seed(10)
    q_lens, lens = VERIFY
    case, query, qsl, _ = verify_case(q_lens, lens, 8, 2, 64, 16, torch.float32, fp8=True)
    own = own_kv(query.shape[0], 2, 64, torch.float32)
    ref = causal_reference(case, query, qsl, **own)
    for num_partitions in (1, 2):
        out = decode(case, query, num_partitions=num_partitions, query_start_loc=qsl, max_query_len=5, **own)
        assert rel_err(out[: sum(q_lens)], ref) < 2e-3


# speculative verification (k + 1 tokens over a long prefix), fewer tokens in some rows, a padding
# row of the CUDA graph (no tokens, length 0), and a context as short as its query
VERIFY = ([5, 3, 0, 5], [77, 40, 0, 5])


@pytest.mark.parametrize("num_partitions", [1, 3, None])
@pytest.mark.parametrize("shape,dtype", [((9, 3, 64, 16), torch.float32), ((8, 2, 128, 32), torch.float32),
                                         ((4, 4, 64, 16), torch.bfloat16)], ids=str)
def test_decode_of_several_query_tokens_is_causal(shape, dtype, num_partitions):
    torch.manual_seed(4)
    q_lens, lens = VERIFY
    case, query, qsl, ref = verify_case(q_lens, lens, *shape, dtype)
    out = decode(case, query, num_partitions=num_partitions, query_start_loc=qsl, max_query_len=max(q_lens))
    assert out.shape == query.shape and out.dtype == dtype
    assert rel_err(out[: sum(q_lens)], ref) < TOL[dtype]


def test_decode_of_several_query_tokens_fp8_and_bad_input():
    torch.manual_seed(5)
    q_lens, lens = VERIFY
    case, query, qsl, ref = verify_case(q_lens, lens, 8, 2, 64, 16, torch.float32, fp8=True)
    out = decode(case, query, num_partitions=2, query_start_loc=qsl, max_query_len=5)
    assert rel_err(out[: sum(q_lens)], ref) < 2e-3
    with pytest.raises(ValueError, match="max_query_len"):
        decode(case, query, max_query_len=5)  # several tokens need query_start_loc
    with pytest.raises(ValueError, match="query_start_loc"):
        decode(case, query, query_start_loc=qsl[:-1], max_query_len=5)


def test_decode_of_several_query_tokens_reads_float16_sinks():
    torch.manual_seed(7)
    q_lens, lens = VERIFY
    case, query, qsl, ref = verify_case(q_lens, lens, 8, 2, 64, 16, torch.float32, fp8=True, sinks=True)
    out = decode(case, query, num_partitions=2, query_start_loc=qsl, max_query_len=5)
    assert rel_err(out[: sum(q_lens)], ref) < 2e-3
    with pytest.raises(ValueError, match="k_sink"):  # float16 only
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, 16, 80, 0.125,
                        case.k_scale, case.v_scale, k_sink=case.k_sink.float(), v_sink=case.v_sink)


# two calls over one case with 64-token partitions of 256 tokens: sequences whose 4, 3 or 2 partitions
# have tokens (the others exit at once and never arrive), one of 1 (written directly) and empty ones
SPLIT_LENS = ([200, 100, 0, 130, 1, 256], [190, 65, 0, 3, 1, 129])  # the second within the first's blocks
SPLIT_Q_LENS = [3, 2, 0, 3, 1, 3]


@pytest.mark.parametrize("multi", [False, True], ids=["decode", "verify"])
def test_split_kv_merges_in_the_last_partition_and_resets_its_counter(multi):
    """v2's partials are merged by the last partition of each (sequence, KV head) to arrive, which
    leaves the counter at 0: the second call over the same counters must find the last arrival again
    (left unreset, or counted against all partitions, a merge is skipped and rows stay NaN or zero)."""
    torch.manual_seed(8)
    case = PagedKV(SPLIT_LENS[0], 2, 64, 16, torch.float32, DEVICE)
    qsl = torch.tensor([0, *torch.tensor(SPLIT_Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    rows = sum(SPLIT_Q_LENS) if multi else len(SPLIT_LENS[0])
    for lens in SPLIT_LENS:
        case.lens.copy_(torch.tensor(lens, dtype=torch.int32))
        query = torch.randn(rows, 8, 64, device=DEVICE)
        if multi:
            out = decode(case, query, 256, num_partitions=4, query_start_loc=qsl, max_query_len=max(SPLIT_Q_LENS))
            ref = causal_reference(case, query, qsl)
        else:
            out = decode(case, query, 256, num_partitions=4, out=torch.full_like(query, float("nan")))
            ref = reference(case, query)
        assert not arrival_counters(query.device, 0).any()
        assert rel_err(out, ref) < 1e-5


# one wave of programs (6 sequences x 8 KV heads) with the partition count chosen for a CUDA graph's
# max_context_len (2,048) far past most contexts: each sequence's own length is cut into up to 8 partitions
# of whole tiles (bf16: 1,500 tokens into 8 of 192, 300 into 5 of 64, 129 into 3; FP8's 128-token tiles:
# 6 of 256, 3 of 128), two tiles or fewer stay whole (128 and 1 tokens; FP8: up to 256)
OWN_LENS, OWN_Q_LENS = [1500, 129, 128, 0, 300, 1], [3, 2, 1, 0, 3, 1]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("multi", [False, True], ids=["decode", "verify"])
def test_one_wave_cuts_each_sequence_by_its_own_length(fp8, multi):
    """Partitions of different sizes in one grid (one per sequence, from its length) merge into the
    reference, and every merge resets its counter (a count of live partitions that disagreed with the
    partitions' bounds would leave a counter short, or a row unmerged)."""
    torch.manual_seed(10)
    case = PagedKV(OWN_LENS, 8, 64, 16, torch.bfloat16, DEVICE, fp8=fp8, extra_cols=34)
    capacity = case.block_tables.shape[1] * 16
    assert capacity == 2048 and choose_num_partitions(len(OWN_LENS), 8, capacity, torch.device(DEVICE)) == 8
    if multi:
        qsl = torch.tensor([0, *torch.tensor(OWN_Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        query = torch.randn(sum(OWN_Q_LENS) + 2, 16, 64, device=DEVICE).bfloat16()
        out = decode(case, query, query_start_loc=qsl, max_query_len=3)[: sum(OWN_Q_LENS)]
        ref = causal_reference(case, query, qsl)
    else:
        query = torch.randn(len(OWN_LENS), 16, 64, device=DEVICE).bfloat16()
        out, ref = decode(case, query, out=torch.full_like(query, float("nan"))), reference(case, query)
    assert not arrival_counters(query.device, 0).any()
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("num_partitions", [1, 4])
@pytest.mark.parametrize("multi", [False, True], ids=["decode", "verify"])
def test_longest_first_order_writes_every_row_as_row_order_does(num_partitions, multi):
    """With ``seq_order`` the grid's programs take the sequences longest first: every (sequence, KV
    head) must still be computed once, into its own rows (a program mapped to the wrong row, or a
    pair left out, leaves NaN or another row's output)."""
    torch.manual_seed(9)
    case = PagedKV(SPLIT_LENS[0], 2, 64, 16, torch.float32, DEVICE)
    order = torch.argsort(case.lens, descending=True, stable=True).int()
    qsl = torch.tensor([0, *torch.tensor(SPLIT_Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    rows = sum(SPLIT_Q_LENS) if multi else len(SPLIT_LENS[0])
    query = torch.randn(rows, 8, 64, device=DEVICE)
    if multi:
        kwargs = dict(query_start_loc=qsl, max_query_len=max(SPLIT_Q_LENS))
        ref = causal_reference(case, query, qsl)
    else:
        kwargs = dict(out=torch.full_like(query, float("nan")))
        ref = reference(case, query)
    out = decode(case, query, 256, num_partitions=num_partitions, seq_order=order, **kwargs)
    assert order.tolist() != list(range(len(order)))
    assert rel_err(out, ref) < 1e-5
    if not multi:
        kwargs["out"] = None
    assert torch.equal(out, decode(case, query, 256, num_partitions=num_partitions, **kwargs))


COMPILE_SM90 = Path(__file__).resolve().parents[3] / "scripts" / "compile_sm90.py"


def test_sm90_build_publishes_partials_before_arriving():
    """Compiled for sm90 (no GPU needed; the interpreter runs programs one by one and shows no
    ordering): the partial stores, then a CTA barrier, then one acq_rel GPU-scope atomic, and after
    it only the merge's loads, all from L2 (.cg). (Here Triton puts a barrier of its own before the
    atomic too, for the shared memory of its result, so this cannot tell that `_last_to_arrive`'s
    barrier is there.)"""
    run = subprocess.run([sys.executable, str(COMPILE_SM90), "--shape", "2", "1", "128", "16", "--ptx"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = run.stdout
    atoms = [m.start() for m in re.finditer(r"\batom\.", ptx)]
    assert len(atoms) == 1 and re.match(r"atom\.global\.gpu\.acq_rel\.add", ptx[atoms[0]:])
    before = ptx[: atoms[0]]
    assert "bar.sync" in before[before.rindex("st.global"):]  # every thread's partials, then the atomic
    merge_loads = re.findall(r"ld\.global[.\w]*", ptx[atoms[0]:])
    assert merge_loads and all(load.startswith("ld.global.cg") for load in merge_loads), merge_loads


def test_decode_into_out():
    torch.manual_seed(2)
    case = PagedKV([5, 50], 3, 64, 16, torch.float32, DEVICE)
    query = torch.randn(2, 9, 64, device=DEVICE)
    out = torch.full_like(query, float("nan"))
    assert decode(case, query, out=out) is out
    assert rel_err(out, reference(case, query)) < 1e-5


def test_partition_heuristic():
    cpu = torch.device("cpu")  # taken as an H100's 132 SMs
    assert choose_num_partitions(512, 8, 1024, cpu) == 1  # one partition of 1024 tokens: v1
    assert choose_num_partitions(512, 8, 8192, cpu) == 8
    assert choose_num_partitions(32, 8, 8192, cpu) == 16
    # one wave or less: up to 3 x SMs programs (each sequence's partitions cut from its own length)
    assert choose_num_partitions(1, 8, 8192, cpu) == 49
    assert choose_num_partitions(1, 8, 200, cpu) == 4  # at most one per 64 tokens of max_context_len
    assert choose_num_partitions(4, 8, 2048, cpu) == 12
    assert choose_num_partitions(16, 8, 4096, cpu) == 3
    assert choose_num_partitions(64, 8, 4096, cpu, fp8=True) == 1  # FP8 from 3 x SMs programs: v1
    assert choose_num_partitions(48, 8, 4096, cpu, fp8=True) == 8  # below: as bf16
    assert choose_num_partitions(64, 8, 4096, cpu) == 4


def test_longest_first_only_past_one_wave_of_sequence_head_pairs():
    cpu = torch.device("cpu")  # counted as 132 SMs
    assert not longest_first_pays(1, 8, cpu) and not longest_first_pays(16, 8, cpu)
    assert not longest_first_pays(24, 8, cpu) and longest_first_pays(25, 8, cpu)  # 1.5 x 132 = 198 pairs
    assert longest_first_pays(256, 8, cpu)


def test_decode_rejects_bad_input():
    case = PagedKV([5], 2, 64, 16, torch.float32, DEVICE)
    query = torch.randn(1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, 32, 16, 0.1)
    bad_block = PagedKV([5], 2, 64, 16, torch.float32, DEVICE).key_cache[:, :12]
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(query, bad_block, bad_block, case.block_tables, case.lens, 12, 12, 0.1)
    odd_dim = torch.randn(3, 16, 2, 96)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        paged_attention(torch.randn(1, 4, 96), odd_dim, odd_dim, case.block_tables, case.lens, 16, 16, 0.1)
    fp8 = case.key_cache.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        paged_attention(query, fp8, fp8, case.block_tables, case.lens, 16, 16, 0.1)
    with pytest.raises(ValueError, match="only allowed with an fp8"):
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, 16, 16, 0.1,
                        torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(torch.randn(1, 3, 64), case.key_cache, case.value_cache, case.block_tables, case.lens,
                        16, 16, 0.1)
    with pytest.raises(ValueError, match="context_lens"):
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens.long(), 16, 16, 0.1)
    with pytest.raises(ValueError, match="max_context_len"):
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, 16, 10**6, 0.1)
    with pytest.raises(ValueError, match="seq_order"):
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, 16, 16, 0.1,
                        seq_order=torch.zeros(2, dtype=torch.int32))
    own = own_kv(1, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="with an fp8 cache"):
        paged_attention(query, case.key_cache, case.value_cache, case.block_tables, case.lens, 16, 16, 0.1,
                        new_key=own["new_key"], new_value=own["new_value"])
    fp8_case = PagedKV([5], 2, 64, 16, torch.float32, DEVICE, fp8=True)
    fp8_args = (query, fp8_case.key_cache, fp8_case.value_cache, fp8_case.block_tables, fp8_case.lens, 16, 16, 0.1,
                fp8_case.k_scale, fp8_case.v_scale)
    with pytest.raises(ValueError, match="go together"):
        paged_attention(*fp8_args, new_key=own["new_key"])
    with pytest.raises(ValueError, match=r"new_value must be \[tokens, num_kv_heads, head_dim\] = \(1, 2, 64\)"):
        paged_attention(*fp8_args, new_key=own["new_key"], new_value=own["new_value"][:, :1])
    with pytest.raises(ValueError, match="k_offset must be"):
        paged_attention(*fp8_args, new_key=own["new_key"], new_value=own["new_value"], k_offset=own["k_offset"].half())


# -- GPU ------------------------------------------------------------------------------------------


def sweep_cases(seed, count):
    """Random (heads, kv heads, head dim, block, lens) over the issue's grid: blocks 16/32/64/256,
    head dims 64/128, GQA 1/2/4/8, contexts 1-4096 (a padding row of length 0 in every batch)."""
    rng = random.Random(seed)
    for _ in range(count):
        kv_heads, group = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4, 8])
        lens = [rng.choice([rng.randint(1, 64), rng.randint(1, 4096)]) for _ in range(rng.randint(1, 8))] + [0]
        yield kv_heads * group, kv_heads, rng.choice([64, 128]), rng.choice([16, 32, 64, 256]), lens


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_partitions", [1, 4, None])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_sweep(num_partitions, fp8):
    worst = 0.0
    for heads, kv_heads, head_dim, block, lens in sweep_cases(seed=num_partitions or 0, count=24):
        case = PagedKV(lens, kv_heads, head_dim, block, torch.bfloat16, DEVICE, fp8=fp8)
        query = torch.randn(len(lens), heads, head_dim, device=DEVICE).bfloat16()
        out = decode(case, query, num_partitions=num_partitions)
        assert not out.isnan().any() and torch.equal(out[-1], torch.zeros_like(out[-1]))
        worst = max(worst, rel_err(out, reference(case, query)))
    print(f"decode {'fp8' if fp8 else 'bf16'} partitions={num_partitions}: worst rel err {worst:.2e}")
    assert worst <= (4e-3 if fp8 else 2e-3)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_of_several_query_tokens_sweep(fp8):
    worst, rng = 0.0, random.Random(7)
    for heads, kv_heads, head_dim, block, lens in sweep_cases(seed=11, count=24):
        q_lens = [min(n, rng.randint(1, max(1, 64 // (heads // kv_heads)) if rng.random() < 0.3 else 5))
                  for n in lens]
        case, query, qsl, ref = verify_case(q_lens, lens, heads, kv_heads, head_dim, block, torch.bfloat16, fp8)
        out = decode(case, query, query_start_loc=qsl, max_query_len=max(q_lens))
        owned = out[: sum(q_lens)]  # the rest (padding) is not written
        err = rel_err(owned, ref)
        shape = f"group {heads // kv_heads}, {kv_heads} KV heads, head dim {head_dim}, block {block}"
        assert not owned.isnan().any() and err <= (4e-3 if fp8 else 2e-3), (shape, lens, q_lens, err)
        worst = max(worst, err)
    print(f"decode of several query tokens {'fp8' if fp8 else 'bf16'}: worst rel err {worst:.2e}")
    assert worst <= (4e-3 if fp8 else 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_decode_in_cuda_graph_padded_batch(fp8):
    """Captured once for a padded batch and max_model_len, replayed with new lengths and queries (FP8:
    and the step's own K/V, which each query reads for its own position)."""
    torch.manual_seed(3)
    lens = [700, 33, 1, 2048, 0, 0]  # the last two are padding rows
    case = PagedKV(lens, 8, 128, 16, torch.bfloat16, DEVICE, fp8=fp8, extra_cols=300)
    max_model_len = case.block_tables.shape[1] * 16
    query = torch.randn(len(lens), 16, 128, device=DEVICE).bfloat16()
    own = own_kv(len(lens), 8, 128, torch.bfloat16) if fp8 else {}
    one_each = torch.tensor([0, 1, 2, 3, 4, 4, 4], dtype=torch.int32, device=DEVICE)  # a query token per live row
    out = torch.empty_like(query)
    for num_partitions in (1, None):
        decode(case, query, max_model_len, out=out, num_partitions=num_partitions, **own)  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode(case, query, max_model_len, out=out, num_partitions=num_partitions, **own)
        for new_lens in ([700, 33, 1, 2048, 0, 0], [5, 20, 1, 1500, 0, 0]):  # within each sequence's blocks
            case.lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
            for x in (query, *(own[name] for name in ("new_key", "new_value") if own)):
                x.copy_(torch.randn_like(x))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out[4:], torch.zeros_like(out[4:]))
            assert not arrival_counters(query.device, 0).any()  # reset by each merge, replay after replay
            ref = causal_reference(case, query, one_each, **own) if fp8 else reference(case, query)
            assert rel_err(out[:4], ref[:4]) <= (4e-3 if fp8 else 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("multi", [False, True], ids=["decode", "verify"])
def test_gpu_split_kv_merge_sees_every_partition(multi):
    """The merge's ordering on hardware, where partitions finish in any order and the last to arrive
    merges: 64-token partitions of 4096 tokens (up to 64 per sequence and KV head), calls repeated over
    one counter buffer. The merge reads the partials in partition order whichever program runs it, so
    the output is the same bits every time; a partial read before its write (or stale) would not be."""
    torch.manual_seed(9)
    rng = random.Random(9)
    for _ in range(8):
        lens = [rng.randint(1, 4096) for _ in range(rng.randint(1, 24))] + [0, rng.randint(1, 64)]
        case = PagedKV(lens, 8, 128, 16, torch.bfloat16, DEVICE, extra_cols=256 - max(-(-n // 16) for n in lens))
        if multi:
            q_lens = [min(n, rng.randint(1, 5)) for n in lens]
            qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
            query = torch.randn(sum(q_lens), 16, 128, device=DEVICE).bfloat16()
            kwargs, ref = dict(query_start_loc=qsl, max_query_len=max(q_lens)), causal_reference(case, query, qsl)
        else:
            query = torch.randn(len(lens), 16, 128, device=DEVICE).bfloat16()
            kwargs, ref = {}, reference(case, query)
        first = decode(case, query, 4096, num_partitions=64, **kwargs)
        assert rel_err(first, ref) <= 2e-3
        for _ in range(20):
            assert torch.equal(decode(case, query, 4096, num_partitions=64, **kwargs), first)
        assert not arrival_counters(query.device, 0).any()

"""The flash-attn backend (and its Triton cache write) against the pure-torch reference backend, on CUDA.

Every case goes through the cache the way `Attention.forward` does: the step's K/V are written
by the backend's `store_kvcache`, then `prefill`/`decode` read them back through block tables
that are random permutations of physical 256-token blocks. The reference is `TorchBackend` in
float32 over its own float32 cache (written by its own index_copy, so a faulty Triton write
cannot hide in both), fed the very same half-precision inputs upcast.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

if not torch.cuda.is_available():  # before the imports below, which need the GPU stack
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flash_attn")
pytest.importorskip("triton")

from nanovllm.kernels.flash_attn_backend import FlashAttnBackend  # noqa: E402
from nanovllm.attention.ops.store_kvcache import store_kvcache  # noqa: E402
from nanovllm.layers.attention import AttentionMetadata, TorchBackend  # noqa: E402

BLOCK = 256  # flash-attn 2's paged kernels need a multiple of 256
DEVICE = "cuda"
TOL = 1e-2  # ||out - ref|| / ||ref|| per sequence; a half-precision kernel lands around 3e-3

# (num_heads, num_kv_heads, head_dim, dtype): Qwen3-0.6B's GQA with both head dims, SmolLM2's
# 9/3 heads, and multi-head attention in float16.
CONFIGS = [
    (16, 8, 128, torch.bfloat16),
    (16, 8, 64, torch.bfloat16),
    (9, 3, 64, torch.bfloat16),
    (8, 8, 128, torch.float16),
]
CONFIG_IDS = ["gqa16x8-d128-bf16", "gqa16x8-d64-bf16", "gqa9x3-d64-bf16", "mha8-d128-fp16"]


# -- a paged layout and the metadata the model runner would build ---------------------------------


class Paged:
    """Block tables (random physical blocks) for sequences of the given final lengths, and two caches.

    The flash caches start as random finite garbage in `dtype` (stale K/V of freed blocks); the
    float32 reference caches start as zeros. Both are written only through their backend.
    """

    def __init__(self, lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 extra_blocks: int = 3, extra_cols: int = 0):
        used = [-(-n // BLOCK) for n in lens]
        self.num_blocks = sum(used) + extra_blocks
        physical = torch.randperm(self.num_blocks)
        table = torch.zeros(len(lens), max(used) + extra_cols, dtype=torch.int64)
        start = 0
        for i, nb in enumerate(used):
            table[i, :nb] = physical[start : start + nb]
            start += nb
        self.table = table  # int64 on the host, for slot arithmetic
        self.block_tables = table.to(DEVICE, torch.int32)
        shape = (self.num_blocks, BLOCK, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, device=DEVICE).to(dtype)
        self.v_cache = torch.randn(shape, device=DEVICE).to(dtype)
        self.k_ref = torch.zeros(shape, device=DEVICE)
        self.v_ref = torch.zeros(shape, device=DEVICE)

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions start..end-1 of sequence seq (host int64)."""
        pos = torch.arange(start, end)
        return self.table[seq, pos // BLOCK] * BLOCK + pos % BLOCK

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write K/V through the flash backend (Triton) and, upcast, through the reference backend."""
        FlashAttnBackend().store_kvcache(k, v, self.k_cache, self.v_cache, slot_mapping)
        TorchBackend().store_kvcache(k.float(), v.float(), self.k_ref, self.v_ref, slot_mapping)


def prefill_meta(paged: Paged, q_lens: list[int], k_lens: list[int], slot_mapping: torch.Tensor,
                 has_cached_prefix: bool) -> AttentionMetadata:
    """As `ModelRunner._prepare_prefill`: int32 lengths/tables, int64 slots."""
    cu_q = torch.tensor([0] + q_lens).cumsum(0)
    cu_k = torch.tensor([0] + k_lens).cumsum(0)
    return AttentionMetadata(
        is_prefill=True, slot_mapping=slot_mapping.to(DEVICE, torch.int64),
        context_lens=torch.tensor(k_lens, dtype=torch.int32, device=DEVICE), block_tables=paged.block_tables,
        max_context_len=max(k_lens), cu_seqlens_q=cu_q.to(DEVICE, torch.int32),
        cu_seqlens_k=cu_k.to(DEVICE, torch.int32), max_seqlen_q=max(q_lens), has_cached_prefix=has_cached_prefix)


def random_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               strided_qk: bool = False):
    """q, k, v as the model hands them over: split from one fused QKV projection output.

    v stays a strided view; q and k come out of the rotary embedding as fresh tensors (unless
    strided_qk keeps them views too).
    """
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
               v.view(num_tokens, num_kv_heads, head_dim))
    return (q, k, v) if strided_qk else (q.contiguous(), k.contiguous(), v)


def fill_history(paged: Paged, lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """Write K/V for the first lens[i] positions of each sequence (a prefix computed by earlier steps)."""
    if sum(lens) == 0:
        return
    slots = torch.cat([paged.slots(i, 0, n) for i, n in enumerate(lens)])
    k = torch.randn(len(slots), num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(len(slots), num_kv_heads, head_dim, device=DEVICE).to(dtype)
    paged.store(k, v, slots.to(DEVICE))


def prefill_both(paged: Paged, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the step's K/V and prefill with flash-attn, and the same in float32 with the torch reference."""
    backend = FlashAttnBackend()
    backend.store_kvcache(k, v, paged.k_cache, paged.v_cache, meta.slot_mapping)
    out = backend.prefill(q, k, v, paged.k_cache, paged.v_cache, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    TorchBackend().store_kvcache(k.float(), v.float(), paged.k_ref, paged.v_ref, meta.slot_mapping)
    ref = TorchBackend().prefill(q.float(), k.float(), v.float(), paged.k_ref, paged.v_ref, meta, scale)
    return out, ref


def assert_close(out: torch.Tensor, ref: torch.Tensor, bounds: list[int], what: str) -> None:
    """Relative error below TOL on every sequence's rows (rows bounds[i]:bounds[i+1])."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        a, b = out[s:e].float(), ref[s:e].float()
        err = ((a - b).norm() / b.norm()).item()
        assert err < TOL, f"{what}: sequence {i} (rows {s}:{e}) relative error {err:.2e}"


# -- the Triton cache write ---------------------------------------------------------------------


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, dtype", CONFIGS, ids=CONFIG_IDS)
def test_store_kvcache_writes_slots_and_skips_padding(num_heads, num_kv_heads, head_dim, dtype):
    torch.manual_seed(0)
    num_blocks, num_tokens = 5, 700
    shape = (num_blocks, BLOCK, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    slots = torch.randperm(num_blocks * BLOCK)[:num_tokens]
    slots[::7] = -1  # padding tokens of a CUDA-graph batch
    slots = slots.to(DEVICE)
    _, key, value = random_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, strided_qk=True)
    assert not key.is_contiguous() and not value.is_contiguous()  # strided views, as the model hands them over

    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.cuda.synchronize()

    keep = slots >= 0
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(k_flat[slots[keep]], key[keep])
    assert torch.equal(v_flat[slots[keep]], value[keep])
    untouched = torch.ones(num_blocks * BLOCK, dtype=torch.bool, device=DEVICE)
    untouched[slots[keep]] = False
    assert int(untouched.sum()) == num_blocks * BLOCK - int(keep.sum())
    assert k_flat[untouched].isnan().all() and v_flat[untouched].isnan().all()


def test_store_kvcache_all_padding_writes_nothing():
    torch.manual_seed(0)
    shape = (2, BLOCK, 8, 128)
    k_cache = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)
    _, key, value = random_qkv(4, 16, 8, 128, torch.bfloat16)
    FlashAttnBackend().store_kvcache(key, value, k_cache, v_cache,
                                     torch.full((4,), -1, dtype=torch.int64, device=DEVICE))
    torch.cuda.synchronize()
    assert k_cache.isnan().all() and v_cache.isnan().all()


# -- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, dtype", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("graph_padding", [False, True], ids=["eager", "graph-padded"])
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, dtype, graph_padding):
    """One decode step over contexts of 1 .. 1024 tokens, block boundaries included.

    graph_padding: the batch as a CUDA graph runs it: extra rows with slot -1, context length 0
    and an all-zero block table, the table as wide as max_model_len, max_context_len = max_model_len.
    """
    torch.manual_seed(0)
    ctx = [1, 17, 255, 256, 257, 512, 700, 1024]
    n = len(ctx)
    pad = 3 if graph_padding else 0
    paged = Paged(ctx, num_kv_heads, head_dim, dtype, extra_cols=0 if graph_padding else 1)
    fill_history(paged, [c - 1 for c in ctx], num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5

    q, k, v = random_qkv(n + pad, num_heads, num_kv_heads, head_dim, dtype)
    slots = torch.cat([paged.slots(i, c - 1, c) for i, c in enumerate(ctx)] + [torch.full((pad,), -1)])
    lens = ctx + [0] * pad
    tables = torch.cat([paged.block_tables, paged.block_tables.new_zeros(pad, paged.block_tables.shape[1])])
    if graph_padding:
        assert tables.shape[1] * BLOCK == 1024  # blocks_per_seq of max_model_len 1024
    meta = AttentionMetadata(is_prefill=False, slot_mapping=slots.to(DEVICE, torch.int64),
                             context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                             block_tables=tables, max_context_len=1024 if graph_padding else max(ctx))

    backend = FlashAttnBackend()
    backend.store_kvcache(k, v, paged.k_cache, paged.v_cache, meta.slot_mapping)
    out = backend.decode(q, paged.k_cache, paged.v_cache, meta, scale)
    assert out.dtype == dtype and out.shape == q.shape

    TorchBackend().store_kvcache(k.float(), v.float(), paged.k_ref, paged.v_ref, meta.slot_mapping)
    ref_meta = AttentionMetadata(is_prefill=False, slot_mapping=meta.slot_mapping[:n],
                                 context_lens=meta.context_lens[:n], block_tables=paged.block_tables,
                                 max_context_len=max(ctx))
    ref = TorchBackend().decode(q[:n].float(), paged.k_ref, paged.v_ref, ref_meta, scale)
    assert_close(out[:n], ref, list(range(n + 1)), "decode")
    # a 1-token context attends only to that token: the output is its value
    group = num_heads // num_kv_heads
    torch.testing.assert_close(out[0], v[0].repeat_interleave(group, dim=0))


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, dtype", CONFIGS, ids=CONFIG_IDS)
def test_prefill_without_cached_prefix(num_heads, num_kv_heads, head_dim, dtype):
    """Fresh prompts: flash attends over this step's k/v directly (no block table)."""
    torch.manual_seed(0)
    lens = [1, 100, 256, 300, 513]
    paged = Paged(lens, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    q, k, v = random_qkv(sum(lens), num_heads, num_kv_heads, head_dim, dtype)
    slots = torch.cat([paged.slots(i, 0, n) for i, n in enumerate(lens)])
    meta = prefill_meta(paged, lens, lens, slots, has_cached_prefix=False)

    out, ref = prefill_both(paged, q, k, v, meta, scale)
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    assert_close(out, ref, bounds, "prefill")
    # the cache now holds exactly the step's K/V at its slots
    flat = paged.k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[meta.slot_mapping], k)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, dtype", CONFIGS, ids=CONFIG_IDS)
def test_prefill_with_cached_prefix(num_heads, num_kv_heads, head_dim, dtype):
    """Prefix-cache hits: queries are the last q_len of k_len tokens, earlier K/V only in the cache.

    One sequence has no cached prefix (a fresh prompt batched with hits, as the runner does), one
    recomputes only its last token (a fully cached prompt), one has a prefix that is not a whole
    number of blocks (a preceding chunk).
    """
    torch.manual_seed(0)
    cached = [0, 256, 512, 300, 512, 768]
    new = [37, 1, 100, 256, 1, 200]
    k_lens = [c + n for c, n in zip(cached, new)]
    paged = Paged(k_lens, num_kv_heads, head_dim, dtype, extra_cols=1)
    fill_history(paged, cached, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5

    q, k, v = random_qkv(sum(new), num_heads, num_kv_heads, head_dim, dtype)
    slots = torch.cat([paged.slots(i, c, c + n) for i, (c, n) in enumerate(zip(cached, new))])
    meta = prefill_meta(paged, new, k_lens, slots, has_cached_prefix=True)

    out, ref = prefill_both(paged, q, k, v, meta, scale)
    bounds = [0] + torch.tensor(new).cumsum(0).tolist()
    assert_close(out, ref, bounds, "prefill with cached prefix")


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, dtype", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("chunks", [[256, 256, 488], [300, 1, 211, 488]], ids=["aligned", "unaligned"])
def test_chunked_prefill_matches_one_shot(num_heads, num_kv_heads, head_dim, dtype, chunks):
    """A 1000-token prompt in successive chunks, each written by store_kvcache before it attends.

    Chunk i > 0 reads the earlier chunks from the cache (has_cached_prefix, as the runner sets it
    once num_cached_tokens > 0); together the chunks equal one causal prefill of the whole prompt.
    """
    torch.manual_seed(0)
    total = sum(chunks)
    paged = Paged([total], num_kv_heads, head_dim, dtype, extra_cols=1)
    scale = head_dim**-0.5
    q, k, v = random_qkv(total, num_heads, num_kv_heads, head_dim, dtype)
    backend = FlashAttnBackend()
    outs, start = [], 0
    for n in chunks:
        end = start + n
        meta = prefill_meta(paged, [n], [end], paged.slots(0, start, end), has_cached_prefix=start > 0)
        qc, kc, vc = q[start:end], k[start:end], v[start:end]
        backend.store_kvcache(kc, vc, paged.k_cache, paged.v_cache, meta.slot_mapping)
        outs.append(backend.prefill(qc, kc, vc, paged.k_cache, paged.v_cache, meta, scale))
        start = end
    out = torch.cat(outs)

    meta = prefill_meta(paged, [total], [total], paged.slots(0, 0, total), has_cached_prefix=False)
    TorchBackend().store_kvcache(k.float(), v.float(), paged.k_ref, paged.v_ref, meta.slot_mapping)
    ref = TorchBackend().prefill(q.float(), k.float(), v.float(), paged.k_ref, paged.v_ref, meta, scale)
    bounds = [0] + torch.tensor(chunks).cumsum(0).tolist()
    assert_close(out, ref, bounds, f"chunked prefill {chunks}")

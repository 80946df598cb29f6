"""Every attention backend against the float32 torch reference, through the runner's own metadata builder.

Each case goes through the cache as `Attention.forward` does: the step's K/V are written by the
backend's `write_kv`, then `forward` reads them back through block tables that are random
permutations of physical blocks. The reference is the torch backend in float32 over its own
float32 cache, fed the same inputs upcast. Shapes: decode (one token per sequence), prefill with
and without a cached prefix, several query tokens over a cached prefix (speculative
verification), chunked prefill, and a decode batch padded as a CUDA graph runs it.

A new backend adds a line to BACKENDS. The torch backend itself runs here on the CPU, so the
harness is exercised in CI.
"""
from __future__ import annotations

import pytest
import torch

from nanovllm.attention.backends.torch_ref import TorchRefBackend
from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import build_layout
from nanovllm.attention.ops.paged_attention_ref import dequantize, paged_prefill_attention
from nanovllm.attention.selector import select_backend

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]

# (backend name, block size, device, dtype)
BACKENDS = [
    pytest.param("torch", 16, "cpu", torch.float32, id="torch-16-cpu"),
    pytest.param("flash_attn", 256, "cuda", torch.bfloat16, id="flash_attn-256", marks=gpu),
    pytest.param("flash_attn", 256, "cuda", torch.float16, id="flash_attn-256-fp16", marks=gpu),
    pytest.param("triton", 16, "cuda", torch.bfloat16, id="triton-16", marks=gpu),
    pytest.param("triton", 64, "cuda", torch.bfloat16, id="triton-64", marks=gpu),
    pytest.param("triton", 256, "cuda", torch.float16, id="triton-256-fp16", marks=gpu),
]
# (num_heads, num_kv_heads, head_dim): Qwen3-0.6B's GQA with both head dims, SmolLM2's 9/3, MHA.
HEADS = [(16, 8, 128), (16, 8, 64), (9, 3, 64), (8, 8, 128)]
TOL = 1e-2  # ||out - ref|| / ||ref|| per sequence; a half-precision kernel lands around 3e-3


def make_backend(name: str, device: str, dtype: torch.dtype, kv_cache_dtype: str = "auto"):
    if name == "flash_attn":
        pytest.importorskip(name)
    return select_backend(name, torch.device(device), dtype, kv_cache_dtype)


class Paged:
    """Random physical blocks for sequences of the given final lengths, and the two caches.

    The backend's cache starts as NaN in its dtype (never read unless a kernel reads past a
    sequence); the float32 reference cache as zeros. Both are written only through their backend.
    """

    def __init__(self, backend, lens: list[int], block_size: int, heads: tuple[int, int, int],
                 device: str, dtype: torch.dtype, extra_cols: int = 0):
        self.backend, self.block_size, self.device, self.dtype = backend, block_size, device, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = heads
        used = [-(-n // block_size) for n in lens]
        num_blocks = sum(used) + 3
        physical = torch.randperm(num_blocks).tolist()
        self.tables, start = [], 0
        for n in used:
            self.tables.append(physical[start : start + n])
            start += n
        self.width = max(used) + extra_cols
        shape = backend.kv_cache_shape(num_blocks, block_size, self.num_kv_heads, self.head_dim)
        nan = torch.full(shape, float("nan"), device=device)
        self.cache = LayerKVCache(nan.to(dtype), nan.clone().to(dtype))
        ref_shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.ref = LayerKVCache(torch.zeros(ref_shape, device=device), torch.zeros(ref_shape, device=device))

    def qkv(self, num_tokens: int):
        """q, k, v split from one fused projection output, as the model hands them over."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = torch.randn(num_tokens, (h + 2 * kvh) * d, device=self.device).to(self.dtype)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        return q.reshape(-1, h, d), k.reshape(-1, kvh, d), v.view(-1, kvh, d)

    def step(self, q_lens: list[int], seq_lens: list[int], num_rows: int | None = None,
             max_seq_len: int | None = None, num_tokens: int | None = None):
        """Write fresh K/V for the new tokens and attend, in the backend and in the reference.

        Returns (out, ref, row bounds) for the real sequences.
        """
        n = len(q_lens)
        graph = num_rows is not None
        layout = build_layout(q_lens, seq_lens, self.tables[:n], self.block_size, num_rows=num_rows,
                              table_width=self.width if graph else None, max_seq_len=max_seq_len,
                              num_tokens=num_tokens, max_query_len=max(q_lens) + 2 if num_tokens else None)
        positions, meta = layout.metadata([torch.from_numpy(a).to(self.device) for a in layout.arrays()])
        q, k, v = self.qkv(len(layout.slot_mapping))
        scale = self.head_dim**-0.5
        self.backend.write_kv(k, v, self.cache, meta.slot_mapping)
        out = self.backend.forward(q, k, v, self.cache, meta, scale)
        assert out.dtype == q.dtype and out.shape == q.shape
        ref_layout = build_layout(q_lens, seq_lens, self.tables[:n], self.block_size)
        _, ref_meta = ref_layout.metadata([torch.from_numpy(a).to(self.device) for a in ref_layout.arrays()])
        real = int(ref_layout.query_start_loc[-1])
        reference = TorchRefBackend()
        reference.write_kv(k[:real].float(), v[:real].float(), self.ref, ref_meta.slot_mapping)
        ref = reference.forward(q[:real].float(), k[:real].float(), v[:real].float(), self.ref, ref_meta, scale)
        return out[:real], ref, ref_layout.query_start_loc.tolist(), (q, k, v)

    def history(self, lens: list[int]) -> None:
        """K/V for the first lens[i] positions of each sequence (computed by earlier steps)."""
        seqs = [i for i, n in enumerate(lens) if n]
        if seqs:
            saved = self.tables
            self.tables = [self.tables[i] for i in seqs]
            self.step([lens[i] for i in seqs], [lens[i] for i in seqs])
            self.tables = saved


def assert_close(out: torch.Tensor, ref: torch.Tensor, bounds: list[int], what: str) -> None:
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        a, b = out[s:e].float(), ref[s:e].float()
        err = ((a - b).norm() / b.norm()).item()
        assert err < TOL, f"{what}: sequence {i} (rows {s}:{e}) relative error {err:.2e}"


@pytest.mark.parametrize("name, block_size, device, dtype", BACKENDS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
def test_write_kv_writes_slots_and_skips_padding(name, block_size, device, dtype, heads):
    torch.manual_seed(0)
    backend = make_backend(name, device, dtype)
    paged = Paged(backend, [700], block_size, heads, device, dtype)
    _, key, value = paged.qkv(700)
    num_slots = paged.cache.key.shape[0] * block_size
    slots = torch.randperm(num_slots)[:700]
    slots[::7] = -1  # padding tokens of a CUDA-graph batch
    slots = slots.to(device)
    backend.write_kv(key, value, paged.cache, slots)
    keep = slots >= 0
    k_flat = paged.cache.key.view(num_slots, *key.shape[1:])
    v_flat = paged.cache.value.view(num_slots, *key.shape[1:])
    assert torch.equal(k_flat[slots[keep]], key[keep]) and torch.equal(v_flat[slots[keep]], value[keep])
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    assert k_flat[untouched].isnan().all() and v_flat[untouched].isnan().all()


@pytest.mark.parametrize("name, block_size, device, dtype", BACKENDS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("graph_padding", [False, True], ids=["eager", "graph-padded"])
def test_decode(name, block_size, device, dtype, heads, graph_padding):
    """One token per sequence over contexts of 1 .. 1024, block boundaries included; padded as a
    CUDA graph runs it: extra rows with slot -1 and length 0, tables max_model_len wide."""
    torch.manual_seed(0)
    backend = make_backend(name, device, dtype)
    ctx = [1, 17, 255, 256, 257, 512, 700, 1024]
    paged = Paged(backend, ctx, block_size, heads, device, dtype, extra_cols=1)
    paged.history([c - 1 for c in ctx])
    rows = len(ctx) + 3 if graph_padding else None
    out, ref, bounds, (_, _, v) = paged.step([1] * len(ctx), ctx, num_rows=rows,
                                              max_seq_len=paged.width * block_size if graph_padding else None)
    assert_close(out, ref, bounds, "decode")
    group = heads[0] // heads[1]  # a 1-token context attends only to that token: the output is its value
    torch.testing.assert_close(out[0], v[0].repeat_interleave(group, dim=0))


@pytest.mark.parametrize("name, block_size, device, dtype", BACKENDS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("cached, new", [
    ([0, 0, 0, 0, 0], [1, 100, 256, 300, 513]),  # fresh prompts
    ([0, 256, 512, 300, 512, 768], [37, 1, 100, 256, 1, 200]),  # prefix-cache hits and chunks
    ([40, 255, 256, 700, 1000], [5, 5, 5, 5, 5]),  # k+1 query tokens over a cached prefix (verify)
], ids=["fresh", "cached-prefix", "multi-token-decode"])
def test_prefill(name, block_size, device, dtype, heads, cached, new):
    torch.manual_seed(0)
    backend = make_backend(name, device, dtype)
    lens = [c + n for c, n in zip(cached, new)]
    paged = Paged(backend, lens, block_size, heads, device, dtype, extra_cols=1)
    paged.history(cached)
    out, ref, bounds, _ = paged.step(new, lens)
    assert_close(out, ref, bounds, f"prefill cached={cached}")


@pytest.mark.parametrize("name, block_size, device, dtype", BACKENDS)
@pytest.mark.parametrize("heads", HEADS[:2], ids=lambda h: "x".join(map(str, h)))
def test_verify_padded_as_a_graph(name, block_size, device, dtype, heads):
    """A speculative verify step as its CUDA graph runs it: up to k+1 = 5 query tokens per row
    (fewer where proposals ran short), padding rows owning no token, the token buffer padded to
    rows x 5 with tokens no row owns, max_query_len the graph's (above the batch's own), tables
    max_model_len wide. Padding tokens write nowhere and the real rows match the reference."""
    torch.manual_seed(0)
    backend = make_backend(name, device, dtype)
    new = [5, 1, 3, 5, 2]
    lens = [c + n for c, n in zip([40, 255, 256, 700, 1000], new)]
    paged = Paged(backend, lens, block_size, heads, device, dtype, extra_cols=2)
    paged.history([n - q for n, q in zip(lens, new)])
    rows = len(new) + 3
    before = paged.cache.key.clone()
    out, ref, bounds, _ = paged.step(new, lens, num_rows=rows, max_seq_len=paged.width * block_size,
                                     num_tokens=rows * 7)
    assert_close(out, ref, bounds, "verify graph")
    same = (paged.cache.key == before) | (paged.cache.key.isnan() & before.isnan())
    assert int((~same).flatten(2).any(2).sum()) == sum(new)  # one slot per real token, none for padding


@pytest.mark.parametrize("name, block_size, device, dtype", BACKENDS)
@pytest.mark.parametrize("chunks", [[256, 256, 488], [300, 1, 211, 488]], ids=["aligned", "unaligned"])
def test_chunked_prefill_matches_one_shot(name, block_size, device, dtype, chunks):
    """A prompt in chunks, each reading the earlier ones from the cache, equals one causal prefill."""
    torch.manual_seed(0)
    backend = make_backend(name, device, dtype)
    total = sum(chunks)
    paged = Paged(backend, [total], block_size, (16, 8, 128), device, dtype, extra_cols=1)
    q, k, v = paged.qkv(total)
    scale = 128**-0.5
    outs, start = [], 0
    for n in chunks:
        layout = build_layout([n], [start + n], paged.tables, block_size)
        _, meta = layout.metadata([torch.from_numpy(a).to(device) for a in layout.arrays()])
        sl = slice(start, start + n)
        backend.write_kv(k[sl], v[sl], paged.cache, meta.slot_mapping)
        outs.append(backend.forward(q[sl], k[sl], v[sl], paged.cache, meta, scale))
        start += n
    layout = build_layout([total], [total], paged.tables, block_size)
    _, meta = layout.metadata([torch.from_numpy(a).to(device) for a in layout.arrays()])
    reference = TorchRefBackend()
    reference.write_kv(k.float(), v.float(), paged.ref, meta.slot_mapping)
    ref = reference.forward(q.float(), k.float(), v.float(), paged.ref, meta, scale)
    bounds = [0] + torch.tensor(chunks).cumsum(0).tolist()
    assert_close(torch.cat(outs), ref, bounds, f"chunked prefill {chunks}")


FP8_BACKENDS = [
    pytest.param("torch", 16, "cpu", torch.float32, id="torch-16-cpu"),
    pytest.param("triton", 16, "cuda", torch.bfloat16, id="triton-16", marks=gpu),
]


def own_kv_reference(q, k, v, cache: LayerKVCache, meta, k_offset):
    """The float32 reference over a dequantized cache, each query's own K/V read from the step's k/v
    (keys less k_offset), as the FP8 backends read them."""
    return paged_prefill_attention(q.float(), cache.key, cache.value, meta.query_start_loc, meta.seq_start_loc,
                                   meta.block_tables, 64**-0.5, new_key=k.float(), new_value=v.float(),
                                   k_offset=k_offset)


def history_then_step(paged, backend, cached, new, lens, block_size, device):
    """K/V for the first cached[i] positions, then one step of new[i] tokens written by the backend and
    attended: (q, k, v, metadata, row bounds, output)."""
    paged.history(cached)
    layout = build_layout(new, lens, paged.tables, block_size)
    _, meta = layout.metadata([torch.from_numpy(a).to(device) for a in layout.arrays()])
    q, k, v = paged.qkv(sum(new))
    backend.write_kv(k, v, paged.cache, meta.slot_mapping)
    out = backend.forward(q, k, v, paged.cache, meta, 64**-0.5)
    return q, k, v, meta, layout.query_start_loc.tolist(), out


@pytest.mark.parametrize("name, block_size, device, dtype", FP8_BACKENDS)
@pytest.mark.parametrize("cached, new", [([0, 0, 0], [1, 40, 300]), ([40, 255, 700], [1, 1, 1]),
                                         ([40, 255, 700], [5, 5, 5])], ids=["fresh", "decode", "verify"])
def test_fp8_cache(name, block_size, device, dtype, cached, new):
    """write_kv quantizes with the layer's per-head scales; attention over the FP8 cache equals the
    float32 reference over the dequantized cache, where each query reads its own token unrounded (the
    prompt of one token, read from the cache, would be off by FP8's rounding: > TOL)."""
    torch.manual_seed(0)
    backend = make_backend(name, device, dtype, "fp8")
    lens = [c + n for c, n in zip(cached, new)]
    paged = Paged(backend, lens, block_size, (8, 2, 64), device, dtype, extra_cols=1)
    paged.cache = LayerKVCache(paged.cache.key.to(torch.float8_e4m3fn), paged.cache.value.to(torch.float8_e4m3fn),
                               torch.rand(2, device=device) * 0.02 + 0.01, torch.rand(2, device=device) * 0.02 + 0.01)
    q, k, v, meta, bounds, out = history_then_step(paged, backend, cached, new, lens, block_size, device)
    dequantized = LayerKVCache(dequantize(paged.cache.key, paged.cache.k_scale).float(),
                               dequantize(paged.cache.value, paged.cache.v_scale).float())
    assert_close(out, own_kv_reference(q, k, v, dequantized, meta, None), bounds, "fp8")
    written = dequantized.key.view(-1, 2, 64)[meta.slot_mapping]  # within FP8's 3-bit mantissa of the input
    torch.testing.assert_close(written, k.float(), rtol=0.07, atol=0.02 * 2)


@pytest.mark.parametrize("name, block_size, device, dtype", FP8_BACKENDS)
@pytest.mark.parametrize("cached, new", [([0, 0, 0], [1, 40, 300]), ([40, 255, 700], [1, 1, 1]),
                                         ([40, 255, 700], [5, 5, 5])], ids=["fresh", "decode", "verify"])
def test_fp8_cache_with_sink_blocks(name, block_size, device, dtype, cached, new):
    """Sequences' first blocks are sink blocks: write_kv keeps their tokens in float16 as well (scaled,
    keys less their offset), and attention reads them from there; the rest as test_fp8_cache."""
    torch.manual_seed(1)
    backend = make_backend(name, device, dtype, "fp8")
    lens = [c + n for c, n in zip(cached, new)]
    paged = Paged(backend, lens, block_size, (8, 2, 64), device, dtype, extra_cols=1)
    sinks = len(lens) + 1  # first blocks 0..2 (one spare); the others above, as BlockManager hands them out
    blocks = -(-max(lens) // block_size) + 1
    paged.tables = [[i] + list(range(sinks + i * blocks, sinks + (i + 1) * blocks - 1)) for i in range(len(lens))]
    num_blocks = sinks + len(lens) * blocks
    shape = (num_blocks, block_size, 2, 64)
    nan = torch.full(shape, float("nan"), device=device)
    sink_nan = torch.full((sinks, *shape[1:]), float("nan"), device=device, dtype=torch.float16)
    paged.cache = LayerKVCache(nan.to(torch.float8_e4m3fn), nan.to(torch.float8_e4m3fn),
                               torch.rand(2, device=device) * 0.02 + 0.01, torch.rand(2, device=device) * 0.02 + 0.01,
                               torch.randn(2, 64, device=device), sink_nan, sink_nan.clone())
    paged.ref = LayerKVCache(torch.zeros(shape, device=device), torch.zeros(shape, device=device))
    q, k, v, meta, bounds, out = history_then_step(paged, backend, cached, new, lens, block_size, device)
    c = paged.cache
    read = [dequantize(x.float(), s) for x, s in ((c.key, c.k_scale), (c.value, c.v_scale))]
    for x, sink, s in zip(read, (c.k_sink, c.v_sink), (c.k_scale, c.v_scale)):
        x[:sinks] = dequantize(sink.float(), s)
    assert_close(out, own_kv_reference(q, k, v, LayerKVCache(*read), meta, c.k_offset), bounds, "fp8 with sink blocks")
    new_first = meta.slot_mapping < sinks * block_size  # new tokens of first blocks ("fresh" prompts)
    slots = meta.slot_mapping[new_first]
    want = ((k.float() - c.k_offset) / c.k_scale[:, None])[new_first].half()
    assert torch.equal(c.k_sink.view(-1, 2, 64)[slots], want)
    assert torch.equal(c.v_sink.view(-1, 2, 64)[slots], (v.float() / c.v_scale[:, None])[new_first].half())
    assert len(slots) == sum(min(n, block_size) if c == 0 else 0 for c, n in zip(cached, new))

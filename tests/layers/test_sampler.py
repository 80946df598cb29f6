import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import (
    Sampler,
    SamplingTensors,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p_min_p,
    best_of_shards,
    row_keys,
    sample_vocab_shard,
    seeded_exponential_noise,
    uniform_from_bits,
)
from nanovllm.sampling_params import SamplingParams

V = 512
EOS = [3, 7]


def make_seq(prompt=(1, 2), completion=(), seed=None, **params) -> Sequence:
    seq = Sequence(0, list(prompt), SamplingParams(**params))
    seq.token_ids.extend(completion)
    seq.sample_seed = seed
    return seq


def tensors(seqs, vocab=V) -> SamplingTensors:
    return SamplingTensors.from_rows(seqs, vocab, EOS, "cpu")


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson chi-square goodness of fit (p > 1e-3); cells with tiny expectation are merged."""
    from scipy.stats import chi2

    n = counts.sum().item()
    expected = probs.double().cpu() * n
    counts = counts.cpu()
    assert (counts[expected == 0] == 0).all(), "drew a token the filters remove"
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    assert chi2.sf(stat, len(exp) - 1) > 1e-3, (stat, len(exp) - 1)


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    finite = ~torch.isneginf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- processed logits vs HF

def hf_warp(row: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    scores = row.unsqueeze(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    if 0 < sp.top_k < row.shape[0]:
        scores = TopKLogitsWarper(sp.top_k)(ids, scores)
    if sp.top_p < 1:
        scores = TopPLogitsWarper(sp.top_p)(ids, scores)
    if sp.min_p > 0:
        scores = MinPLogitsWarper(sp.min_p)(ids, scores)
    return scores[0]


WARP_CASES = [
    dict(top_k=5),
    dict(top_k=1),
    dict(top_k=V + 10),
    dict(),
    dict(top_p=0.9),
    dict(top_p=0.3),
    dict(top_p=0.999),
    dict(min_p=0.05),
    dict(min_p=0.5),
    dict(top_k=40, top_p=0.8),
    dict(top_k=100, top_p=0.95, min_p=0.02),
    dict(top_p=0.7, min_p=0.1),
    dict(top_k=20, min_p=0.2),
]


@pytest.mark.parametrize("subset", [
    [0, 1, 2, 3],          # top-k only (topk path), with an off row and k > V
    [4, 5, 6, 3],          # top-p only, with an off row
    [7, 8, 3],             # min-p only
    list(range(len(WARP_CASES))),  # everything mixed (sort path)
])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_top_k_top_p_min_p_match_hf(subset, scale):
    gen = torch.Generator().manual_seed(len(subset) * 7 + int(scale))
    cases = [WARP_CASES[i] for i in subset]
    seqs = [make_seq(**c) for c in cases]
    logits = torch.randn(len(seqs), V, generator=gen) * scale
    logits[0, :10] = float("-inf")  # already-masked entries must stay masked
    t = tensors(seqs)
    ours = apply_top_k_top_p_min_p(logits, t.top_ks, t.top_ps, t.min_ps)
    for row, seq in enumerate(seqs):
        assert_same_logits(ours[row], hf_warp(logits[row], seq.sampling_params))


def test_top_k_keeps_ties_like_hf():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 3.0]])
    t = tensors([make_seq(top_k=2)], vocab=6)
    ours = apply_top_k_top_p_min_p(logits, t.top_ks, t.top_ps, t.min_ps)
    assert_same_logits(ours[0], TopKLogitsWarper(2)(None, logits)[0])


def test_repetition_penalty_matches_hf():
    gen = torch.Generator().manual_seed(1)
    specs = [  # (prompt, completion, penalty)
        ([5, 9, 9, 100], [11, 5, 200], 1.3),
        ([1, 2], [], 0.7),
        ([8, 8, 8], [4], 1.0),  # off
        (list(range(50)), [60, 61, 0], 2.0),
    ]
    seqs = [make_seq(p, c, repetition_penalty=r) for p, c, r in specs]
    logits = torch.randn(len(seqs), V, generator=gen) * 3
    ours = apply_penalties(logits, tensors(seqs).penalties)
    for row, (prompt, completion, penalty) in enumerate(specs):
        ids = torch.tensor([prompt + completion])
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[row : row + 1].clone())[0]
        assert_same_logits(ours[row], ref)


def test_repetition_penalty_ignores_ids_beyond_vocab():
    seqs = [make_seq([1, V + 5], [2], repetition_penalty=1.5)]
    logits = torch.randn(1, V)
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[1, V + 5, 2]]), logits.clone())
    assert_same_logits(apply_penalties(logits, tensors(seqs).penalties), ref)


def test_frequency_presence_penalties_match_loop():
    gen = torch.Generator().manual_seed(2)
    specs = [  # (prompt, completion, rep, freq, pres)
        ([5, 6, 7], [6, 6, 9, 400, 6], 1.0, 0.5, 0.0),
        ([5, 6, 7], [6, 6, 9], 1.0, 0.0, 1.5),
        ([1, 1, 10], [10, 10, 12], 1.2, -0.4, 0.3),
        ([4, 4], [], 1.0, 2.0, 2.0),  # nothing generated yet: no effect
        ([4, 4], [4], 1.0, 0.0, 0.0),  # off
    ]
    seqs = [make_seq(p, c, repetition_penalty=r, frequency_penalty=f, presence_penalty=pp)
            for p, c, r, f, pp in specs]
    logits = torch.randn(len(seqs), V, generator=gen)
    ours = apply_penalties(logits, tensors(seqs).penalties)
    for row, (prompt, completion, rep, freq, pres) in enumerate(specs):
        expected = logits[row].clone()
        for tok in set(prompt + completion):
            score = expected[tok]
            expected[tok] = score * rep if score < 0 else score / rep
        for tok in set(completion):
            expected[tok] -= freq * completion.count(tok) + pres
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=1e-6)


def test_no_optional_work_in_common_case():
    t = tensors([make_seq(temperature=0.8), make_seq(temperature=1.0, seed=None)])
    assert not (t.do_filter or t.any_seeded or t.want_logprobs) and t.any_unseeded
    assert t.penalties is None and t.min_tokens_blocked is None and not t.all_greedy
    assert t.max_num_logprobs == 0
    # Features that are on only for greedy rows need no work either.
    t = tensors([make_seq(temperature=0, top_k=3, top_p=0.5, min_p=0.3, seed=1)])
    assert t.all_greedy and not (t.do_filter or t.any_seeded or t.any_unseeded)


def test_from_rows_uploads_everything_in_one_call():
    calls = []

    def upload(arrays):
        calls.append([(a.dtype, a.shape) for a in arrays])
        return [torch.from_numpy(a) for a in arrays]

    seqs = [make_seq(completion=[4, 4], repetition_penalty=1.2, min_tokens=5, seed=3, logprobs=2),
            make_seq(temperature=0)]
    t = SamplingTensors.from_rows(seqs, V, EOS, "cpu", upload=upload)
    assert len(calls) == 1 and t.penalties is not None and t.min_tokens_blocked is not None
    assert t.greedy.tolist() == [False, True] and t.seeded.tolist() == [True, False]
    assert t.positions.tolist() == [4, 0] and t.want_logprobs and t.max_num_logprobs == 2
    # a seeded row's keys are mixed on the host, bit for bit the device function; zeros elsewhere
    assert t.keys[0].tolist() == row_keys(t.seeds[:1], t.positions[:1])[0].tolist()
    assert t.keys[1].tolist() == [0, 0]


def test_keys_seeded_from_seed_and_position_unseeded_fresh():
    seqs = [make_seq(seed=2**70 + 5), make_seq(), make_seq(seed=-3)]
    t = SamplingTensors.from_rows(seqs, V, EOS, "cpu")
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    first, second = sampler.keys(t, torch.device("cpu")), sampler.keys(t, torch.device("cpu"))
    expected = row_keys(t.seeds, t.positions)
    assert torch.equal(first[[0, 2]], expected[[0, 2]]) and torch.equal(second[[0, 2]], expected[[0, 2]])
    assert not torch.equal(first[1], second[1])  # an unseeded row draws fresh keys every step
    assert ((first >= 0) & (first < 2**32)).all()


# ---------------------------------------------------------------- min_tokens

def test_min_tokens_masks_eos_and_stop_ids():
    seqs = [
        make_seq(completion=[9], min_tokens=3, stop_token_ids=[20, V + 3]),
        make_seq(completion=[9], min_tokens=3, stop_token_ids=[20], ignore_eos=True),
        make_seq(completion=[9, 9, 9], min_tokens=3, stop_token_ids=[20]),  # reached
        make_seq(stop_token_ids=[20]),
    ]
    t = tensors(seqs)
    logits = torch.randn(len(seqs), V)
    out = apply_min_tokens(logits, t.min_tokens_blocked)
    blocked = torch.isneginf(out)
    assert blocked[0].nonzero().flatten().tolist() == [3, 7, 20]
    assert blocked[1].nonzero().flatten().tolist() == [20]
    assert not blocked[2:].any()
    assert not torch.isneginf(logits).any()  # input untouched


def test_min_tokens_changes_greedy_choice():
    logits = torch.zeros(2, V)
    logits[:, EOS[0]] = 10.0
    logits[:, 42] = 5.0
    seqs = [make_seq(temperature=0, min_tokens=1, logprobs=0), make_seq(temperature=0, logprobs=0)]
    out = Sampler()(logits, tensors(seqs))
    assert out.token_ids.tolist() == [42, EOS[0]]
    # Logprobs are those of the raw logits, even for the masked row.
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[[0, 1], [42, EOS[0]]])


# ---------------------------------------------------------------- greedy, logprobs

def test_greedy_and_logprobs():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    seqs = [make_seq(temperature=0, logprobs=5), make_seq(temperature=0), make_seq(temperature=0, logprobs=2),
            make_seq(temperature=0, repetition_penalty=5.0, prompt=[int(logits[3].float().argmax())])]
    out = Sampler()(logits, tensors(seqs))
    raw = torch.log_softmax(logits.float(), -1)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert out.token_ids[:3].tolist() == logits[:3].float().argmax(-1).tolist()
    assert out.token_ids[3] != logits[3].float().argmax()
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (4, 5) and out.top_token_ids.dtype == torch.int64
    ref_values, ref_ids = raw.sort(dim=-1, descending=True)
    torch.testing.assert_close(out.top_logprobs, ref_values[:, :5])
    assert torch.equal(out.top_token_ids, ref_ids[:, :5])


def test_no_top_logprobs_when_not_requested():
    out = Sampler()(torch.randn(2, V), tensors([make_seq(), make_seq(temperature=0, logprobs=0)]))
    assert out.top_logprobs is None and out.top_token_ids is None and out.logprobs is not None
    out = Sampler()(torch.randn(2, V), tensors([make_seq(), make_seq(temperature=0)]))
    assert out.logprobs is None and out.top_logprobs is None


def test_mixed_greedy_and_sampled_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    before = logits.clone()
    seqs = [make_seq(temperature=1e-6), make_seq(temperature=1.5, top_k=50, repetition_penalty=1.3,
                                                  min_tokens=2, seed=3)] * 3
    out = Sampler()(logits, tensors(seqs))
    assert torch.equal(logits, before)  # float32 input is not modified in place
    assert out.token_ids[::2].tolist() == logits[::2].argmax(-1).tolist()
    assert ((0 <= out.token_ids) & (out.token_ids < V)).all()


# ---------------------------------------------------------------- sampling distributions

SMALL_V = 12
MODES = {  # name -> sampling params; each checked against the exact masked softmax in float64
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.3, top_k=4),
    "top_p": dict(temperature=1.5, top_p=0.8),
    "min_p": dict(temperature=1.1, min_p=0.1),
    "all": dict(temperature=1.3, top_k=8, top_p=0.85, min_p=0.05),
    "penalties": dict(temperature=0.8, repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.5),
}
PENALTY_PROMPT, PENALTY_COMPLETION = [1, 2, 5], [5, 5, 9]


def exact_distribution(row: torch.Tensor, params: dict) -> torch.Tensor:
    """The target distribution in float64, written out independently of the sampler."""
    row = row.double().clone()
    sp = SamplingParams(**params)
    if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
        for tok in set(PENALTY_PROMPT + PENALTY_COMPLETION):
            row[tok] = row[tok] * sp.repetition_penalty if row[tok] < 0 else row[tok] / sp.repetition_penalty
        for tok in set(PENALTY_COMPLETION):
            row[tok] -= sp.frequency_penalty * PENALTY_COMPLETION.count(tok) + sp.presence_penalty
    return torch.softmax(hf_warp(row / sp.temperature, sp), -1)


def draw(row: torch.Tensor, params: dict, n: int, seeded: bool = False) -> torch.Tensor:
    seqs = [make_seq(PENALTY_PROMPT, PENALTY_COMPLETION, seed=i if seeded else None, **params) for i in range(n)]
    out = Sampler(generator=torch.Generator(row.device).manual_seed(0))(
        row.expand(n, -1), SamplingTensors.from_rows(seqs, row.shape[0], EOS, row.device))
    return torch.bincount(out.token_ids, minlength=row.shape[0])


@pytest.mark.parametrize("mode", MODES)
def test_draws_follow_exact_distribution(mode):
    row = torch.randn(SMALL_V, generator=torch.Generator().manual_seed(len(mode)))
    chi_square_ok(draw(row, MODES[mode], 10_000), exact_distribution(row, MODES[mode]))


def test_generator_makes_unseeded_draws_reproducible():
    row = torch.randn(SMALL_V)
    assert torch.equal(draw(row, MODES["all"], 500), draw(row, MODES["all"], 500))


# ---------------------------------------------------------------- seeded rows

def test_seeded_row_independent_of_batch():
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(V, generator=gen) * 0.1  # flat: the noise decides
    target = make_seq([1] * 9, seed=1234, temperature=0.9, top_p=0.95)
    alone = Sampler()(row[None], tensors([target])).token_ids.item()
    torch.manual_seed(99)
    for index, size in [(0, 3), (2, 3), (5, 8)]:
        others = [make_seq(seed=s, temperature=0.5 + s / 10, top_k=30) for s in range(size - 1)]
        others[0].sample_seed = None  # unseeded neighbour
        batch = others[:index] + [target] + others[index:]
        logits = torch.randn(size, V, generator=gen)
        logits[index] = row
        out = Sampler()(logits, tensors(batch))
        assert out.token_ids[index].item() == alone


def test_seeded_rows_vary_with_seed_and_position():
    row = torch.zeros(1, V)
    by_seed = {Sampler()(row, tensors([make_seq(seed=s)])).token_ids.item() for s in range(30)}
    by_pos = {Sampler()(row, tensors([make_seq([1] * n, seed=5)])).token_ids.item() for n in range(1, 31)}
    assert len(by_seed) > 20 and len(by_pos) > 20
    # Seeds differing only in the high 32 bits, or huge/negative seeds, get different noise;
    # seeds are taken modulo 2**64.
    seeds = torch.tensor([1, 1 + (1 << 32), 1 + (1 << 40), -1, -2])
    noise = seeded_exponential_noise(seeds, torch.full((5,), 3), V)
    assert len({tuple(r.tolist()) for r in noise}) == 5
    t = tensors([make_seq(seed=(1 << 70) + 1), make_seq(seed=(1 << 64) - 1)])
    assert t.seeds.tolist() == [1, -1]


def test_seeded_draws_follow_softmax_over_positions_and_seeds():
    torch.manual_seed(5)
    row = torch.randn(SMALL_V)
    temperature = 0.8
    expected = torch.softmax(row.double() / temperature, -1)
    by_position = [make_seq([0] * n, seed=77, temperature=temperature) for n in range(1, 10_001)]
    by_seed = [make_seq(seed=s, temperature=temperature) for s in range(10_000)]
    for seqs in (by_position, by_seed):
        out = Sampler()(row.expand(len(seqs), SMALL_V), tensors(seqs, SMALL_V))
        chi_square_ok(torch.bincount(out.token_ids, minlength=SMALL_V), expected)


def test_seeded_noise_is_exponential_and_uncorrelated_across_tokens():
    noise = seeded_exponential_noise(torch.tensor([0, 1, 2**40]), torch.tensor([10, 10, 10]), 20000)
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1) < 0.02 and abs(noise.var().item() - 1) < 0.05
    flat = noise.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(corr.item()) < 0.02


def test_uniform_never_reaches_one():
    # Regression: a 24-bit uniform rounded to 1.0 for all-ones bits, the exponential noise
    # became -0.0 and a masked token's 0 / -0.0 = NaN won the argmax.
    bits = torch.tensor([0, 1 << 9, (1 << 32) - 1, (1 << 32) - 512], dtype=torch.int64)
    u = uniform_from_bits(bits)
    assert (u > 0).all() and (u < 1).all() and (-torch.log(u) > 0).all()


def test_seeded_top_k_1_is_greedy_across_seeds():
    vocab = 151_936
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(6))
    seqs = [make_seq(seed=s, top_k=1) for s in range(32)]
    out = Sampler()(logits, tensors(seqs, vocab))
    assert torch.equal(out.token_ids, logits.argmax(-1))


# ---------------------------------------------------------------- vocabulary shards (tensor parallelism)

@pytest.mark.parametrize("ranks", [2, 3])
def test_vocab_shard_draws_equal_the_whole_vocabulary_draw(ranks):
    vocab = 1000
    shard = -(-vocab // ranks)
    seqs = [make_seq(seed=s, temperature=temp) for s, temp in [(1, 0.7), (2, 1.3), (3, 1.0)]]
    seqs.append(make_seq(temperature=0))
    t = tensors(seqs, vocab)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(ranks)) * 2
    logits[3, [10, shard + 10]] = 100.0  # a greedy tie across shards: the lowest token, as argmax breaks it
    want = Sampler()(logits, t).token_ids
    assert want[3].item() == 10
    # the last shard's padding columns hold a logit that would win if they took part
    padded = torch.cat([logits, torch.full((len(seqs), shard * ranks - vocab), 500.0)], dim=1)
    keys = Sampler().keys(t, torch.device("cpu"))
    draws = [sample_vocab_shard(padded[:, r * shard : (r + 1) * shard], t.inv_temperatures, t.greedy, keys,
                                r * shard, vocab) for r in range(ranks)]
    got = best_of_shards(torch.stack([score for score, _ in draws]), torch.stack([token for _, token in draws]))
    assert torch.equal(got, want)


# ---------------------------------------------------------------- Triton kernels (interpreter)

TRITON_CHECK = """
import torch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers import sampler as S
from nanovllm.sampling_params import SamplingParams
torch.manual_seed(0)
V = 3000
cases = [dict(temperature=0), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05),
         dict(top_k=40, top_p=0.8, min_p=0.02, logprobs=3), dict(top_p=0.999, temperature=2.0, logprobs=1)]
seqs = []
for i, c in enumerate(cases):
    seqs.append(Sequence(i, [1, 2, 3], SamplingParams(**c)))
    seqs[-1].sample_seed = i
logits = torch.randn(len(seqs), V) * 3

from nanovllm.layers import sampling_kernels as K
overflowed = []
exact_rows = K.exact_rows
K.exact_rows = lambda *args: overflowed.append((args[8] == 0).nonzero().squeeze(1).tolist()) or exact_rows(*args)


for cap in (2048, 8):  # 8: the buffer overflows and rows are read whole (`exact_rows`)
    S.CANDIDATES = cap
    t = S.SamplingTensors.from_rows(seqs, V, [0], "cpu")
    keys = S.row_keys(t.seeds, t.positions)
    overflowed.clear()
    ours = S._forward_triton(logits, logits, keys, t)
    assert 6 in overflowed[0] and (cap == 2048 or len(overflowed[0]) >= 4), overflowed  # (row 6's nucleus is wide)
    noise = S.gumbel_noise(keys, torch.arange(logits.shape[1], device=logits.device))
    ref = S._forward_torch(logits, logits, noise, t)
    assert torch.equal(ours.token_ids, ref.token_ids), (ours.token_ids, ref.token_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs)
    torch.testing.assert_close(ours.top_logprobs, ref.top_logprobs)
    assert torch.equal(ours.top_token_ids, ref.top_token_ids)
# batches without top-p (the chunk pass keeps no sums), without filters (the merge writes the token's
# logprob; with top logprobs, the candidates give them), each with a greedy row; 8 slots: rows fall back
batches = ([dict(temperature=0.7, logprobs=0), dict(temperature=0, logprobs=0), dict(temperature=1.3)],
           [dict(temperature=0.7, logprobs=4), dict(temperature=0, logprobs=2), dict(temperature=1.3)],
           [dict(top_k=5, logprobs=3), dict(temperature=0, logprobs=1), dict(min_p=0.1, logprobs=0)],
           [dict(temperature=0.7, logprobs=S.BUFFER_TOP_LOGPROBS + 1), dict(top_k=5)])  # top K from torch
for cap, batch in [(cap, batch) for cap in (2048, 8) for batch in batches]:
    S.CANDIDATES = cap
    rows = [Sequence(i, [1, 2, 3], SamplingParams(**c)) for i, c in enumerate(batch)]
    t = S.SamplingTensors.from_rows(rows, V, [0], "cpu")
    keys = S.row_keys(t.seeds, t.positions)
    x = logits[: len(rows)]
    ours = S._forward_triton(x, x, keys, t)
    ref = S._forward_torch(x, x, S.gumbel_noise(keys, torch.arange(V)), t)
    assert torch.equal(ours.token_ids, ref.token_ids), (cap, batch, ours.token_ids, ref.token_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs)
    assert (ours.top_logprobs is None) == (ref.top_logprobs is None), batch
    if ref.top_logprobs is not None:
        torch.testing.assert_close(ours.top_logprobs, ref.top_logprobs)
        assert torch.equal(ours.top_token_ids, ref.top_token_ids), (cap, batch)
# overflowing rows read whole: top-p rows by rejection (some first draws fall outside the nucleus, where the
# draw without top-p differs), the top-k row by bisection; unfiltered rows never overflow
import dataclasses
S.CANDIDATES = 8
wide = [dict(top_p=0.9), dict(top_p=0.5, temperature=2.0), dict(top_p=0.7, min_p=0.01), dict(top_k=40, top_p=0.8),
        dict(temperature=0.7), dict(temperature=0), dict(top_p=0.2, temperature=0.5), dict(top_k=300, min_p=0.001)]
rejected = 0
for seed in range(12):
    wide_seqs = [Sequence(i, [1, 2, 3], SamplingParams(**c)) for i, c in enumerate(wide)]
    for i, seq in enumerate(wide_seqs):
        seq.sample_seed = 100 * seed + i
    x = torch.randn(len(wide), V) * (0.5 + seed % 3)
    t = S.SamplingTensors.from_rows(wide_seqs, V, [0], "cpu")
    keys = S.row_keys(t.seeds, t.positions)
    overflowed.clear()
    ours = S._forward_triton(x, x, keys, t)
    noise = S.gumbel_noise(keys, torch.arange(V))
    ref = S._forward_torch(x, x, noise, t)
    assert torch.equal(ours.token_ids, ref.token_ids), (seed, ours.token_ids, ref.token_ids)
    assert {0, 1, 2, 3, 7} <= set(overflowed[0]) and not {4, 5} & set(overflowed[0]), overflowed
    no_top_p = S._forward_torch(x, x, noise, dataclasses.replace(t, top_ps=torch.ones_like(t.top_ps)))
    rejected += int((no_top_p.token_ids[:3] != ref.token_ids[:3]).sum())
assert rejected >= 3, rejected
S.CANDIDATES = 2048
# thresholds without sorting the candidates equal those from the sorted candidates, ties included
from nanovllm.layers import sampling_kernels as K
rows = [Sequence(i, [1], SamplingParams(top_k=k, top_p=p, min_p=mp, temperature=0.8))
        for i, (k, p, mp) in enumerate([(1, 1.0, 0.0), (7, 1.0, 0.0), (0, 0.5, 0.0), (0, 0.95, 0.0), (30, 0.9, 0.0),
                                       (5, 0.3, 0.1), (0, 1.0, 0.2), (200, 0.99, 0.0)])]
t = S.SamplingTensors.from_rows(rows, 500, [0], "cpu")
x = (torch.randn(len(rows), 500) * 4).round() / 2  # many ties
z = x * t.inv_temperatures[:, None]
m, total = z.max(1).values, torch.exp(z - z.max(1, keepdim=True).values).sum(1)
values = torch.cat([x, torch.full((len(rows), 12), float("-inf"))], 1)  # every entry a candidate, padded
stats = torch.stack([m, total, m, m], 1)
counts = torch.zeros(len(rows), K.CHUNKS, dtype=torch.int32)
ok = torch.ones(len(rows), dtype=torch.int8)
tokens = torch.zeros(len(rows), dtype=torch.int64)
tau = K.select_and_draw(values, torch.arange(512).repeat(len(rows), 1).int(), counts, t.inv_temperatures, t.greedy,
                        torch.zeros(len(rows), 2, dtype=torch.int64), stats, t.top_ks, t.top_ps, t.min_ps, 500, ok,
                        tokens, True, True, True)


def thresholds_from_sorted(z, m, total, t):  # the reference: (tau, covered) from each row's sorted scaled logits
    neg_inf = torch.full_like(m, float("-inf"))
    on_k, top_p = t.top_ks < t.vocab_size, t.top_ps.float()
    kth = z.gather(1, (t.top_ks.clamp(max=z.shape[1]) - 1)[:, None]).squeeze(1)
    covered = ~on_k | (t.top_ks <= z.shape[1])
    tau = torch.where(on_k, kth, neg_inf)
    mass = torch.where(on_k, (torch.exp(z - m[:, None]) * (z >= tau[:, None])).sum(1), total)
    w = torch.exp(z - m[:, None]) * (z >= tau[:, None])
    cum = w.cumsum(1)
    last = ((cum - w < (top_p * mass)[:, None]) & (w > 0)).sum(1).clamp(min=1) - 1  # mass strictly above < top_p
    on_p = top_p < 1.0
    tau = torch.maximum(tau, torch.where(on_p, z.gather(1, last[:, None]).squeeze(1), neg_inf))
    covered &= ~on_p | (cum[:, -1] >= top_p * mass)
    return torch.maximum(tau, torch.where(t.min_ps > 0, m + torch.log(t.min_ps), neg_inf)), covered


want, want_covered = thresholds_from_sorted(z.sort(1, descending=True).values, m, total, t)
assert torch.equal(ok.bool(), want_covered) and torch.equal(tau, want), (tau, want)
# the same thresholds from whole rows, as `exact_rows` finds them for rows whose candidates overflowed (top-p
# alone by rejection, the others by bisection): its draws are the draws above them
keys = S.row_keys(torch.arange(len(rows)), torch.full((len(rows),), 7))
tokens = torch.zeros(len(rows), dtype=torch.int64)
overflow = torch.zeros(len(rows), dtype=torch.int8)
K.exact_rows(x, x, t.inv_temperatures, keys, stats, t.top_ks, t.top_ps, t.min_ps, overflow, tokens, True, True, True)
above = torch.where(z >= want[:, None], z + S.gumbel_noise(keys, torch.arange(500)), float("-inf"))
assert torch.equal(tokens, above.argmax(1)), (tokens, above.argmax(1))
# and their top logprobs, ties among them listed lowest id first
log_z = torch.logsumexp(x, 1)
lp = K.Logprobs(torch.empty(len(rows)), torch.empty(len(rows), 6), torch.empty(len(rows), 6, dtype=torch.int64))
K.exact_rows(x, x, t.inv_temperatures, keys, torch.stack([m, total, m, log_z], 1), t.top_ks, t.top_ps, t.min_ps,
             overflow, tokens, True, True, True, lp)
torch.testing.assert_close(lp.token, x.gather(1, tokens[:, None]).squeeze(1) - log_z)
torch.testing.assert_close(lp.top, x.topk(6, 1).values - log_z[:, None])
for r in range(len(rows)):
    listed = list(zip((-x[r, lp.top_ids[r]]).tolist(), lp.top_ids[r].tolist()))
    assert listed == sorted(listed) and len(set(lp.top_ids[r].tolist())) == 6, listed
# the pivots from the lane maxima (the top two of each pair of lanes of each chunk), as sorting them gives:
# every entry at or above is gathered, into its chunk's slots
t = S.SamplingTensors.from_rows(rows, 3000, [0], "cpu")
x = (torch.randn(len(rows), 3000) * 4).round() / 2
p = K.row_pass(x, x, t.inv_temperatures, t.greedy, torch.zeros(len(rows), 2, dtype=torch.int64), K.DRAW_NONE,
               raw_stats=False,
               filters=K.Filters(t.top_ks, t.top_ps, t.min_ps, 3, True, True, True))
z = x * t.inv_temperatures[:, None]
torch.testing.assert_close(p.stats[:, 0], z.max(1).values)
torch.testing.assert_close(p.stats[:, 1], torch.exp(z - z.max(1, keepdim=True).values).sum(1))
values, ids, counts = K.gather_candidates(x, t.inv_temperatures, p.pivot, 2048)
chunk = K._chunk_len(3000)
padded = torch.full((len(rows), K.CHUNKS * chunk), float("-inf"))
padded[:, :3000] = z
groups = padded.reshape(len(rows), K.CHUNKS, chunk // K.BLOCK, K.BLOCK // 2, 2).transpose(2, 3)
desc = groups.reshape(len(rows), K.CHUNKS, K.BLOCK // 2, -1).topk(2, dim=3).values.reshape(len(rows), -1).sort(
    1, descending=True).values
fitted = 0
for r in range(len(rows)):
    pivot, bounded = float("inf"), True
    if t.top_ks[r] < 3000:
        pivot = desc[r, t.top_ks[r] - 1].item()
    elif t.top_ps[r] < 1:
        cum = torch.exp(desc[r] - p.stats[r, 0]).cumsum(0)
        j = int((cum < t.top_ps[r].float() * p.stats[r, 1]).sum())
        pivot, bounded = desc[r, min(j, desc.shape[1] - 1)].item(), j < desc.shape[1]
    if t.min_ps[r] > 0:
        floor = (p.stats[r, 0] + torch.log(t.min_ps[r])).item()
        pivot = floor if pivot == float("inf") else max(pivot, floor)
    pivot = min(pivot, desc[r, 2].item())
    assert p.pivot[r] <= pivot and bool(p.ok[r]) == bounded, (r, p.pivot[r], pivot)
    want_ids = (z[r] >= pivot).nonzero().squeeze(1)
    got = ids[r][values[r] > float("-inf")].sort().values
    per_chunk = torch.bincount(want_ids // chunk, minlength=K.CHUNKS)
    assert torch.equal(counts[r].long(), per_chunk), (r, counts[r], per_chunk)
    if (per_chunk <= 2048 // K.CHUNKS).all():
        assert torch.equal(got.long(), want_ids), r
        fitted += 1
assert fitted >= 6, fitted
# penalised logits (x is not raw: raw statistics and top logprobs from raw), bf16, an odd vocabulary
raw16 = (torch.randn(len(seqs), 3001) * 3).to(torch.bfloat16)
x16 = raw16.float() - 2.0 * (torch.rand(len(seqs), 3001) < 0.1)
t = S.SamplingTensors.from_rows(seqs, 3001, [0], "cpu")
keys = S.row_keys(t.seeds, t.positions)
ours = S._forward_triton(raw16, x16, keys, t)
ref = S._forward_torch(raw16, x16, S.gumbel_noise(keys, torch.arange(3001)), t)
assert torch.equal(ours.token_ids, ref.token_ids), (ours.token_ids, ref.token_ids)
torch.testing.assert_close(ours.logprobs, ref.logprobs)
torch.testing.assert_close(ours.top_logprobs, ref.top_logprobs)
# a draw per vocabulary shard (tensor parallelism), then the best of them: the same tokens
from nanovllm.layers import sampling_kernels as K
rows = seqs[:1] + [Sequence(10 + i, [1, 2], SamplingParams(temperature=4.0)) for i in range(8)]
for i, seq in enumerate(rows[1:]):  # a greedy row, then rows whose draws the noise decides
    seq.sample_seed = 50 + i
t = S.SamplingTensors.from_rows(rows, V, [0], "cpu")
keys = S.row_keys(t.seeds, t.positions)
x = logits[[0] * len(rows)]
want = S._forward_torch(x, x, S.gumbel_noise(keys, torch.arange(V)), t).token_ids
assert len(set(want[1:].tolist())) > 4  # (the noise, not the logits, picks them)
parts = [K.row_pass(x[:, a:b], x[:, a:b], t.inv_temperatures, t.greedy, keys, K.DRAW_ALL, raw_stats=False,
                    offset=a) for a, b in ((0, 1700), (1700, V))]
got = S.best_of_shards(torch.stack([p.score for p in parts]), torch.stack([p.token for p in parts]))
assert torch.equal(got, want), (got, want)
print("ok")
"""


def test_triton_kernels_match_torch_path_in_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_sampler_kernels_compile_for_sm90():
    """Every variant the sampler launches compiles for sm90 without a GPU (the interpreter does not
    compile, so a constexpr misuse or a compiler abort would first show on the device)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "compile_sm90.py"
    run = subprocess.run([sys.executable, str(script), "--sampler"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    compiled = re.search(r"(\d+) of (\d+) compiled", run.stderr)
    assert compiled and compiled[1] == compiled[2] and int(compiled[2]) > 40, run.stderr[-500:]


# ---------------------------------------------------------------- GPU (Triton path)

def gpu_tensors(seqs, vocab):
    return SamplingTensors.from_rows(seqs, vocab, EOS, "cuda")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_draws_follow_exact_distribution(mode, flat):
    vocab = 8000 if flat else 4096  # flat: nuclei wider than the candidate buffer (full-sort rows)
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * (1 if flat else 3)
    counts = draw(row.cuda(), MODES[mode], 100_000)
    chi_square_ok(counts, exact_distribution(row, MODES[mode]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_torch_path_at_full_vocab(monkeypatch):
    from nanovllm.layers import sampler as S
    from nanovllm.layers import sampling_kernels as K

    vocab = 151_936
    gen = torch.Generator("cuda").manual_seed(8)
    logits = (torch.randn(96, vocab, device="cuda", generator=gen) * 1.5)
    top = torch.randint(0, vocab, (96, 20), device="cuda", generator=gen)
    logits.scatter_(1, top[:48], 8 + 6 * torch.rand(48, 20, device="cuda", generator=gen))  # half peaked, half flat
    logits = logits.to(torch.bfloat16)
    params = [dict(temperature=0), dict(temperature=0.8), dict(top_k=50), dict(top_p=0.9), dict(min_p=0.05),
              dict(top_k=3000, top_p=0.95, logprobs=5), dict(top_k=20, top_p=0.5, min_p=0.1, logprobs=2),
              dict(top_p=0.99, temperature=1.5)]
    seqs = [make_seq(seed=i, **params[i % len(params)]) for i in range(96)]
    t = gpu_tensors(seqs, vocab)
    keys = S.row_keys(t.seeds, t.positions)
    overflowed = []
    exact_rows = K.exact_rows
    monkeypatch.setattr(K, "exact_rows", lambda *args: overflowed.append((args[8] == 0).sum()) or exact_rows(*args))
    ours = S._forward_triton(logits, logits, keys, t)
    assert overflowed[0] > 0  # the flat rows' nuclei overflow the candidates: read whole
    noise = S.gumbel_noise(keys, torch.arange(logits.shape[1], device=logits.device))
    ref = S._forward_torch(logits, logits, noise, t)
    assert (ours.token_ids == ref.token_ids).float().mean() > 0.98  # only 1-ulp noise ties may differ
    raw = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(ours.logprobs, raw.gather(1, ours.token_ids[:, None]).squeeze(1))
    values, ids = raw.topk(5, dim=-1)
    torch.testing.assert_close(ours.top_logprobs, values)
    # bf16 logits tie often: the ids must carry the listed logprobs, in any order among ties.
    torch.testing.assert_close(raw.gather(1, ours.top_token_ids), values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_seeded_top_k_1_is_greedy_and_seeds_ignore_batch():
    vocab = 151_936
    logits = torch.randn(4096, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(9))
    out = Sampler()(logits, gpu_tensors([make_seq(seed=s, top_k=1) for s in range(4096)], vocab))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    row = logits[:1] * 0.05
    target = make_seq([1] * 9, seed=1234, temperature=0.9, top_p=0.95)
    alone = Sampler()(row, gpu_tensors([target], vocab)).token_ids.item()
    others = [make_seq(seed=s, temperature=0.7, top_k=30) for s in range(7)] + [make_seq(temperature=1.2)]
    batch = others[:3] + [target] + others[3:]
    mixed = logits[:9].clone()
    mixed[3] = row[0]
    assert Sampler()(mixed, gpu_tensors(batch, vocab)).token_ids[3].item() == alone


def test_host_keys_fresh_per_unseeded_row_and_reproducible():
    """With a key generator, unseeded rows get their keys on the host (a CUDA graph's draw reads them):
    fresh each step, reproducible from its seed; seeded rows keep (seed, position)'s, greedy rows 0."""
    import numpy as np

    from nanovllm.layers.sampler import SamplingArrays

    seqs = [make_seq(seed=11), make_seq(), make_seq(temperature=0), make_seq()]
    rng = np.random.default_rng(3)
    first, second = (SamplingArrays.from_rows(seqs, V, EOS, rng) for _ in range(2))
    again = SamplingArrays.from_rows(seqs, V, EOS, np.random.default_rng(3))
    k1, k2 = first.arrays[8], second.arrays[8]
    assert first.host_keys and np.array_equal(k1, again.arrays[8])
    assert np.array_equal(k1[0], k2[0]) and k1[2].tolist() == [0, 0]
    assert not np.array_equal(k1[[1, 3]], k2[[1, 3]]) and ((k1 >= 0) & (k1 < 2**32)).all()
    t = first.tensors([torch.from_numpy(a) for a in first.arrays])
    assert torch.equal(Sampler().keys(t, torch.device("cpu")), torch.from_numpy(k1))


def test_at_tokens_places_rows_at_their_logit_rows():
    import numpy as np

    from nanovllm.layers.sampler import SamplingArrays

    seqs = [make_seq(temperature=0.5, seed=1), make_seq(temperature=2.0, seed=2)]
    host = SamplingArrays.from_rows(seqs, V, EOS, np.random.default_rng(0))
    inv_t, greedy, keys = host.at_tokens(np.array([1, 4]), 6)
    assert inv_t.tolist() == [1, 2, 1, 1, 0.5, 1] and greedy.tolist() == [True, False, True, True, False, True]
    assert np.array_equal(keys[[1, 4]], host.arrays[8]) and not keys[[0, 2, 3, 5]].any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_draw_plain_is_the_samplers_draw(device):
    """A CUDA graph's draw (temperature or greedy) picks the sampler's token for the same keys: seeded
    rows (the sampler hashes their keys) on the CPU's torch path and the GPU's Triton kernels alike."""
    from nanovllm.layers.sampler import draw_plain

    g = torch.Generator().manual_seed(5)
    seqs = [make_seq(temperature=t, seed=s) for t, s in [(0.7, 1), (1.0, 2), (0.0, None), (1.3, 4)] * 9]
    logits = (torch.randn(len(seqs), 3000, generator=g) * 3).to(device)
    t = SamplingTensors.from_rows(seqs, 3000, EOS, device)
    want = Sampler()(logits, t).token_ids
    got = draw_plain(logits, t.inv_temperatures, t.greedy, t.keys)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert got[2].item() == logits[2].argmax().item()

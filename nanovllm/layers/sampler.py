"""Batched next-token sampling: min_tokens, penalties, temperature, top-k/top-p/min-p, seeds.

Each row is drawn with the Gumbel-max trick: argmax(logit / T + G) over the tokens the
filters keep, G a Gumbel variate that is a pure function of (key, token index). Seeded rows
take their key from (seed, position), so the same seed gives the same tokens whatever else
is in the batch, eager or in a CUDA graph; other rows draw a fresh key per step, in the engine
from a host generator seeded by `seed` (a CUDA graph's draw reads the keys with the step's
inputs), else from the sampler's `torch.Generator` (never the global RNG), or, in a torch-path
batch with no seeded row, their Gumbel variates straight from it.

The filters keep exactly the tokens HF's TopK, TopP then MinP warpers keep
(min_tokens_to_keep=1), as a per-row threshold on the scaled logits: `z >= tau`. On CUDA,
Triton kernels find tau without sorting the vocabulary: one read gives the row's max, its
softmax normaliser and lane maxima, which bound the thresholds from below; a second read
gathers the few entries above that bound, where tau is found and the filtered rows are drawn
(`sampling_kernels`). A row whose set does not fit that buffer (a nucleus of thousands of
tokens, a flat row's ties) is finished by a kernel that reads it whole (`sampling_kernels.exact_rows`):
by rejection when only top-p (and min-p) filter it, the draw over the row checked against the mass
above it and redrawn above it if outside the nucleus; else by bisection for the exact top-k (and
top-p) threshold. Nothing waits on the host: a step's sampling is queued like its forward. On CPU,
and for small batches on CUDA, the same semantics run in plain torch.

Logprobs are those of the raw logits (before penalties and temperature), vLLM's default,
and are computed only when some row asked for them (`sampling_params.logprobs` not None);
the engine's `cumulative_logprob` is therefore filled only for requests that asked for
logprobs, as in vLLM.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm.layers.sampling_kernels import Logprobs

# Temperatures below this are treated as greedy (as vLLM does): dividing by them overflows.
GREEDY_TEMPERATURE = 1e-5
# Candidates gathered per row on the GPU path (`CANDIDATES // sampling_kernels.CHUNKS` slots per chunk);
# rows needing more are drawn by rejection (top-p) or sorted in full.
CANDIDATES = 2048
# Top logprobs up to this many come from the candidates (the select kernel takes them one by one, and
# the pivots must bound them); more from a torch topk over the raw logits.
BUFFER_TOP_LOGPROBS = 64
# Below this many rows the torch path runs, whose elementwise kernels spread each row over the whole
# GPU (with one Triton program per row, one 152k-wide row took 1.8 ms on the H100). With
# `sampling_kernels.CHUNKS` programs a row, at 16 rows (call AR, H200) Triton won top-p (0.37 against
# 0.65 ms) and the +lp5 modes, and lost temperature (0.20 against 0.11), min-p and a flat nucleus.
TRITON_MIN_ROWS = 32

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)  # the key hash runs on torch tensors and numpy arrays alike
DrawArrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # (inv_t, greedy, keys) of a plain draw (`draw_plain`)


class SamplingRow(Protocol):
    """What the sampler reads of each row (the engine's Sequence has all of it)."""

    sampling_params: SamplingParams
    sample_seed: int | None
    num_tokens: int  # position of the token being sampled
    token_ids: list[int]
    num_prompt_tokens: int
    num_completion_tokens: int
    completion_token_ids: list[int]


@dataclass
class PenaltyTensors:
    """Per-row penalties plus the tokens they look at, concatenated over the batch.

    Row i owns the next `lengths[0, i]` entries of `token_ids`; the first `lengths[1, i]` of
    them are prompt tokens (seen by the repetition penalty only), the rest were generated
    (seen by all three penalties). Rows whose penalties are off own no tokens.
    """

    repetition: Tensor  # [B] float32, 1 = off
    frequency: Tensor  # [B] float32, 0 = off
    presence: Tensor  # [B] float32, 0 = off
    token_ids: Tensor  # [N] int64
    lengths: Tensor  # [2, B] int64: tokens per row, prompt tokens among them


@dataclass
class SamplingTensors:
    """Everything the sampler needs for one step: [B] tensors on the device plus host flags.

    Filters are off (top_k = V, top_p = 1, min_p = 0) on greedy rows, and the `do_*` flags
    say whether any row uses them, so the sampler skips what nobody asked for.
    """

    inv_temperatures: Tensor  # [B] float32; 1.0 on greedy rows
    greedy: Tensor  # [B] bool
    top_ks: Tensor  # [B] int64 in [1, V]; V where off
    top_ps: Tensor  # [B] float64 (exact, so 1 - top_p rounds like HF); 1.0 where off
    min_ps: Tensor  # [B] float32; 0.0 where off
    seeded: Tensor  # [B] bool: rows whose noise comes from (seed, position)
    seeds: Tensor  # [B] int64: the seed's low 64 bits (0 where unseeded)
    positions: Tensor  # [B] int64: position of the token being sampled
    keys: Tensor  # [B, 2] int64: the noise keys, made on the host (`SamplingArrays.from_rows`)
    penalties: PenaltyTensors | None
    min_tokens_blocked: Tensor | None  # [2, M] int64: (row, token id) pairs to set to -inf
    all_greedy: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool
    any_seeded: bool
    any_unseeded: bool  # some sampled (non-greedy) row without a seed
    want_logprobs: bool  # some row asked for logprobs
    max_num_logprobs: int  # K for the top-K logprobs; 0 = none
    vocab_size: int
    host_keys: bool = False  # unseeded rows' keys were drawn on the host too (else they hold 0)

    @property
    def do_filter(self) -> bool:
        return self.do_top_k or self.do_top_p or self.do_min_p

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[SamplingRow],
        vocab_size: int,
        eos_token_ids: list[int],
        device: torch.device | str,
        upload: Callable[[list[np.ndarray]], list[Tensor]] | None = None,
    ) -> SamplingTensors:
        """Build the step's arrays on the host and move them all with one `upload` call."""
        host = SamplingArrays.from_rows(rows, vocab_size, eos_token_ids)
        tensors = upload(host.arrays) if upload is not None else [torch.from_numpy(a).to(device) for a in host.arrays]
        return host.tensors(tensors)


@dataclass
class SamplingArrays:
    """The host half of `SamplingTensors`: its arrays, to upload (the runner uploads them with the
    step's model inputs, in one copy), and the flags read on the host."""

    arrays: list[np.ndarray]
    has_penalties: bool
    has_blocked: bool
    all_greedy: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool
    any_seeded: bool
    any_unseeded: bool
    want_logprobs: bool
    max_num_logprobs: int
    vocab_size: int
    host_keys: bool

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], vocab_size: int, eos_token_ids: list[int],
                  key_rng: np.random.Generator | None = None) -> SamplingArrays:
        """The rows' arrays. Every row's noise keys are made here: a seeded row's from (seed,
        position); with `key_rng`, an unseeded row's fresh from it (a CUDA graph's draw reads
        them), else 0 and the sampler draws them on the device."""
        batch = len(rows)
        temperature = np.ones(batch, np.float32)
        top_k = np.full(batch, vocab_size, np.int64)
        top_p = np.ones(batch, np.float64)
        min_p = np.zeros(batch, np.float32)
        seeded = np.zeros(batch, np.bool_)
        seeds = np.zeros(batch, np.int64)
        positions = np.zeros(batch, np.int64)
        greedy = np.zeros(batch, np.bool_)
        penalty_rows: list[int] = []
        blocked_rows: list[int] = []
        blocked_ids: list[int] = []
        max_num_logprobs = 0
        want_logprobs = False
        for row, seq in enumerate(rows):
            sp = seq.sampling_params
            if sp.temperature < GREEDY_TEMPERATURE:
                greedy[row] = True
            else:
                temperature[row] = sp.temperature
                if 0 < sp.top_k < vocab_size:
                    top_k[row] = sp.top_k
                top_p[row] = sp.top_p
                min_p[row] = sp.min_p
                if seq.sample_seed is not None:
                    seeded[row] = True
                    seeds[row] = _to_int64(seq.sample_seed)
                    positions[row] = seq.num_tokens
            if sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0:
                penalty_rows.append(row)
            if sp.min_tokens and seq.num_completion_tokens < sp.min_tokens:
                ids = sp.stop_token_ids if sp.ignore_eos else [*eos_token_ids, *sp.stop_token_ids]
                ids = [i for i in ids if i < vocab_size]
                blocked_rows.extend([row] * len(ids))
                blocked_ids.extend(ids)
            if sp.logprobs is not None:
                want_logprobs = True
                max_num_logprobs = max(max_num_logprobs, sp.logprobs)
        # The keys are mixed here, on ~B numbers, rather than on the device, where the hash's
        # ~50 tiny elementwise kernels cost more host time than a small batch's whole forward.
        keys = np.zeros((batch, 2), np.int64)
        if seeded.any():
            keys[seeded] = row_keys_np(seeds[seeded], positions[seeded])
        unseeded = ~greedy & ~seeded
        if key_rng is not None and unseeded.any():
            keys[unseeded] = key_rng.integers(0, 2**32, size=(int(unseeded.sum()), 2), dtype=np.int64)
        arrays = [1.0 / temperature, greedy, top_k, top_p, min_p, seeded, seeds, positions, keys]
        penalty_arrays = _penalty_arrays(rows, penalty_rows, batch)
        if penalty_arrays is not None:
            arrays += penalty_arrays
        if blocked_ids:
            arrays.append(np.array([blocked_rows, blocked_ids], np.int64))
        return cls(
            arrays, has_penalties=penalty_arrays is not None, has_blocked=bool(blocked_ids),
            all_greedy=bool(greedy.all()),
            do_top_k=bool((top_k < vocab_size).any()),
            do_top_p=bool((top_p < 1.0).any()),
            do_min_p=bool((min_p > 0.0).any()),
            any_seeded=bool(seeded.any()),
            any_unseeded=bool(unseeded.any()),
            want_logprobs=want_logprobs,
            max_num_logprobs=max_num_logprobs,
            vocab_size=vocab_size,
            host_keys=key_rng is not None,
        )

    @property
    def plain(self) -> bool:
        """Temperature (or greedy) and nothing else: the draw can run on each vocabulary shard
        (`sample_vocab_shard`)."""
        return not (self.has_penalties or self.has_blocked or self.do_top_k or self.do_top_p or self.do_min_p
                    or self.want_logprobs)

    def at_tokens(self, logit_rows: np.ndarray, num_tokens: int) -> DrawArrays:
        """(inv_t, greedy, keys) at each of num_tokens query tokens, for a CUDA graph's plain draw
        over all of them: each row's at its logit row, greedy elsewhere (drawn, never read)."""
        inv_t, greedy, keys = np.ones(num_tokens, np.float32), np.ones(num_tokens, np.bool_), \
            np.zeros((num_tokens, 2), np.int64)
        inv_t[logit_rows], greedy[logit_rows], keys[logit_rows] = self.arrays[0], self.arrays[1], self.arrays[8]
        return inv_t, greedy, keys

    def tensors(self, uploaded: list[Tensor]) -> SamplingTensors:
        """The `SamplingTensors` of these arrays once uploaded (in `arrays`' order)."""
        inv_t, greedy, top_k, top_p, min_p, seeded, seeds, positions, keys = uploaded[:9]
        return SamplingTensors(
            inv_temperatures=inv_t, greedy=greedy, top_ks=top_k, top_ps=top_p, min_ps=min_p,
            seeded=seeded, seeds=seeds, positions=positions, keys=keys,
            penalties=PenaltyTensors(*uploaded[9:14]) if self.has_penalties else None,
            min_tokens_blocked=uploaded[-1] if self.has_blocked else None,
            all_greedy=self.all_greedy, do_top_k=self.do_top_k, do_top_p=self.do_top_p, do_min_p=self.do_min_p,
            any_seeded=self.any_seeded, any_unseeded=self.any_unseeded, want_logprobs=self.want_logprobs,
            max_num_logprobs=self.max_num_logprobs, vocab_size=self.vocab_size, host_keys=self.host_keys,
        )


def _penalty_arrays(rows: Sequence[SamplingRow], penalty_rows: list[int], batch: int) -> list[np.ndarray] | None:
    """[rep, freq, pres, token ids, lengths] for PenaltyTensors, or None when no row has tokens to penalise."""
    rep = np.ones(batch, np.float32)
    freq = np.zeros(batch, np.float32)
    pres = np.zeros(batch, np.float32)
    lengths = np.zeros((2, batch), np.int64)
    tokens: list[list[int]] = []
    for row in penalty_rows:
        seq = rows[row]
        sp = seq.sampling_params
        rep[row], freq[row], pres[row] = sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
        if sp.repetition_penalty != 1.0:
            ids, num_prompt = seq.token_ids, seq.num_prompt_tokens
        else:
            ids, num_prompt = seq.completion_token_ids, 0
        tokens.append(ids)
        lengths[0, row], lengths[1, row] = len(ids), num_prompt
    if not lengths[0].any():
        return None
    return [rep, freq, pres, np.fromiter((i for ids in tokens for i in ids), np.int64), lengths]


def _to_int64(value: int) -> int:
    """The low 64 bits of `value` as a signed int64 (seeds may be any Python int)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def apply_min_tokens(logits: Tensor, blocked: Tensor) -> Tensor:
    """Set logits[row, id] to -inf for each (row, id) column of `blocked` [2, M]."""
    return logits.index_put((blocked[0], blocked[1]), torch.full((), float("-inf"), device=logits.device))


def apply_penalties(logits: Tensor, p: PenaltyTensors) -> Tensor:
    """Repetition penalty (HF's rule, over prompt + generated tokens), then frequency and
    presence penalties (vLLM/OpenAI: over generated tokens only)."""
    batch, vocab = logits.shape
    num_tokens = p.token_ids.shape[0]
    lengths, prompt_lengths = p.lengths[0], p.lengths[1]
    device = logits.device
    rows = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=num_tokens)
    starts = torch.cumsum(lengths, 0) - lengths
    generated = torch.arange(num_tokens, device=device) - starts[rows] >= prompt_lengths[rows]
    # Ids >= vocab (embedding larger than the LM head) go to a scratch column that is dropped, as in HF.
    flat = rows * (vocab + 1) + p.token_ids.clamp(max=vocab)
    seen = torch.zeros(batch * (vocab + 1), dtype=torch.bool, device=device).scatter_(0, flat, True)
    counts = torch.zeros(batch * (vocab + 1), dtype=logits.dtype, device=device)
    counts.scatter_add_(0, flat, generated.to(logits.dtype))
    seen = seen.view(batch, vocab + 1)[:, :vocab]
    counts = counts.view(batch, vocab + 1)[:, :vocab]
    rep = p.repetition.unsqueeze(1)
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - p.frequency.unsqueeze(1) * counts
    return logits - p.presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(
    logits: Tensor, top_ks: Tensor | None = None, top_ps: Tensor | None = None, min_ps: Tensor | None = None,
) -> Tensor:
    """Mask logits to -inf like HF's TopK, then TopP, then MinP warpers (min_tokens_to_keep=1).

    The plain-torch reference (the CPU path): one sort per row. Rows whose parameter is off
    (top_k = V, top_p = 1, min_p = 0) are left untouched.
    """
    neg_inf = float("-inf")
    if top_ks is not None or top_ps is not None:
        sorted_logits, sorted_idx = logits.sort(dim=-1)
        if top_ks is not None:
            kth = sorted_logits.gather(1, (logits.shape[1] - top_ks).unsqueeze(1))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
        if top_ps is not None:
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # float32(1 - top_p) like HF's Python-float comparison; -1 (never true) on rows with top-p off.
            cutoff = torch.where(top_ps < 1.0, 1.0 - top_ps, -1.0).to(cumulative.dtype)
            remove = cumulative <= cutoff.unsqueeze(1)
            remove[:, -1] = False
            sorted_logits = sorted_logits.masked_fill(remove, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
    if min_ps is not None:
        probs = logits.softmax(dim=-1)
        threshold = min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def _fmix32(x: ArrayT) -> ArrayT:
    """A bijective 32-bit avalanche mix of x in [0, 2**32) (C. Wellons' hash-prospector
    xorshift-multiply form). Both multipliers are < 2**31, so x * c < 2**63 never overflows int64.
    The Triton kernels compute the same function in uint32."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _key_pair(seeds: ArrayT, positions: ArrayT) -> tuple[ArrayT, ArrayT]:
    """The two keys of `row_keys`, in operators only: the same int64 arithmetic in torch or numpy."""
    key = _fmix32((positions & _MASK32) ^ 0x9E3779B9)
    key = _fmix32(key ^ (seeds & _MASK32))
    key = _fmix32(key ^ ((seeds >> 32) & _MASK32))
    return key, _fmix32(key ^ 0x632BE5AB)


def row_keys(seeds: Tensor, positions: Tensor) -> Tensor:
    """[B, 2] int64 in [0, 2**32): the two 32-bit keys of each row's noise, from (seed, position)."""
    return torch.stack(_key_pair(seeds, positions), dim=1)


def row_keys_np(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`row_keys` on the host, bit for bit."""
    return np.stack(_key_pair(seeds, positions), axis=1)


def uniform_from_bits(bits: Tensor) -> Tensor:
    """32 random bits -> float32 uniform in (0, 1). Only the top 23 bits are used, so the
    largest value, 1 - 2**-24, is representable and -log(u) is never 0."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def gumbel_noise(keys: Tensor, token_ids: Tensor) -> Tensor:
    """Gumbel noise [B, N] of the given tokens ([N] or [B, N]) under each row's keys [B, 2]."""
    key, key2 = keys[:, :1], keys[:, 1:]
    bits = _fmix32(_fmix32((token_ids.to(torch.int64) + key) & _MASK32) ^ key2)
    return -torch.log(-torch.log(uniform_from_bits(bits)))


def seeded_exponential_noise(seeds: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """Exp(1) noise [S, V] that is a pure function of (seed, position, token index): the E of
    the exponential race argmax(p / E), equivalent to the Gumbel-max draw the sampler makes."""
    return torch.exp(-gumbel_noise(row_keys(seeds, positions), torch.arange(vocab_size, device=seeds.device)))


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] float32 raw-model logprob of the sampled token; None when no row asked
    top_logprobs: Tensor | None  # [B, K] float32, or None when no row asked for K > 0
    top_token_ids: Tensor | None  # [B, K] int64


class Sampler(torch.nn.Module):
    """Picks one token per row; see the module docstring for the semantics.

    `generator` draws the noise (or the noise keys) of unseeded rows; without one, the sampler
    makes its own (non-deterministically seeded) on the logits' device at first use.
    """

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__()
        self.generator = generator

    def forward(self, logits: Tensor, t: SamplingTensors) -> SamplerOutput:
        """The rows' tokens (and logprobs asked for), queued on the logits' device: no host sync."""
        raw = logits
        x = logits
        if t.min_tokens_blocked is not None:
            x = apply_min_tokens(x.float(), t.min_tokens_blocked)
        if t.penalties is not None:
            x = apply_penalties(x.float(), t.penalties)
        if self._on_triton(logits):
            return _forward_triton(raw, x, self.keys(t, logits.device), t)
        return _forward_torch(raw, x, None if t.all_greedy else self._noise(t, x), t)

    @staticmethod
    def _on_triton(logits: Tensor) -> bool:
        return logits.is_cuda and logits.shape[0] >= TRITON_MIN_ROWS

    def keys(self, t: SamplingTensors, device: torch.device) -> Tensor:
        """Each row's two 32-bit noise keys: from (seed, position) on seeded rows, fresh on the
        others, from the host (`t.host_keys`) or else from the generator (uniform keys need no
        mixing)."""
        if not t.any_unseeded or t.host_keys:
            return t.keys
        fresh = torch.randint(0, 2**32, t.keys.shape, dtype=torch.int64, generator=self._generator(device),
                              device=self.generator.device).to(device, non_blocking=True)
        return torch.where(t.seeded.unsqueeze(1), t.keys, fresh) if t.any_seeded else fresh

    def _noise(self, t: SamplingTensors, x: Tensor) -> Tensor:
        """Gumbel noise [B, V] for the torch path. A seeded row's must be the hash of its keys (its
        draws may not depend on the batch), so any seeded row hashes them all; otherwise it comes
        straight from the generator, five kernels instead of the hash's thirty (small batches
        are host-bound). torch.rand is in [0, 1): a 0 gives noise -inf, never +inf."""
        if t.any_seeded:
            return gumbel_noise(self.keys(t, x.device), torch.arange(x.shape[1], device=x.device))
        uniform = torch.rand(x.shape, generator=self._generator(x.device), device=self.generator.device)
        return -torch.log(-torch.log(uniform.to(x.device, non_blocking=True)))

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device)
            self.generator.seed()
        return self.generator


def sample_vocab_shard(logits: Tensor, inv_t: Tensor, greedy: Tensor, keys: Tensor, start: int,
                       vocab_size: int) -> tuple[Tensor, Tensor]:
    """Each row's Gumbel-max draw restricted to one tensor-parallel rank's shard of the vocabulary:
    (score [B] float32, token [B] int64), where column j of `logits` is token start + j and columns
    past `vocab_size` (padding) take no part. The draw over the whole vocabulary is the best of the
    shards' (`best_of_shards`); with the same keys it is the token the sampler draws from the
    gathered logits, without moving the logits (78 MB per step at 256 rows of Qwen3's vocabulary)."""
    x = logits[:, : max(0, min(logits.shape[1], vocab_size - start))]
    if x.shape[1] == 0:
        return torch.full_like(inv_t, float("-inf")), torch.zeros_like(keys[:, 0])
    if x.is_cuda and x.shape[0] >= TRITON_MIN_ROWS:
        from nanovllm.layers import sampling_kernels as kernels

        p = kernels.row_pass(x, x, inv_t, greedy, keys, kernels.DRAW_ALL, raw_stats=False, offset=start)
        return p.score, p.token
    z = x.float() * inv_t.unsqueeze(1)
    scores = torch.where(greedy.unsqueeze(1), z, z + gumbel_noise(keys, torch.arange(start, start + x.shape[1],
                                                                                    device=x.device)))
    best = scores.argmax(dim=1)
    return scores.gather(1, best.unsqueeze(1)).squeeze(1), best + start


def draw_plain(logits: Tensor, inv_t: Tensor, greedy: Tensor, keys: Tensor) -> Tensor:
    """[B] int64: each row's Gumbel-max draw at its temperature (argmax on greedy rows) under its keys,
    with no host sync, so a CUDA graph can hold it: on CUDA the Triton row pass whatever the batch
    (inside a graph its launches cost no host time), elsewhere the same draw in torch."""
    if logits.is_cuda:
        from nanovllm.layers import sampling_kernels as kernels

        return kernels.row_pass(logits, logits, inv_t, greedy, keys, kernels.DRAW_ALL, raw_stats=False).token
    return sample_vocab_shard(logits, inv_t, greedy, keys, 0, logits.shape[1])[1]


def best_of_shards(scores: Tensor, tokens: Tensor) -> Tensor:
    """[B] tokens from every shard's (score, token) [ranks, B]: the highest score, and on a tie the
    lowest rank's, whose tokens are the lowest, as one argmax over the whole row breaks it."""
    return tokens.gather(0, scores.argmax(dim=0, keepdim=True)).squeeze(0)


def _forward_torch(raw: Tensor, x: Tensor, noise: Tensor | None, t: SamplingTensors) -> SamplerOutput:
    """The sampler in plain torch, with the Gumbel noise given (None when every row is greedy)."""
    x = x.float()
    tokens = x.argmax(dim=-1)
    if not t.all_greedy:
        z = x * t.inv_temperatures.unsqueeze(1)
        if t.do_filter:
            z = apply_top_k_top_p_min_p(z, t.top_ks if t.do_top_k else None, t.top_ps if t.do_top_p else None,
                                        t.min_ps if t.do_min_p else None)
        scores = z + noise
        tokens = torch.where(t.greedy, tokens, scores.argmax(dim=-1))
    return _logprobs(raw, tokens, t, None)


def _logprobs(raw: Tensor, tokens: Tensor, t: SamplingTensors, log_z: Tensor | None,
              token_logprobs: Tensor | None = None, top: tuple[Tensor, Tensor] | None = None) -> SamplerOutput:
    """Raw-logit logprobs of `tokens` and the top-K (logprobs, int64 ids): each computed here unless given."""
    if not t.want_logprobs:
        return SamplerOutput(tokens, None, None, None)
    if log_z is None:
        log_z = torch.logsumexp(raw.float(), dim=-1)
    if token_logprobs is None:
        token_logprobs = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).float() - log_z
    if t.max_num_logprobs and top is None:
        values, ids = raw.topk(min(t.max_num_logprobs, raw.shape[1]), dim=-1)
        top = (values.float() - log_z.unsqueeze(1), ids)
    return SamplerOutput(tokens, token_logprobs, *(top or (None, None)))


def _forward_triton(raw: Tensor, x: Tensor, keys: Tensor, t: SamplingTensors) -> SamplerOutput:
    from nanovllm.layers import sampling_kernels as kernels

    inv_t = t.inv_temperatures
    # Without penalties, x is raw and its top-K comes from the same candidate buffer.
    top_from_buffer = 0 < t.max_num_logprobs <= BUFFER_TOP_LOGPROBS and x is raw
    lp = _logprob_buffers(x, t, top_from_buffer) if t.want_logprobs else None
    token_lp = None if lp is None else lp.token
    if not t.do_filter and not top_from_buffer:
        p = kernels.row_pass(x, raw, inv_t, t.greedy, keys, kernels.DRAW_ALL, raw_stats=t.want_logprobs,
                             token_logprobs=token_lp)
        return _logprobs(raw, p.token, t, p.stats[:, 3], token_lp)
    filters = kernels.Filters(t.top_ks, t.top_ps, t.min_ps, t.max_num_logprobs if top_from_buffer else 0, t.do_top_k,
                              t.do_top_p, t.do_min_p)
    p = kernels.row_pass(x, raw, inv_t, t.greedy, keys, kernels.DRAW_UNFILTERED, raw_stats=t.want_logprobs,
                         filters=filters)
    values, ids, counts = kernels.gather_candidates(x, inv_t, p.pivot, CANDIDATES)
    kernels.select_and_draw(values, ids, counts, inv_t, t.greedy, keys, p.stats, t.top_ks, t.top_ps, t.min_ps,
                            t.vocab_size, p.ok, p.token, t.do_top_k, t.do_top_p, t.do_min_p, raw, lp)
    kernels.exact_rows(x, raw, inv_t, keys, p.stats, t.top_ks, t.top_ps, t.min_ps, p.ok, p.token, t.do_top_k,
                       t.do_top_p, t.do_min_p, lp)
    top = (lp.top, lp.top_ids) if top_from_buffer else None
    return _logprobs(raw, p.token, t, p.stats[:, 3] if t.want_logprobs else None, token_lp, top)


def _logprob_buffers(x: Tensor, t: SamplingTensors, top: bool) -> Logprobs:
    """Where the kernels write the logprobs (rather than a few small torch ops each): the token's, and
    the top K's when `top`."""
    from nanovllm.layers import sampling_kernels as kernels

    batch, k = x.shape[0], min(t.max_num_logprobs, x.shape[1])
    tops = (torch.empty(batch, k, dtype=torch.float32, device=x.device),
            torch.empty(batch, k, dtype=torch.int64, device=x.device)) if top else (None, None)
    return kernels.Logprobs(torch.empty(batch, dtype=torch.float32, device=x.device), *tops)

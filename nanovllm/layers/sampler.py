"""Batched next-token sampling: min_tokens, penalties, temperature, top-k/top-p/min-p, seeds.

Everything runs on whole-batch tensors; per-sequence Python work is confined to
`SamplingTensors.from_sequences`, which builds each optional tensor only when some
sequence in the batch uses the feature.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch
from torch import Tensor

from nanovllm.engine.sequence import Sequence

# Temperatures below this are treated as greedy (as vLLM does): dividing by them overflows.
GREEDY_TEMPERATURE = 1e-5

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


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
    """Everything the sampler needs for one step, already on the device.

    Optional tensors are None when no row of the batch uses the feature; the sampler
    then skips that work entirely.
    """

    temperatures: Tensor  # [B] float32; 1.0 on greedy rows
    greedy_rows: Tensor | None  # [B] bool; None unless the batch mixes greedy and sampled rows
    all_greedy: bool
    top_ks: Tensor | None  # [B] int64 in [1, V]; V where off
    max_top_k: int  # largest entry of top_ks (0 when top_ks is None)
    top_ps: Tensor | None  # [B] float64 (exact, so 1 - top_p rounds like HF); 1.0 where off
    min_ps: Tensor | None  # [B] float32; 0.0 where off
    penalties: PenaltyTensors | None
    min_tokens_blocked: Tensor | None  # [2, M] int64: (row, token id) pairs to set to -inf
    seeded_rows: Tensor | None  # [S] int64 batch rows of seeded, non-greedy sequences
    seeds: Tensor | None  # [S] int64 (the seed's low 64 bits)
    positions: Tensor | None  # [S] int64 position of the token being sampled (seq.num_tokens)
    max_num_logprobs: int  # K for the top-K logprobs; 0 = none

    @property
    def do_top_k(self) -> bool:
        return self.top_ks is not None

    @property
    def do_top_p(self) -> bool:
        return self.top_ps is not None

    @property
    def do_min_p(self) -> bool:
        return self.min_ps is not None

    @property
    def do_penalties(self) -> bool:
        return self.penalties is not None

    @property
    def any_seeded(self) -> bool:
        return self.seeded_rows is not None

    @classmethod
    def from_sequences(
        cls,
        seqs: list[Sequence],
        vocab_size: int,
        eos_token_ids: list[int],
        device: torch.device | str,
    ) -> SamplingTensors:
        temperatures: list[float] = []
        greedy: list[bool] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        rep: list[float] = []
        freq: list[float] = []
        pres: list[float] = []
        penalty_tokens = array("q")  # int64 buffer: far cheaper to fill and convert than a list
        penalty_lens: list[int] = []  # tokens of each row in penalty_tokens
        penalty_prompt_lens: list[int] = []  # leading prompt tokens among them
        blocked_rows: list[int] = []
        blocked_ids: list[int] = []
        seeded_rows: list[int] = []
        seeds: list[int] = []
        positions: list[int] = []
        do_top_k = do_top_p = do_min_p = do_penalties = False
        max_num_logprobs = 0

        for row, seq in enumerate(seqs):
            sp = seq.sampling_params
            is_greedy = sp.temperature < GREEDY_TEMPERATURE
            greedy.append(is_greedy)
            temperatures.append(1.0 if is_greedy else sp.temperature)
            k = sp.top_k if 0 < sp.top_k < vocab_size else vocab_size
            top_ks.append(k)
            top_ps.append(sp.top_p)
            min_ps.append(sp.min_p)
            if not is_greedy:
                do_top_k |= k < vocab_size
                do_top_p |= sp.top_p < 1.0
                do_min_p |= sp.min_p > 0.0
                if seq.sample_seed is not None:
                    seeded_rows.append(row)
                    seeds.append(_to_int64(seq.sample_seed))
                    positions.append(seq.num_tokens)
            rep.append(sp.repetition_penalty)
            freq.append(sp.frequency_penalty)
            pres.append(sp.presence_penalty)
            if sp.repetition_penalty != 1.0:
                tokens, num_prompt = seq.token_ids, seq.num_prompt_tokens
            elif sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0:
                tokens, num_prompt = seq.completion_token_ids, 0
            else:
                tokens, num_prompt = [], 0
            do_penalties |= bool(tokens)
            penalty_tokens.extend(tokens)
            penalty_lens.append(len(tokens))
            penalty_prompt_lens.append(num_prompt)
            if seq.num_completion_tokens < sp.min_tokens:
                ids = sp.stop_token_ids if sp.ignore_eos else [*eos_token_ids, *sp.stop_token_ids]
                ids = [i for i in ids if i < vocab_size]
                blocked_rows.extend([row] * len(ids))
                blocked_ids.extend(ids)
            if sp.logprobs:
                max_num_logprobs = max(max_num_logprobs, sp.logprobs)

        def to_dev(values: list, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        all_greedy = all(greedy)
        penalties = None
        if do_penalties:
            params = to_dev([rep, freq, pres], torch.float32)
            penalties = PenaltyTensors(
                params[0], params[1], params[2],
                token_ids=torch.frombuffer(penalty_tokens, dtype=torch.int64).to(device, non_blocking=True),
                lengths=to_dev([penalty_lens, penalty_prompt_lens], torch.int64),
            )
        seeded = bool(seeded_rows)
        if seeded:
            seed_info = to_dev([seeded_rows, seeds, positions], torch.int64)
        return cls(
            temperatures=to_dev(temperatures, torch.float32),
            greedy_rows=to_dev(greedy, torch.bool) if any(greedy) and not all_greedy else None,
            all_greedy=all_greedy,
            top_ks=to_dev(top_ks, torch.int64) if do_top_k else None,
            max_top_k=max(top_ks) if do_top_k else 0,
            top_ps=to_dev(top_ps, torch.float64) if do_top_p else None,
            min_ps=to_dev(min_ps, torch.float32) if do_min_p else None,
            penalties=penalties,
            min_tokens_blocked=to_dev([blocked_rows, blocked_ids], torch.int64) if blocked_ids else None,
            seeded_rows=seed_info[0] if seeded else None,
            seeds=seed_info[1] if seeded else None,
            positions=seed_info[2] if seeded else None,
            max_num_logprobs=max_num_logprobs,
        )


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
    logits: Tensor,
    top_ks: Tensor | None = None,
    top_ps: Tensor | None = None,
    min_ps: Tensor | None = None,
    max_top_k: int = 0,
) -> Tensor:
    """Mask logits to -inf like HF's TopK, then TopP, then MinP warpers (min_tokens_to_keep=1).

    Rows whose parameter is off (top_k = V, top_p = 1, min_p = 0) are left untouched.
    With top-p, one ascending sort serves both top-k and top-p; top-k alone uses topk(max_top_k).
    """
    neg_inf = float("-inf")
    if top_ps is not None:
        sorted_logits, sorted_idx = logits.sort(dim=-1)
        if top_ks is not None:
            kth = sorted_logits.gather(1, (logits.shape[1] - top_ks).unsqueeze(1))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # float32(1 - top_p) like HF's Python-float comparison; -1 (never true) on rows with top-p off.
        cutoff = torch.where(top_ps < 1.0, 1.0 - top_ps, -1.0).to(cumulative.dtype)
        remove = cumulative <= cutoff.unsqueeze(1)
        remove[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(remove, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
    elif top_ks is not None:
        top_values = logits.topk(max_top_k, dim=-1).values
        kth = top_values.gather(1, (top_ks - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, neg_inf)
    if min_ps is not None:
        probs = logits.softmax(dim=-1)
        threshold = min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def _fmix32(x: Tensor) -> Tensor:
    """A bijective 32-bit avalanche mix of x in [0, 2**32) (C. Wellons' hash-prospector
    xorshift-multiply form). Both multipliers are < 2**31, so x * c < 2**63 never overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def seeded_exponential_noise(seeds: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """Exp(1) noise [S, V] that is a pure function of (seed, position, token index).

    Counter-based hashing instead of a torch.Generator per row: no per-row kernels, and a
    row's noise does not depend on what else is in the batch or where the row sits.
    """
    seeds, positions = seeds.unsqueeze(1), positions.unsqueeze(1)
    key = _fmix32((positions & _MASK32) ^ 0x9E3779B9)
    key = _fmix32(key ^ (seeds & _MASK32))
    key = _fmix32(key ^ ((seeds >> 32) & _MASK32))
    key2 = _fmix32(key ^ 0x632BE5AB)
    index = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64).unsqueeze(0)
    bits = _fmix32(_fmix32((index + key) & _MASK32) ^ key2)
    # Top 24 bits -> uniform in (0, 1), exact in float32, never 0 or 1.
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    return -torch.log(uniform)


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32: raw-model logprob of the sampled token
    top_logprobs: Tensor | None  # [B, K] float32, or None when no row asked for logprobs
    top_token_ids: Tensor | None  # [B, K] int64


class Sampler(torch.nn.Module):
    """Picks one token per row. Logprobs are those of the raw logits (vLLM's default).

    Unseeded rows draw from `generator` (the engine's own, never the global RNG).
    """

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__()
        self.generator = generator

    def forward(self, logits: Tensor, t: SamplingTensors) -> SamplerOutput:
        logits = logits.float()
        # logprob = logit - logsumexp: cheaper than materialising log_softmax over [B, V].
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
        raw_logits = logits
        if t.min_tokens_blocked is not None:
            logits = apply_min_tokens(logits, t.min_tokens_blocked)
        if t.penalties is not None:
            logits = apply_penalties(logits, t.penalties)
        if t.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, t, self.generator)
            if t.greedy_rows is not None:
                token_ids = torch.where(t.greedy_rows, logits.argmax(dim=-1), token_ids)
        token_logprobs = (raw_logits.gather(1, token_ids.unsqueeze(1)) - log_z).squeeze(1)
        top_logprobs = top_token_ids = None
        if t.max_num_logprobs:
            top_logits, top_token_ids = raw_logits.topk(min(t.max_num_logprobs, logits.shape[1]), dim=-1)
            top_logprobs = top_logits - log_z
        return SamplerOutput(token_ids, token_logprobs, top_logprobs, top_token_ids)

    @staticmethod
    def _sample(logits: Tensor, t: SamplingTensors, generator: torch.Generator | None) -> Tensor:
        logits = logits / t.temperatures.unsqueeze(1)
        logits = apply_top_k_top_p_min_p(logits, t.top_ks, t.top_ps, t.min_ps, t.max_top_k)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p.
        if t.seeded_rows is None:
            noise = torch.empty_like(probs).exponential_(generator=generator)
        else:
            seeded = seeded_exponential_noise(t.seeds, t.positions, probs.shape[1])
            if t.seeded_rows.shape[0] == probs.shape[0]:
                noise = seeded
            else:
                noise = torch.empty_like(probs).exponential_(generator=generator).index_copy_(0, t.seeded_rows, seeded)
        return probs.div_(noise).argmax(dim=-1)

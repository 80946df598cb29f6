"""Proposals from a smaller draft model with the target's vocabulary, run in the same engine.

Design: the draft has a ModelRunner of its own (its weights, its paged KV cache, its
sampler and generator) and a BlockManager of its own (no prefix caching). For each target
sequence it keeps a shadow `Sequence` holding the tokens its cache was computed for. To
propose for a batch:

1. Catch up: a shadow's cache is valid for the longest common prefix of the tokens it
   computed and the target's tokens now (the target accepted part of the last proposals
   and replaced the first rejected one). Rolling back is lowering `num_computed_tokens`
   to that prefix and freeing the blocks past the target's tokens; then one prefill per
   batch (chunked to max_num_batched_tokens) computes the tokens the draft lacks and
   samples its first proposal.
2. k - 1 one-token decode steps, each reading the previous proposal straight from the
   device (the runner's placeholder path, CUDA graphs where the target has them), so the
   host waits once, at the end.

Proposals are greedy (argmax): a one-hot q, so the target's acceptance rule needs only
its own sample (see `nanovllm.spec_decode`). The scheduler releases a sequence's shadow when
it finishes or is preempted. The draft cache holds enough blocks for
min(disable_by_batch_size, max_num_seqs) sequences of max_model_len, since speculation
runs only at batch sizes up to that.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from nanovllm.config import DTYPES, Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner, PendingSample
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.spec_decode.config import SpeculativeConfig

GREEDY = SamplingParams(temperature=0.0)


def draft_config(spec: SpeculativeConfig, target: Config) -> Config:
    """The draft's engine config: the target's device, dtype, lengths and backend."""
    dtype = next(name for name, value in DTYPES.items() if value == target.torch_dtype)
    return Config(
        spec.model, device=target.device, dtype=dtype, max_model_len=target.max_model_len,
        max_num_seqs=min(spec.disable_by_batch_size, target.max_num_seqs),
        max_num_batched_tokens=target.max_num_batched_tokens, gpu_memory_utilization=target.gpu_memory_utilization,
        kv_cache_memory_bytes=target.kv_cache_memory_bytes, enable_prefix_caching=False,
        enforce_eager=target.enforce_eager, skip_tokenizer_init=True, seed=target.seed,
        attention_backend=target.attention_backend, kv_cache_dtype=target.kv_cache_dtype)


def common_prefix(a: list[int], b: list[int], start: int, limit: int) -> int:
    """The length of a's and b's common prefix, at most `limit`, given that it is at least `start`."""
    n = start
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Shadow:
    """A target sequence and the draft's sequence for it; the first `synced` tokens of both are
    final (the target's tokens when they last synced)."""

    target: Sequence
    draft: Sequence
    synced: int = 0


class DraftModelProposer:
    guesses_ahead = False  # the draft runs over known tokens only

    def __init__(self, spec: SpeculativeConfig, target: Config):
        self.k = spec.num_speculative_tokens
        try:
            self.config = draft_config(spec, target)
            self.runner = ModelRunner(self.config)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"draft model {spec.model!r} cannot be loaded: {e}") from e
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size, enable_prefix_caching=False,
                                          num_sink_blocks=self.runner.num_sink_blocks)
        self.shadows: dict[int, Shadow] = {}  # by the target's seq_id
        self._ids = itertools.count()

    def propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[list[int]]:
        active = [shadow for seq, k in zip(seqs, max_lens) if k and (shadow := self._sync(seq)) is not None]
        steps = [active]
        pending = [self._catch_up([s.draft for s in active])] if active else []
        while len(steps) < min(self.k, max(max_lens)) and active:
            active = self._extend(active)
            steps.append(active)
            if active:
                pending.append(self.runner.launch(ScheduledBatch([s.draft for s in active], [1] * len(active))))
                for shadow in active:
                    shadow.draft.num_computed_tokens += 1
        proposals = self._read(steps, pending)
        return [proposals.get(seq.seq_id, [])[:k] for seq, k in zip(seqs, max_lens)]

    def release(self, seq: Sequence) -> None:
        shadow = self.shadows.get(seq.seq_id)
        if shadow is not None:
            self._drop(shadow)

    def _drop(self, shadow: Shadow) -> None:
        self.block_manager.free(shadow.draft)
        del self.shadows[shadow.target.seq_id]

    def _sync(self, seq: Sequence) -> Shadow | None:
        """seq's shadow, its cache rolled back to what it shares with seq's tokens, holding blocks
        for all of seq's tokens; None when the draft cache has no room."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Shadow(seq, Sequence(next(self._ids), seq.token_ids, GREEDY))
            if not self.block_manager.allocate(shadow.draft):
                return None
            self.shadows[seq.seq_id] = shadow
        else:
            draft = shadow.draft
            limit = min(draft.num_computed_tokens, seq.num_tokens)
            draft.num_computed_tokens = common_prefix(draft.token_ids, seq.token_ids, min(shadow.synced, limit), limit)
            draft.token_ids = list(seq.token_ids)
            self.block_manager.free_tail(draft)
            if not self.block_manager.append_slots(draft):
                self._drop(shadow)
                return None
        shadow.synced = seq.num_tokens
        return shadow

    def _catch_up(self, drafts: list[Sequence]) -> PendingSample:
        """Compute the tokens each draft lacks, in chunks of the token budget; sample the first proposals."""
        budget = self.config.max_num_batched_tokens
        while (sum(d.num_uncomputed_tokens for d in drafts) > budget
               and any(d.num_uncomputed_tokens > 1 for d in drafts)):
            chunk, left = [], budget
            for draft in drafts:  # all but the last token, which the sampling launch computes
                chunk.append(max(min(draft.num_uncomputed_tokens - 1, left), 0))
                left -= chunk[-1]
            batch = ScheduledBatch([d for d, n in zip(drafts, chunk) if n], [n for n in chunk if n])
            self.runner.launch(batch)
            for draft, n in zip(batch.seqs, batch.num_new_tokens):
                draft.num_computed_tokens += n
        pending = self.runner.launch(ScheduledBatch(drafts, [d.num_uncomputed_tokens for d in drafts]))
        for draft in drafts:
            draft.num_computed_tokens = draft.num_tokens
        return pending

    def _extend(self, active: list[Shadow]) -> list[Shadow]:
        """Append each draft's newest proposal (still on the device) as its token to compute next."""
        kept = []
        for shadow in active:
            shadow.draft.token_ids.append(PLACEHOLDER)
            if self.block_manager.append_slots(shadow.draft):
                kept.append(shadow)
            else:  # the draft cache is full: this sequence gets the proposals it has
                shadow.draft.token_ids.pop()
        return kept

    @staticmethod
    def _read(steps: list[list[Shadow]], pending: list[PendingSample]) -> dict[int, list[int]]:
        """Wait for the proposals, step by step, and write them into the drafts' placeholders."""
        proposals: dict[int, list[int]] = {}
        for active, sample in zip(steps, pending):
            for shadow, token in zip(active, sample.wait().token_ids):
                tokens = proposals.setdefault(shadow.target.seq_id, [])
                tokens.append(token)
                index = shadow.synced + len(tokens) - 1
                if index < shadow.draft.num_tokens:
                    shadow.draft.token_ids[index] = token
        return proposals

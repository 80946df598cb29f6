"""Beam search over the paged KV cache: beams are sequences that fork, sharing blocks (copy-on-write).

The search drives the engine's scheduler and model runner one step at a time,
without overlap: every live beam decodes one token and returns its top-K
log-probabilities; the best continuations over all (beam, token) pairs become
the next beams. A beam continued by several candidates forks (the children share
all its blocks; each copies the last one on its first write); a beam no
candidate continues is freed at once.

Ranking and stopping follow HF transformers' `generate(num_beams=k,
do_sample=False)` (the vectorised `_beam_search` of transformers >= 4.50):

- K = max(2, 1 + number of EOS ids) * beam_width candidates are kept per step,
  enough that beam_width of them do not end in EOS;
- a candidate that ends in EOS, or reaches max_tokens, is finished; only those
  among the best beam_width candidates may join the finished hypotheses, scored
  cum_logprob / generated_len ** length_penalty (generated_len counts the EOS, not
  the prompt), of which the best beam_width are kept;
- the best beam_width unfinished candidates run on;
- the search stops at max_tokens, or per `early_stopping`: True, once beam_width
  hypotheses are finished; False (HF's default), once they are and the best
  running beam's score at its current length is no better than the worst
  finished one; "never", the same with max_tokens as the length when
  length_penalty > 0.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from nanovllm.beam_search_params import BeamSearchParams
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import BeamSearchOutput, BeamSearchSequence
from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm.engine.llm_engine import LLMEngine, Prompt


@dataclass
class _Beam:
    seq: Sequence
    cum_logprob: float


@dataclass(eq=False)
class _Group:
    """One prompt's search: its live beams (best first) and finished hypotheses (best first)."""

    index: int
    prompt_token_ids: list[int]
    blocks_needed: tuple[int, int]  # (sink blocks, other blocks): see BeamSearch._blocks_needed
    beams: list[_Beam] = field(default_factory=list)
    finished: list[BeamSearchSequence] = field(default_factory=list)
    improvable: bool = True
    done: bool = False


class BeamSearch:
    def __init__(self, engine: LLMEngine, params: BeamSearchParams):
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        params.validate()
        if engine.config.speculative_config is not None:
            raise ValueError("beam search is not supported with speculative decoding (speculative_config is set)")
        self.engine = engine
        self.params = params
        self.scheduler = engine.scheduler
        self.block_manager = engine.block_manager
        self.eos = set() if params.ignore_eos else set(engine.config.eos_token_ids)
        self.num_candidates = max(2, 1 + len(self.eos)) * params.beam_width
        if params.beam_width > engine.config.max_num_seqs:
            raise ValueError(f"beam_width={params.beam_width} is over max_num_seqs={engine.config.max_num_seqs}")
        # Greedy rows with top-K logprobs; EOS and the length are handled here, not by the scheduler.
        self.sampling_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True,
                                              logprobs=self.num_candidates)
        self.group_of: dict[int, _Group] = {}  # seq_id -> its group
        self.beams_of: dict[int, list[_Beam]] = {}  # seq_id of a beam that runs on -> its new beams

    def _blocks_needed(self, num_prompt_tokens: int) -> tuple[int, int]:
        """Upper bounds on the blocks one prompt's beams hold at once: (sink blocks, others).

        Beams write only from the prompt's last partial block on, so the full prompt
        blocks stay shared; each beam holds at most the rest privately. With sink blocks
        (an FP8 cache, see BlockManager) first blocks are counted apart: one shared full
        block, or one per beam when the prompt does not fill it.
        """
        bm, width = self.block_manager, self.params.beam_width
        shared = num_prompt_tokens // bm.block_size
        total = shared + width * (bm.num_blocks_for(num_prompt_tokens + self.params.max_tokens) - shared)
        firsts = (1 if shared else width) if bm.num_sink_blocks else 0
        return firsts, total - firsts

    def _capacity(self) -> tuple[int, int]:
        """The cache's (sink blocks, other blocks), as `_blocks_needed` counts them."""
        bm = self.block_manager
        return bm.num_sink_blocks, bm.num_blocks - bm.num_sink_blocks

    def run(self, prompts: list[Prompt], use_tqdm: bool) -> list[BeamSearchOutput]:
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("beam_search needs an idle engine: finish the queued requests first")
        groups = []
        for i, prompt in enumerate(prompts):  # check everything before starting
            _, token_ids = engine._tokenize(prompt)
            engine._validate(token_ids, SamplingParams(max_tokens=self.params.max_tokens))
            needed, capacity = self._blocks_needed(len(token_ids)), self._capacity()
            if needed[0] > capacity[0] or needed[1] > capacity[1]:
                raise ValueError(f"beam search of prompt {i} may need {needed[1]} KV blocks and {needed[0]} sink "
                                 f"blocks, the cache has {capacity[1]} and {capacity[0]}; lower beam_width or "
                                 f"max_tokens")
            groups.append(_Group(i, token_ids, needed))
        engine._num_sync_requests += 1  # nothing may overlap the steps: each reads the last one's tokens
        try:
            with tqdm(total=len(groups), desc="Beam search", disable=not use_tqdm, dynamic_ncols=True) as bar:
                self._search(groups, bar)
        finally:
            engine._num_sync_requests -= 1
            for group in groups:  # after an error, leave the engine clean
                self._free(group)
        if engine.tokenizer is not None:
            for group in groups:
                for hypothesis in group.finished:
                    hypothesis.text = engine.tokenizer.decode(hypothesis.completion_token_ids, skip_special_tokens=True)
        return [BeamSearchOutput(group.finished) for group in groups]

    def _search(self, groups: list[_Group], bar: tqdm) -> None:
        waiting, active, used, capacity = deque(groups), [], (0, 0), self._capacity()
        while waiting or active:
            # Admit prompts while the worst case of every admitted one fits: no beam is ever preempted.
            while waiting and all(u + n <= c for u, n, c in zip(used, waiting[0].blocks_needed, capacity)):
                group = waiting.popleft()
                used = tuple(u + n for u, n in zip(used, group.blocks_needed))
                active.append(group)
                seq = self.scheduler.new_sequence(group.prompt_token_ids, self.sampling_params,
                                                  f"beam-{group.index}")
                group.beams = [_Beam(seq, 0.0)]
                self.group_of[seq.seq_id] = group
            for group in self._step():
                self._free(group)
                active.remove(group)
                used = tuple(u - n for u, n in zip(used, group.blocks_needed))
                bar.update(1)

    def _step(self) -> list[_Group]:
        """One forward of every scheduled beam; returns the groups that finished."""
        self.beams_of = {}
        engine, preemptions = self.engine, self.scheduler.num_preemptions
        batch = self.scheduler.schedule()
        if batch is None or self.scheduler.num_preemptions != preemptions:
            raise RuntimeError("beam search ran out of KV blocks; this is a bug in its admission")
        start = time.perf_counter()
        pending = engine.model_runner.launch(batch)
        launched = time.perf_counter()
        self.scheduler.advance(batch)
        sampled = pending.wait()
        engine._record_time(batch, time.perf_counter() - start, launched - start)
        if sampled is None:  # a prompt chunk that samples nothing
            self.scheduler.update(batch, None)
            return []
        rows = {seq.seq_id: row for row, (seq, _) in enumerate(batch.sampled)}
        done, chosen = [], {}
        for group in dict.fromkeys(self.group_of[seq.seq_id] for seq, _ in batch.sampled):
            assert all(beam.seq.seq_id in rows for beam in group.beams), "a group's beams must step together"
            candidates = []
            for rank, beam in enumerate(group.beams):
                row = rows[beam.seq.seq_id]
                for token, logprob in zip(sampled.top_token_ids[row], sampled.top_logprobs[row]):
                    candidates.append((beam.cum_logprob + logprob, rank, token))
            continuing = self._advance(group, candidates)
            if group.done:
                done.append(group)
                self._free(group)
            else:
                chosen.update(continuing)
        # each beam that runs on takes its first continuation as its sampled token; the scheduler
        # commits it, then the beam forks once per further continuation
        tokens = [chosen[seq.seq_id][0] if seq.seq_id in chosen else 0 for seq, _ in batch.sampled]
        self.scheduler.update(batch, tokens)
        for seq_id, continuations in chosen.items():
            beams = self.beams_of[seq_id]
            children = self.scheduler.fork(beams[0].seq, len(continuations) - 1, last_tokens=continuations[1:])
            for child, beam in zip(children, beams[1:]):
                beam.seq = child
                self.group_of[child.seq_id] = self.group_of[seq_id]
        return done

    def _advance(self, group: _Group, candidates: list[tuple[float, int, int]]) -> dict[int, list[int]]:
        """Pick the next beams and finished hypotheses from (cum_logprob, beam rank, token) candidates."""
        p, width = self.params, self.params.beam_width
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then token order
        candidates = candidates[: self.num_candidates]
        gen_len = group.beams[0].seq.num_completion_tokens  # generated tokens, the new one's placeholder included
        at_length = gen_len >= p.max_tokens
        ends = [at_length or token in self.eos for _, _, token in candidates]
        running = [c for c, end in zip(candidates, ends) if not end][:width]

        full = p.early_stopping is True and len(group.finished) == width
        if group.improvable and not full:
            new = False
            for (score, rank, token), end in zip(candidates[:width], ends[:width]):
                if end:
                    tokens = group.beams[rank].seq.token_ids[:-1] + [token]
                    reason = "stop" if token in self.eos else "length"
                    group.finished.append(BeamSearchSequence(
                        tokens, len(group.prompt_token_ids), score, score / gen_len**p.length_penalty,
                        finish_reason=reason))
                    new = True
            if new:
                group.finished.sort(key=lambda s: -s.score)
                del group.finished[width:]

        chosen = self._reseat(group, running)

        full = len(group.finished) == width
        if group.improvable and full and group.beams:
            length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else gen_len
            best = group.beams[0].cum_logprob / length**p.length_penalty
            group.improvable = best > group.finished[-1].score
        group.done = (not group.beams or not group.improvable or (p.early_stopping is True and full))
        return chosen

    def _reseat(self, group: _Group, running: list[tuple[float, int, int]]) -> dict[int, list[int]]:
        """Make the running candidates the group's beams: free the pruned ones; returns, per
        beam that runs on, its continuations (the first extends it, the others fork from it)."""
        by_parent: dict[int, list[tuple[float, int]]] = {}
        for score, rank, token in running:
            by_parent.setdefault(rank, []).append((score, token))
        for rank, beam in enumerate(group.beams):
            if rank not in by_parent:
                self._finish(beam.seq)
        beams, chosen = [], {}
        for rank, continuations in by_parent.items():
            parent = group.beams[rank].seq
            new = [_Beam(parent, score) for score, _ in continuations]  # children take their seqs after forking
            chosen[parent.seq_id] = [token for _, token in continuations]
            self.beams_of[parent.seq_id] = new
            beams += new
        beams.sort(key=lambda b: -b.cum_logprob)
        group.beams = beams
        return chosen

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq, "abort")
        self.group_of.pop(seq.seq_id, None)

    def _free(self, group: _Group) -> None:
        for beam in group.beams:
            self._finish(beam.seq)
        group.beams = []


def beam_search(engine: LLMEngine, prompts: Prompt | list[Prompt], params: BeamSearchParams,
                use_tqdm: bool = True) -> list[BeamSearchOutput]:
    """Per prompt, the beam_width best beams (best first): see the module docstring for the rules."""
    search = BeamSearch(engine, params)
    return search.run(engine._prompt_list(prompts), use_tqdm)

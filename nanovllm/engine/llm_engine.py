"""The engine core: requests in by id, steps, per-request deltas out; and `generate` on top of it.

A server drives the core directly: `add_request(request_id, prompt, params)`,
`abort_request(request_id)`, and `step()`, which returns for every request with
news the tokens and text produced since its previous output. `generate` is the
offline face: it queues its prompts, steps until they are done, and merges their
deltas; requests added by others keep running and come out of `step()`.
"""
from __future__ import annotations

import itertools
import os
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from nanovllm.config import PRESET_PREFIX, Config
from nanovllm.distributed.worker_pool import WorkerPool
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.kv_calibration import calibration_token_ids
from nanovllm.engine.model_runner import ModelRunner, PendingSample, SampledTokens
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.spec_decode.proposer import make_proposer
from nanovllm.utils.model_source import resolve_model

Prompt = str | list[int]


@dataclass
class SeqState:
    """A sequence's output beyond its tokens, and how much of it was already handed out."""

    index: int  # the completion's index in its request
    detokenizer: IncrementalDetokenizer | None
    cumulative_logprob: float | None = None  # only when logprobs were asked for (vLLM's rule)
    logprobs: list[dict[int, float]] | None = None
    num_known_tokens: int = 0  # completion tokens read back
    num_sent_tokens: int = 0  # completion tokens handed out
    done: bool = False  # its last delta was handed out


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seqs: list[Sequence]
    stream: bool = True  # an output every step with news (deltas), else one when it finishes
    states: dict[int, SeqState] = field(default_factory=dict)  # by seq_id

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs) and not self.seqs[0].pending_forks


@dataclass(frozen=True)
class StepTime:
    """One completed step, for `LLMEngine.step_log`: its wall time (overlapping steps split it, as
    `stats()` counts it) and the host's time to launch it. A launch that takes most of its step's
    wall time means the host sets the pace; a short one, that the device does (the rest is the wait)."""

    kind: str  # "prefill", "decode" or "verify"
    seconds: float
    launch_seconds: float
    tokens: int  # prefill: prompt tokens computed; decode and verify: sequences


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase | None, prompt: Prompt) -> tuple[str | None, list[int]]:
    """A prompt's text (None when it came as token ids) and its token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this engine has none (pass token ids)")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    raise TypeError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")


def needs_token_values(params: SamplingParams) -> bool:
    """Penalties read every earlier token's value when sampling, so such steps cannot overlap."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


class LLMEngine:
    """Turns prompts into completions with continuous batching over a paged KV cache."""

    def __init__(self, model: str | os.PathLike | None = None, **engine_args: object):
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if model is None or not (isinstance(model, str) and model.startswith(PRESET_PREFIX)):
            model = resolve_model(model)
        self.config = Config.from_engine_args(model, **engine_args)
        self.tokenizer = self._load_tokenizer()
        self.config.eos_token_ids = self._eos_token_ids()
        proposer = make_proposer(self.config)  # before the target sizes its KV cache from what is left
        calibration = None
        if self.config.kv_cache_dtype == "fp8":
            calibration = calibration_token_ids(self.tokenizer, self.config.hf_config.vocab_size, self.config.seed)
        self.model_runner = self._model_runner(calibration)
        self.block_manager = BlockManager(
            self.model_runner.num_blocks, self.model_runner.block_size, self.config.enable_prefix_caching,
            self.model_runner.num_sink_blocks,
        )
        self.scheduler = Scheduler(self.config, self.block_manager, proposer)
        self.requests: dict[str, Request] = {}
        self.overlap_steps = self.model_runner.device.type == "cuda"
        self._num_sync_requests = 0  # requests whose sampling reads earlier tokens' values (penalties)
        self._in_flight: tuple[ScheduledBatch, PendingSample, float, float] | None = None  # + start, launched
        self._last_completed = 0.0
        self._generate_ids = itertools.count()
        self._unclaimed: list[RequestOutput] = []  # other requests' deltas seen by `generate`
        self.num_prefill_tokens = self.num_decode_tokens = 0
        self.prefill_time = self.decode_time = 0.0
        self.num_decode_steps = 0  # decode and speculative verify steps: the latency a stream feels
        self.step_log: list[StepTime] | None = None  # set to a list to record every step (`bench.py --step-times`)

    # -- setup ----------------------------------------------------------------

    def _model_runner(self, calibration: list[int] | None) -> ModelRunner:
        """Rank 0's runner; with tensor_parallel_size > 1 the workers first, stopped with this engine."""
        if self.config.tensor_parallel_size == 1:
            return ModelRunner(self.config, calibration)
        workers = WorkerPool(self.config, calibration)
        weakref.finalize(self, workers.shutdown)
        try:
            with workers.watch():
                runner = ModelRunner(self.config, calibration, workers.tp, workers)
            workers.graphs = runner.graphs
            workers.wait_ready(runner.num_blocks)
        except BaseException:
            workers.shutdown(timeout=0)
            raise
        return runner

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (also done when the engine is garbage collected or at exit)."""
        if self.model_runner.workers is not None:
            self.model_runner.workers.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _load_tokenizer(self) -> PreTrainedTokenizerBase | None:
        if self.config.skip_tokenizer_init or self.config.model.startswith(PRESET_PREFIX):
            return None
        return AutoTokenizer.from_pretrained(self.config.model)

    def _eos_token_ids(self) -> list[int]:
        ids = getattr(self.config.hf_config, "eos_token_id", None)
        if not self.config.model.startswith(PRESET_PREFIX):
            try:
                ids = GenerationConfig.from_pretrained(self.config.model).eos_token_id or ids
            except OSError:  # no generation_config.json
                pass
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    # -- requests -------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        return tokenize_prompt(self.tokenizer, prompt)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        max_len, vocab = self.config.max_model_len, self.config.hf_config.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty")
        if params.n > 1 and self.config.speculative_config is not None:
            raise ValueError(f"n={params.n}: parallel sampling (n > 1) is not supported with speculative decoding")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} is over max_num_seqs={self.config.max_num_seqs}")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is over max_logprobs={self.config.max_logprobs}")
        if len(token_ids) > max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, over max_model_len={max_len}")
        if len(token_ids) + params.max_tokens > max_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"= {len(token_ids) + params.max_tokens} is over max_model_len={max_len}")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {vocab})")
        needed = self.block_manager.num_blocks_for(len(token_ids) + params.max_tokens)
        if needed > self.block_manager.max_blocks_per_seq:
            raise ValueError(f"the request needs {needed} KV blocks, a sequence can hold "
                             f"{self.block_manager.max_blocks_per_seq}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (skip_tokenizer_init=True): "
                             "use stop_token_ids")

    def add_request(self, request_id: str, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    stream: bool = True) -> None:
        """Validate and queue one request; raises before queueing anything.

        Its outputs come out of `step()` under `request_id`, which must not be live already: with
        `stream`, a delta every step that brings news; without, one whole output once it finishes
        (vLLM's FINAL_ONLY, which spares a batch of offline requests a delta object each per step).
        """
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be a bool, got {type(stream).__name__}")
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        self._queue(request_id, text, token_ids, params, stream)

    def _queue(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
               stream: bool) -> None:
        seq = self.scheduler.new_sequence(token_ids, params, request_id)
        request = Request(request_id, text, token_ids, params, [], stream)
        self.requests[request_id] = request
        self._track(request, seq)
        self._num_sync_requests += needs_token_values(params)

    def _track(self, request: Request, seq: Sequence) -> None:
        params = request.sampling_params
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output)
        with_logprobs = params.logprobs is not None
        request.states[seq.seq_id] = SeqState(len(request.seqs), detokenizer, 0.0 if with_logprobs else None,
                                              [] if with_logprobs else None)
        request.seqs.append(seq)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free their KV blocks; unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            self._num_sync_requests -= needs_token_values(request.sampling_params)
            for seq in request.seqs:
                seq.pending_forks = 0
                self.scheduler.finish(seq, "abort")

    # -- stepping -------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        """Whether `step()` has more to do or to hand out."""
        return bool(self.requests or self._unclaimed) or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Launch the next forward, then read back the previous one; return each request's news.

        With overlap (CUDA, no request that needs every token's value before
        sampling), the device runs step N while the host reads step N-1's
        tokens and finishes sequences: the GPU never waits for this
        bookkeeping. Tokens not read yet are placeholders in `token_ids`; the
        next decode takes them straight from the device. Speculative steps
        overlap when the proposer guesses past the tokens in flight (prompt
        lookup); a draft model reads the tokens so far, so its steps do not.
        """
        outputs, self._unclaimed = self._unclaimed, []
        overlap = self.overlap_steps and not self._num_sync_requests and self.scheduler.overlaps()
        if self._in_flight is not None and not overlap:
            outputs += self._complete()
        batch = self.scheduler.schedule() if self.scheduler.has_work() else None
        launched = None
        if batch is not None:
            start = time.perf_counter()
            pending = self.model_runner.launch(batch)
            launched = (batch, pending, start, time.perf_counter())
            for child in self.scheduler.advance(batch):
                self._track(self.requests[child.request_id], child)
        if self._in_flight is not None:
            outputs += self._complete()
        self._in_flight = launched
        if launched is not None and not overlap:
            outputs += self._complete()
        return outputs

    def _complete(self) -> list[RequestOutput]:
        """Read the launched step's tokens back, finish what stopped, return the requests' deltas."""
        (batch, pending, start, launched), self._in_flight = self._in_flight, None
        sampled = pending.wait()
        now = time.perf_counter()
        self._record_time(batch, now - max(start, self._last_completed), launched - start)  # overlaps split it
        self._last_completed = now
        live = self.scheduler.update(batch, sampled.token_ids if sampled else None, self._stop_string)
        if batch.num_proposed is not None and not batch.is_decode:  # a verify step: count it as decode
            self.num_decode_tokens += len(live)
        touched: dict[str, Request] = {}
        for row, seq, index in live:
            request = self.requests.get(seq.request_id)
            if request is None:  # aborted while its step ran
                continue
            state = request.states[seq.seq_id]
            self._record(state, seq, row, sampled)
            if (seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
                    and seq.sampling_params.include_stop_str_in_output and state.detokenizer is not None):
                state.detokenizer.add(seq.token_ids[index])  # a stop id's text: the stop-string check skipped it
            state.num_known_tokens = index + 1 - seq.num_prompt_tokens
            if request.stream or (seq.is_finished and request.finished):
                touched[request.request_id] = request
        return [self._delta(request) for request in touched.values()]

    def _stop_string(self, seq: Sequence, index: int) -> str | None:
        """Detokenize seq's newest token; the stop string it completes, if any (after min_tokens)."""
        detokenizer = self.requests[seq.request_id].states[seq.seq_id].detokenizer
        if detokenizer is None:
            return None
        may_stop = index + 1 - seq.num_prompt_tokens >= seq.sampling_params.min_tokens
        return detokenizer.add_and_check(seq.token_ids[index], may_stop)

    def _record_time(self, batch: ScheduledBatch, seconds: float, launch_seconds: float) -> None:
        if batch.num_proposed is not None and not batch.is_decode:  # tokens counted once known
            kind, tokens = "verify", len(batch.seqs)
            self.decode_time += seconds
            self.num_decode_steps += 1
        elif batch.is_decode:
            kind, tokens = "decode", len(batch.seqs)
            self.num_decode_tokens += tokens
            self.decode_time += seconds
            self.num_decode_steps += 1
        else:
            kind, tokens = "prefill", sum(batch.num_new_tokens)
            self.num_prefill_tokens += tokens
            self.prefill_time += seconds
        if self.step_log is not None:
            self.step_log.append(StepTime(kind, seconds, launch_seconds, tokens))

    @staticmethod
    def _record(state: SeqState, seq: Sequence, row: int, sampled: SampledTokens) -> None:
        """Add a read-back token's logprob (and its top-N alternatives) when the request asked."""
        if state.logprobs is None:
            return
        token, logprob = sampled.token_ids[row], sampled.logprobs[row]
        state.cumulative_logprob += logprob
        entry = {token: logprob}
        n = seq.sampling_params.logprobs
        if n and sampled.top_token_ids is not None:
            entry.update(zip(sampled.top_token_ids[row][:n], sampled.top_logprobs[row][:n]))
        state.logprobs.append(entry)

    def _delta(self, request: Request) -> RequestOutput:
        """What each of the request's completions produced since its previous output."""
        completions = []
        for seq in request.seqs:
            state = request.states[seq.seq_id]
            finished = seq.is_finished
            if state.done or (state.num_sent_tokens == state.num_known_tokens and not finished):
                continue
            first = seq.num_prompt_tokens + state.num_sent_tokens
            token_ids = seq.token_ids[first : seq.num_prompt_tokens + state.num_known_tokens]
            logprobs = None
            if state.logprobs is not None:
                logprobs = state.logprobs[state.num_sent_tokens : state.num_known_tokens]
            text = state.detokenizer.take_delta(finished) if state.detokenizer is not None else ""
            state.num_sent_tokens, state.done = state.num_known_tokens, finished
            completions.append(CompletionOutput(
                state.index, text, token_ids, seq.finish_reason if finished else None,
                seq.stop_reason if finished else None, state.cumulative_logprob, logprobs))
        finished = request.finished
        if finished:
            del self.requests[request.request_id]
            self._num_sync_requests -= needs_token_values(request.sampling_params)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, finished)

    def stats(self) -> dict[str, float]:
        """Requests, KV-cache use (blocks now, prefix hits, copies, waste), preemptions and throughput."""
        s = self.block_manager.stats
        return {
            "num_requests_running": len({seq.request_id for seq in self.scheduler.running}),
            "num_requests_waiting": len({seq.request_id for seq in self.scheduler.waiting}),
            "prefix_query_tokens": s.prefix_query_tokens,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "block_copies": s.block_copies,
            "kv_blocks_total": self.block_manager.num_blocks,
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_peak_used": s.peak_used_blocks,
            "kv_waste_fraction": self.scheduler.kv_usage.waste_fraction,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefill_tokens": self.num_prefill_tokens,
            "decode_tokens": self.num_decode_tokens,
            "prefill_time": self.prefill_time,
            "decode_time": self.decode_time,
            "decode_steps": self.num_decode_steps,
            "spec_proposed_tokens": self.scheduler.num_proposed_tokens,
            "spec_accepted_tokens": self.scheduler.num_accepted_tokens,
            "spec_voided_tokens": self.scheduler.num_voided_tokens,
        }

    # -- generate -------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in prompt order.

        All prompts are checked before any is queued, so a bad one leaves the
        engine as it was. On any exit (an error, Ctrl-C) its unfinished requests
        are aborted and their blocks freed; other requests' outputs stay for `step()`. Its own
        requests are not streamed: each comes out of `step()` once, whole, when it finishes.
        """
        prompts = self._prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        tokenized = [self._tokenize(p) for p in prompts]
        for (_, token_ids), p in zip(tokenized, params):
            self._validate(token_ids, p)
        ids = []
        for (text, token_ids), p in zip(tokenized, params):
            ids.append(self._new_generate_id())
            self._queue(ids[-1], text, token_ids, p, stream=False)
        results: dict[str, RequestOutput] = {}
        remaining = set(ids)
        try:
            with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while remaining:
                    for output in self.step():
                        if output.request_id not in remaining:
                            self._unclaimed.append(output)
                            continue
                        results[output.request_id] = output  # stream=False: one whole output, finished
                        remaining.discard(output.request_id)
                        bar.update(1)
                    bar.set_postfix(self._throughput(), refresh=False)
        finally:
            self.abort_request(i for i in ids if i in self.requests)
        for output in results.values():
            output.outputs.sort(key=lambda c: c.index)
        return [results[i] for i in ids]

    def _new_generate_id(self) -> str:
        while (request_id := f"generate-{next(self._generate_ids)}") in self.requests:
            pass
        return request_id

    def _throughput(self) -> dict[str, str]:
        prefill = self.num_prefill_tokens / self.prefill_time if self.prefill_time else 0.0
        decode = self.num_decode_tokens / self.decode_time if self.decode_time else 0.0
        return {"prefill": f"{prefill:.0f}tok/s", "decode": f"{decode:.0f}tok/s"}

    @staticmethod
    def _prompt_list(prompts: object) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and all(isinstance(p, (str, list, tuple)) for p in prompts):
            return list(prompts)
        raise TypeError(f"prompts must be a str, a list of str or a list of token-id lists, got {prompts!r:.80}")

    @staticmethod
    def _params_list(params: object, n: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * n
        if isinstance(params, (list, tuple)) and len(params) == n:
            return list(params)
        raise ValueError(f"sampling_params must be one SamplingParams or a list of {n} (one per prompt)")

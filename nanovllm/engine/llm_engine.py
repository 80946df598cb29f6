"""The engine loop: validate and queue requests, step the scheduler and runner, build outputs."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from nanovllm.config import PRESET_PREFIX, Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.model_runner import ModelRunner, PendingSample, SampledTokens
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.model_source import resolve_model

Prompt = str | list[int]


@dataclass
class SeqState:
    """What a sequence's output needs beyond its tokens, gathered as they are read back."""

    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None  # per generated token, when logprobs was asked for
    detokenizer: IncrementalDetokenizer | None = None  # only for requests with stop strings


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seqs: list[Sequence]
    states: dict[int, SeqState] = field(default_factory=dict)  # by seq_id

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def needs_token_values(params: SamplingParams) -> bool:
    """Penalties read every earlier token's value when sampling, so such steps cannot overlap."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


class LLMEngine:
    """Turns prompts into completions with continuous batching over a paged KV cache."""

    def __init__(self, model: str | None = None, **engine_args: object):
        if model is None or not model.startswith(PRESET_PREFIX):
            model = resolve_model(model)
        self.config = Config.from_engine_args(model, **engine_args)
        self.tokenizer = self._load_tokenizer()
        self.eos_token_ids = self._eos_token_ids()
        self.model_runner = ModelRunner(self.config, self.eos_token_ids)
        self.block_manager = BlockManager(
            self.model_runner.num_blocks, self.model_runner.block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.overlap_steps = self.model_runner.device.type == "cuda"
        self._num_sync_requests = 0  # requests whose sampling reads earlier tokens' values (penalties)
        self._in_flight: tuple[ScheduledBatch, PendingSample, float] | None = None
        self._last_completed = 0.0
        self._request_ids = itertools.count()
        self.num_prefill_tokens = self.num_decode_tokens = 0
        self.prefill_time = self.decode_time = 0.0

    # -- setup ----------------------------------------------------------------

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
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine has none (pass token ids)")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        max_len, vocab = self.config.max_model_len, self.config.hf_config.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} is over max_num_seqs={self.config.max_num_seqs}")
        if len(token_ids) > max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, over max_model_len={max_len}")
        if len(token_ids) + params.max_tokens > max_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"= {len(token_ids) + params.max_tokens} is over max_model_len={max_len}")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {vocab})")
        needed = self.block_manager.num_blocks_for(len(token_ids) + params.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {needed} KV blocks, the cache has {self.block_manager.num_blocks}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (skip_tokenizer_init=True): "
                             "use stop_token_ids")

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> str:
        """Validate and queue one request; returns its id. Raises before queueing anything."""
        params = sampling_params or SamplingParams()
        text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        return self._queue(text, token_ids, params)

    def _queue(self, text: str | None, token_ids: list[int], params: SamplingParams) -> str:
        request_id = str(next(self._request_ids))
        seq = Sequence(token_ids, params, request_id)
        seq.pending_forks = params.n - 1
        request = Request(request_id, text, token_ids, params, [seq])
        request.states[seq.seq_id] = self._new_state(params)
        self.requests[request_id] = request
        self._num_sync_requests += needs_token_values(params)
        self.scheduler.add(seq)
        return request_id

    def _new_state(self, params: SamplingParams) -> SeqState:
        detokenizer = None
        if params.stop:
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output)
        return SeqState(logprobs=[] if params.logprobs is not None else None, detokenizer=detokenizer)

    def _fork(self, parent: Sequence) -> None:
        """n > 1: once the prompt's last chunk is launched, n - 1 children share all its blocks.

        Each child holds the prompt with its last token uncomputed: it recomputes that
        token as a 1-token decode step and samples its own first token. That first write
        into the shared last block makes its private copy (copy-on-write). Child i draws
        with seed + i when the request is seeded, so the n samples differ reproducibly.
        """
        request = self.requests[parent.request_id]
        params = request.sampling_params
        parent.pending_forks = 0  # a parent recomputed after preemption does not fork again
        assert parent.num_cached_tokens == parent.num_tokens == parent.num_prompt_tokens
        for i in range(1, params.n):
            child = Sequence(parent.token_ids, params, parent.request_id)
            if params.seed is not None:
                child.sample_seed = params.seed + i
            self.block_manager.fork(parent, child)
            child.num_cached_tokens = child.num_tokens - 1
            child.status = SequenceStatus.RUNNING
            self.scheduler.running.append(child)
            request.seqs.append(child)
            request.states[child.seq_id] = self._new_state(params)

    # -- stepping -------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Launch the next forward, then read back the previous one; return the requests that finished.

        With overlap (CUDA, no request that needs every token's value before
        sampling), the device runs step N while the host reads step N-1's
        tokens and finishes sequences: the GPU never waits for this
        bookkeeping. Tokens not read yet are placeholders in `token_ids`; the
        next decode takes them straight from the device.
        """
        outputs: list[RequestOutput] = []
        overlap = self.overlap_steps and not self._num_sync_requests
        if self._in_flight is not None and not overlap:
            outputs += self._complete(*self._in_flight)
            self._in_flight = None
        launched = None
        batch = self.scheduler.schedule() if self.scheduler.has_work() else None
        if batch is not None:
            start = time.perf_counter()
            launched = (batch, self.model_runner.launch(batch), start)
            self._advance(batch)
        if self._in_flight is not None:
            outputs += self._complete(*self._in_flight)
        self._in_flight = launched
        if launched is not None and not overlap:
            outputs += self._complete(*launched)
            self._in_flight = None
        return outputs

    def _advance(self, batch: ScheduledBatch) -> None:
        """Count the batch's tokens as computed and give each sampling sequence a placeholder."""
        for i, seq in enumerate(batch.seqs):
            samples = batch.samples(i)
            seq.num_cached_tokens += batch.num_new_tokens[i]
            if samples:
                if seq.pending_forks:
                    self._fork(seq)
                seq.append_token(PLACEHOLDER)
                batch.sampled.append((seq, seq.num_tokens - 1))

    def _complete(self, batch: ScheduledBatch, pending: PendingSample, start: float) -> list[RequestOutput]:
        """Read a launched step's tokens back, fill its placeholders, finish what stopped."""
        sampled = pending.wait()
        now = time.perf_counter()
        self._record_time(batch, now - max(start, self._last_completed))  # overlapping steps split the wall time
        self._last_completed = now
        live = [(row, seq, index) for row, (seq, index) in enumerate(batch.sampled) if not seq.is_finished]
        requests = self.requests
        for row, seq, index in live:  # a finished sequence stopped at an earlier token: drop this one
            seq.token_ids[index] = sampled.token_ids[row]
            self._record(requests[seq.request_id].states[seq.seq_id], seq, row, sampled)
        for seq in batch.seqs:
            self.block_manager.commit(seq)
        finished = []
        for row, seq, index in live:
            if self._check_stop(seq, index):
                del seq.token_ids[index + 1 :]
                self.scheduler.finish(seq)
                finished.append(seq)
        done = {seq.request_id for seq in finished if self.requests[seq.request_id].finished}
        return [self._output(self.requests[request_id]) for request_id in done]

    def _record_time(self, batch: ScheduledBatch, seconds: float) -> None:
        if batch.is_prefill:
            self.num_prefill_tokens += sum(batch.num_new_tokens)
            self.prefill_time += seconds
        else:
            self.num_decode_tokens += len(batch.seqs)
            self.decode_time += seconds

    @staticmethod
    def _record(state: SeqState, seq: Sequence, row: int, sampled: SampledTokens) -> None:
        """Add a read-back token's logprob (and its top-N alternatives when asked for)."""
        token, logprob = sampled.token_ids[row], sampled.logprobs[row]
        state.cumulative_logprob += logprob
        if state.logprobs is not None:
            entry = {token: logprob}
            n = seq.sampling_params.logprobs
            if n and sampled.top_token_ids is not None:
                entry.update(zip(sampled.top_token_ids[row][:n], sampled.top_logprobs[row][:n]))
            state.logprobs.append(entry)

    def _check_stop(self, seq: Sequence, index: int) -> bool:
        """Whether seq ends at token_ids[index], setting its finish and stop reasons.

        Stop token ids and EOS first, then stop strings (not before min_tokens tokens),
        then the length limits.
        """
        params, token = seq.sampling_params, seq.token_ids[index]
        num_generated = index + 1 - seq.num_prompt_tokens
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            seq.finish_reason = "stop"
            seq.stop_reason = token if token in params.stop_token_ids else None
        elif params.stop and (stop := self._stop_string(seq, token, num_generated >= params.min_tokens)):
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif num_generated >= params.max_tokens or index + 1 >= self.config.max_model_len:
            seq.finish_reason, seq.stop_reason = "length", None
        return seq.finish_reason is not None

    def _stop_string(self, seq: Sequence, token: int, may_stop: bool) -> str | None:
        detokenizer = self.requests[seq.request_id].states[seq.seq_id].detokenizer
        return detokenizer.add_and_check(token, may_stop)

    def _output(self, request: Request) -> RequestOutput:
        del self.requests[request.request_id]
        self._num_sync_requests -= needs_token_values(request.sampling_params)
        completions = [self._completion(i, seq, request.states[seq.seq_id]) for i, seq in enumerate(request.seqs)]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, True)

    def _completion(self, index: int, seq: Sequence, state: SeqState) -> CompletionOutput:
        """vLLM's text rules: cut before a stop string, and a stop token's (or EOS's) own text
        left out, both unless include_stop_str_in_output; token_ids keep every sampled token."""
        params, token_ids = seq.sampling_params, seq.completion_token_ids
        if isinstance(seq.stop_reason, str):
            text = state.detokenizer.stop_text
        elif seq.finish_reason == "stop" and not params.include_stop_str_in_output:
            text = self._decode(token_ids[:-1])
        else:
            text = self._decode(token_ids)
        return CompletionOutput(index, text, token_ids, seq.finish_reason, seq.stop_reason,
                                state.cumulative_logprob, state.logprobs)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    def stats(self) -> dict[str, float]:
        """Prefix-cache hits, copy-on-write copies, preemptions and throughput so far."""
        s = self.block_manager.stats
        return {
            "prefix_query_tokens": s.prefix_query_tokens,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "block_copies": s.block_copies,
            "kv_blocks_total": self.block_manager.num_blocks,
            "kv_blocks_peak_used": s.peak_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefill_tokens": self.num_prefill_tokens,
            "decode_tokens": self.num_decode_tokens,
            "prefill_time": self.prefill_time,
            "decode_time": self.decode_time,
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
        engine as it was.
        """
        prompts = self._prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        tokenized = [self._tokenize(p) for p in prompts]
        for (_, token_ids), p in zip(tokenized, params):
            self._validate(token_ids, p)
        ids = [self._queue(text, token_ids, p) for (text, token_ids), p in zip(tokenized, params)]
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while len(results) < len(ids):
                for output in self.step():
                    results[output.request_id] = output
                    bar.update(1)
                bar.set_postfix(self._throughput(), refresh=False)
        return [results[i] for i in ids]

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

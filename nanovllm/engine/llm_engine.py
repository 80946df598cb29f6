"""The engine loop: validate and queue requests, step the scheduler and runner, build outputs."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from nanovllm.config import PRESET_PREFIX, Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.model_source import resolve_model

Prompt = str | list[int]


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


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

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> str:
        """Validate and queue one request; returns its id. Raises before queueing anything."""
        params = sampling_params or SamplingParams()
        text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        return self._queue(text, token_ids, params)

    def _queue(self, text: str | None, token_ids: list[int], params: SamplingParams) -> str:
        request_id = str(next(self._request_ids))
        seq = Sequence(token_ids, params, request_id)
        self.requests[request_id] = Request(request_id, text, token_ids, params, [seq])
        self.scheduler.add(seq)
        return request_id

    # -- stepping -------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one forward; return the requests that finished in it."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        sampled = self.model_runner.run(batch)
        token_ids = sampled.token_ids.tolist() if sampled is not None else []
        self._record_time(batch, time.perf_counter() - start)
        return self._postprocess(batch, token_ids)

    def _record_time(self, batch: ScheduledBatch, seconds: float) -> None:
        if batch.is_prefill:
            self.num_prefill_tokens += sum(batch.num_new_tokens)
            self.prefill_time += seconds
        else:
            self.num_decode_tokens += len(batch.seqs)
            self.decode_time += seconds

    def _postprocess(self, batch: ScheduledBatch, token_ids: list[int]) -> list[RequestOutput]:
        sampled = iter(token_ids)
        finished = []
        for i, seq in enumerate(batch.seqs):
            samples = batch.samples(i)
            seq.num_cached_tokens += batch.num_new_tokens[i]
            self.block_manager.commit(seq)
            if samples:
                seq.append_token(next(sampled))
                if self._check_stop(seq):
                    self.scheduler.finish(seq)
                    finished.append(seq)
        done = {seq.request_id for seq in finished if self.requests[seq.request_id].finished}
        return [self._output(self.requests[request_id]) for request_id in done]

    def _check_stop(self, seq: Sequence) -> bool:
        params, token = seq.sampling_params, seq.token_ids[-1]
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            seq.finish_reason = "stop"
            seq.stop_reason = token if token in params.stop_token_ids else None
        elif seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            seq.finish_reason, seq.stop_reason = "length", None
        return seq.finish_reason is not None

    def _output(self, request: Request) -> RequestOutput:
        del self.requests[request.request_id]
        completions = [
            CompletionOutput(i, self._decode(seq.completion_token_ids), seq.completion_token_ids,
                             seq.finish_reason, seq.stop_reason)
            for i, seq in enumerate(request.seqs)
        ]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, True)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    def stats(self) -> dict[str, float]:
        """Prefix-cache hits, copy-on-write copies, preemptions and throughput so far."""
        s = self.block_manager.stats
        return {
            "prefix_query_tokens": s.prefix_query_tokens,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "block_copies": s.block_copies,
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

"""nanovllm: a compact, fast, readable LLM inference engine over a paged KV cache."""
import logging

from nanovllm.beam_search_params import BeamSearchParams
from nanovllm.llm import LLM
from nanovllm.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "BeamSearchOutput", "BeamSearchSequence"]

_logger = logging.getLogger("nanovllm")
if not _logger.handlers:  # startup facts (backend, KV cache size) are worth a line each
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[nanovllm] %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)

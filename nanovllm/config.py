"""Engine configuration: the keyword arguments of `LLM(model, **engine_args)`."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.attention.kv_cache import KV_CACHE_DTYPES
from nanovllm.attention.selector import BACKENDS as ATTENTION_BACKENDS
from nanovllm.distributed.parallel_state import dist_backend
from nanovllm.spec_decode.config import SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LOAD_FORMATS = ("auto", "dummy")
PRESET_PREFIX = "preset:"
PRESETS_DIR = os.path.join(os.path.dirname(__file__), "presets")


@dataclass
class Config:
    """Everything the engine needs to know before it starts.

    Unset sizes are derived in `__post_init__`: the model's context length, the
    block size of the attention backend, and so on.
    """

    model: str  # a PathLike is turned into its str
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    # Tokens per step, the prefill chunk: an eager prefill step is bound by the host's launches (~280 kernels,
    # 17-21 ms of host time for 8,192 tokens on the H200, GPU done 0-2 ms after the last launch; twice that in
    # processes whose host runs slow), so 16,384 halves them per token: bench.py's prefill 0.33-0.36 s in every
    # process against 0.37-0.75 s (calls BO, BP). nano-vllm's default too.
    max_num_batched_tokens: int = 16384
    kvcache_block_size: int | None = None
    num_kvcache_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int = 2 << 30
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    seed: int = 0
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"
    # FP8 KV: each sequence's first block (the attention sinks) in float16 as well; off by default:
    # on the H200 it costs 8-9 % of a decode step (calls O, AH) for GPU top-1 agreement 96.6 -> 97.1 %
    # (call AF). Only the first 4 tokens in float16 cost 4 % for 96.7 % (call BR): not kept.
    fp8_sink_blocks: bool = False
    max_logprobs: int = 20
    # vLLM's dict ({"method": "ngram" | "draft_model", ...}), parsed into a SpeculativeConfig
    speculative_config: "dict | SpeculativeConfig | None" = None
    tensor_parallel_size: int = 1  # ranks the model is split over: worker processes 1..N-1, this one rank 0
    disable_custom_all_reduce: bool = False  # vLLM's name: True sends every all-reduce through NCCL
    hf_config: PretrainedConfig = field(init=False, repr=False)
    eos_token_ids: list[int] = field(init=False, default_factory=list)  # set by the engine from the tokenizer

    @classmethod
    def from_engine_args(cls, model: str, **engine_args: object) -> "Config":
        names = {f.name for f in dataclasses.fields(cls) if f.init} - {"model"}
        unknown = sorted(set(engine_args) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(names)}")
        return cls(model=model, **engine_args)

    def __post_init__(self) -> None:
        self.model = model_path(self.model)
        self._check_choices()
        self.hf_config = load_hf_config(self.model)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        if self.max_model_len is None:
            self.max_model_len = model_max
        if not 1 <= self.max_model_len <= model_max:
            raise ValueError(f"max_model_len must be in [1, {model_max}] for this model, got {self.max_model_len}")
        window = sliding_window(self.hf_config)
        if window is not None and self.max_model_len > window:
            raise ValueError(
                f"{self.model!r} uses sliding-window attention over {window} tokens, which nanovllm does not "
                f"implement; full attention equals it only for sequences within the window: "
                f"set max_model_len <= {window} (it is {self.max_model_len})"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kvcache_block_size is not None and self.kvcache_block_size < 1:
            raise ValueError(f"kvcache_block_size must be >= 1, got {self.kvcache_block_size}")
        if self.num_kvcache_blocks is not None and self.num_kvcache_blocks < 1:
            raise ValueError(f"num_kvcache_blocks must be >= 1, got {self.num_kvcache_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config, self)
        self._check_tensor_parallel()

    def _check_choices(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.fp8_sink_blocks and self.kv_cache_dtype != "fp8":
            raise ValueError(f"fp8_sink_blocks=True needs kv_cache_dtype='fp8', got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")

    def _check_tensor_parallel(self) -> None:
        """Before any work: N splits the heads, the devices exist, torch.distributed has the backend."""
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {n!r}")
        if n == 1:
            return
        heads = self.hf_config.num_attention_heads
        kv_heads = getattr(self.hf_config, "num_key_value_heads", None) or heads
        if heads % n:
            raise ValueError(f"tensor_parallel_size={n} must divide the model's {heads} attention heads")
        if kv_heads % n and n % kv_heads:
            raise ValueError(f"tensor_parallel_size={n} must divide the model's {kv_heads} KV heads or be a "
                             f"multiple of them (each rank then holds one replicated KV head)")
        if self.device.startswith("cuda"):
            if self.device != "cuda":
                raise ValueError(f"tensor parallelism puts rank r on cuda:r; pass device='cuda', not {self.device!r}")
            if n > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size={n} is over the {torch.cuda.device_count()} visible "
                                 f"CUDA GPUs")
        backend = dist_backend(self.device)
        if not torch.distributed.is_available() or not torch.distributed.is_backend_available(backend):
            raise ValueError(f"tensor_parallel_size={n} needs torch.distributed with {backend} on {self.device}")
        spec = self.speculative_config
        if spec is not None and spec.method == "draft_model":
            raise ValueError(f"speculative decoding with a draft model is not supported with "
                             f"tensor_parallel_size={n}; use the ngram method")

    @property
    def torch_dtype(self) -> torch.dtype:
        """"auto": float32 on CPU; on CUDA the config's half dtype, bfloat16 for a float32 config (as vLLM)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device == "cpu":
            return torch.float32
        dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype)
        return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def sliding_window(hf_config: PretrainedConfig) -> int | None:
    """The attention window some layer uses, read as transformers reads it; None if all attend fully.

    Mistral slides whenever `sliding_window` is set; Qwen2/Qwen3 only with `use_sliding_window`
    (transformers then keeps `sliding_window`) and only in the layers `layer_types` marks
    "sliding_attention" (those from `max_window_layers` on).
    """
    window = getattr(hf_config, "sliding_window", None)
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def model_path(model: str | os.PathLike[str]) -> str:
    """`model` as a str, whether given as one or as a PathLike (e.g. a pathlib.Path)."""
    path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise TypeError(f"model must be a str or os.PathLike, got {type(model).__name__}")
    return path


def load_hf_config(model: str | os.PathLike[str]) -> PretrainedConfig:
    """The HF config of a model directory or of a shipped preset (`preset:NAME`)."""
    model = model_path(model)
    if model.startswith(PRESET_PREFIX):
        name = model[len(PRESET_PREFIX) :]
        path = os.path.join(PRESETS_DIR, name)
        if not os.path.isdir(path):
            raise ValueError(f"unknown preset {name!r}; available: {sorted(os.listdir(PRESETS_DIR))}")
        return AutoConfig.from_pretrained(path)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"model directory {model!r} has no config.json")
    return AutoConfig.from_pretrained(model)

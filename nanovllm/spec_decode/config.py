"""`speculative_config`: which proposer, how many tokens, and when to stop speculating."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanovllm.config import Config

METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """vLLM's `speculative_config` keys.

    - `method`: "ngram" (prompt lookup: the tokens that followed the latest earlier
      occurrence of the sequence's last n tokens, n from prompt_lookup_max down to
      prompt_lookup_min) or "draft_model" (a smaller model with the same vocabulary,
      `model`, proposing greedily).
    - `num_speculative_tokens`: k, the most tokens proposed per sequence and step.
    - `prompt_lookup_min` / `prompt_lookup_max`: n-gram sizes; one unset takes the
      other's value, both unset are 5 (vLLM's defaults).
    - `disable_by_batch_size`: no speculation while more sequences than this run
      (large batches are compute-bound, where verifying k rejected tokens costs real
      time); default 8: on the H200 (SmolLM2-135M, n-gram, k = 4, the bench's `repeat`
      workload) speculation gave 1.28x at batch 4 and 1.06x at 8 (call T), 0.83x at 16
      (call R).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int = 8

    @classmethod
    def from_dict(cls, value: "dict | SpeculativeConfig", target: "Config") -> "SpeculativeConfig":
        """Parse and check `speculative_config` against the target model's config."""
        if isinstance(value, SpeculativeConfig):
            spec = dataclasses.replace(value)
        elif isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"unknown speculative_config key(s) {unknown}; known: {sorted(names)}")
            missing = sorted({"method", "num_speculative_tokens"} - set(value))
            if missing:
                raise ValueError(f"speculative_config needs {missing}")
            spec = cls(**value)
        else:
            raise TypeError(f"speculative_config must be a dict, got {type(value).__name__}")
        spec._check(target)
        return spec

    def _check(self, target: "Config") -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_speculative_tokens", "disable_by_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config {name} must be an int >= 1, got {value!r}")
        if self.method == "ngram":
            self._check_ngram()
        else:
            self._check_draft(target)

    def _check_ngram(self) -> None:
        if self.model is not None:
            raise ValueError(f"speculative_config method 'ngram' takes no model, got {self.model!r}")
        if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
            self.prompt_lookup_min = self.prompt_lookup_max = 5
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config {name} must be an int >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min={self.prompt_lookup_min} is over "
                             f"prompt_lookup_max={self.prompt_lookup_max}")

    def _check_draft(self, target: "Config") -> None:
        from nanovllm.config import load_hf_config

        if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
            raise ValueError("prompt_lookup_min/max are n-gram settings; method 'draft_model' takes none")
        if not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"speculative_config method 'draft_model' needs a model path, got {self.model!r}")
        self.model = os.fspath(self.model)
        try:
            draft = load_hf_config(self.model)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"draft model {self.model!r} cannot be loaded: {e}") from e
        if draft.vocab_size != target.hf_config.vocab_size:
            raise ValueError(f"draft model {self.model!r} has vocab_size={draft.vocab_size}, the target has "
                             f"{target.hf_config.vocab_size}; speculation needs the same vocabulary")

"""FP8 KV-cache scales: per layer and per KV head, from the K/V the model produces on calibration text.

At startup the runner runs one forward over a calibration prompt (this text through the
model's tokenizer; seeded random ids without one) with a cache in the model's dtype,
records each layer's per-KV-head absolute maximum of K and of V, and sets
scale = amax * HEADROOM / 448, so a value HEADROOM times the largest one seen still fits
before it saturates. The scales are fixed from then on: values written to the cache never
need requantizing. Measured on SmolLM2-135M (see the README): FP8 against the model-dtype
cache keeps teacher-forced top-1 agreement and logprobs within the issue's bounds.
"""
from __future__ import annotations

import numpy as np
import torch

from nanovllm.attention.kv_cache import FP8_MAX

HEADROOM = 2.0
MIN_AMAX = 1e-4  # a head that only ever produced zeros still gets a usable, logged scale

CALIBRATION_TEXT = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined
movable metal type, oil-based ink and a wooden screw press. Within fifty years presses were running
in more than two hundred European cities, and the price of books fell by an order of magnitude.
Q: What is 17 multiplied by 23? A: 17 * 23 = 391. Q: Write a Python function that reverses a list.
def reverse(items):
    return items[::-1]
User: Can you summarise the plot of Hamlet in two sentences?
Assistant: Prince Hamlet seeks revenge on his uncle Claudius, who murdered Hamlet's father and married
his mother. His hesitation and feigned madness lead to a chain of deaths, his own included.
Les marchés financiers ont réagi vivement à l'annonce; die Zinsen stiegen um 0,25 Prozentpunkte.
{"name": "sensor-7", "temperature": 21.5, "humidity": 0.43, "tags": ["indoor", "calibrated"]}
"""


def calibration_token_ids(tokenizer: object | None, vocab_size: int, seed: int, length: int = 512) -> list[int]:
    """The calibration prompt: CALIBRATION_TEXT repeated to `length` tokens, or random ids without a tokenizer."""
    if tokenizer is None:
        return np.random.default_rng(seed).integers(0, vocab_size, length).tolist()
    ids = tokenizer.encode(CALIBRATION_TEXT)
    return (ids * (length // len(ids) + 1))[:length]


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """[num_layers, num_kv_heads] absolute maxima -> float32 dequantization scales."""
    return (amax.float().clamp(min=MIN_AMAX) * HEADROOM / FP8_MAX).contiguous()

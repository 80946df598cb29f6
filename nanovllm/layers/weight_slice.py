"""Reading one rank's slice of a checkpoint tensor, straight from safetensors.

A weight loader gets either a tensor or a safetensors slice (`safe_open(...).get_slice(name)`),
whose `[...]` reads only the indexed part of the file: each rank reads its own shard.
"""
from __future__ import annotations

from typing import Protocol, Union

import torch


class SafeSlice(Protocol):
    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: object) -> torch.Tensor: ...


Loaded = Union[torch.Tensor, SafeSlice]


def full_shape(loaded: Loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def copy_slice(target: torch.Tensor, loaded: Loaded, dim: int = 0, start: int = 0,
               full_size: int | None = None, what: str = "checkpoint tensor") -> None:
    """target <- loaded[start : start + target.shape[dim]] along dim.

    The checkpoint tensor must be target's shape, except `full_size` along dim (default: target's).
    """
    expected = list(target.shape)
    expected[dim] = target.shape[dim] if full_size is None else full_size
    if full_shape(loaded) != tuple(expected):
        raise ValueError(f"{what} of shape {full_shape(loaded)} does not fit {tuple(expected)}")
    index = (slice(None),) * dim + (slice(start, start + target.shape[dim]),)
    target.copy_(loaded[index])

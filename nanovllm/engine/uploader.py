"""Host arrays to the device in one copy per call, through a ring of pinned staging buffers."""
from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes; every array starts aligned so its bytes can be viewed as its dtype
# A step uploads once, before its forward, and two steps overlap: with a buffer per call in
# turn, the one refilled was last copied out steps ago, so refilling it never waits for the
# forward in flight (one shared buffer did). Four leaves room for the extra calls of start-up.
_RING = 4
_TORCH_DTYPES = {np.dtype(t): getattr(torch, t) for t in ("int64", "int32", "float32", "float64", "bool", "uint8")}


class Uploader:
    """`upload(arrays)` packs numpy arrays of any dtypes into one pinned buffer and copies it once.

    On CPU the arrays are wrapped without a copy. On CUDA the copy is asynchronous; a
    buffer of the ring is refilled once the copy out of it four calls ago is done.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.staging = [torch.empty(0, dtype=torch.uint8) for _ in range(_RING)]
        self.copied = [torch.cuda.Event() if device.type == "cuda" else None for _ in range(_RING)]
        self.turn = 0

    def __call__(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        if self.device.type == "cpu":
            return [torch.from_numpy(a) for a in arrays]
        offsets, total = byte_offsets(arrays)
        return unpack(self.raw(list(zip(offsets, arrays)), total), arrays, offsets)

    def raw(self, chunks: list[tuple[int, np.ndarray]], total: int) -> torch.Tensor:
        """`total` bytes on the device (uint8), each (offset, array) of `chunks` written at its byte
        offset (bytes no chunk covers hold anything); one copy on CUDA."""
        if self.device.type == "cpu":
            buffer = np.zeros(total, dtype=np.uint8)
            _write(buffer, chunks)
            return torch.from_numpy(buffer)
        i = self.turn
        self.turn = (i + 1) % _RING
        self.copied[i].synchronize()  # the copy out of this buffer, _RING calls ago, is done
        if self.staging[i].numel() < total:
            self.staging[i] = torch.empty(2 * total, dtype=torch.uint8).pin_memory()
        _write(self.staging[i].numpy(), chunks)
        device = self.staging[i][:total].to(self.device, non_blocking=True)
        self.copied[i].record()
        return device


def _write(host: np.ndarray, chunks: list[tuple[int, np.ndarray]]) -> None:
    for offset, a in chunks:
        a = np.ascontiguousarray(a)
        host[offset : offset + a.nbytes] = a.view(np.uint8).ravel()


def byte_offsets(arrays: list[np.ndarray]) -> tuple[list[int], int]:
    """Where each array starts in the packed buffer (aligned), and the buffer's size."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def unpack(buffer: torch.Tensor, arrays: list[np.ndarray], offsets: list[int]) -> list[torch.Tensor]:
    """Views of `buffer` (uint8) holding each array's bytes at its offset, with its dtype and shape.

    A step unpacks about twenty arrays, so this avoids ops: 1-D arrays skip the reshape, and
    dtypes come from a table rather than a tensor made to ask numpy's.
    """
    out = []
    for a, offset in zip(arrays, offsets):
        dtype = _TORCH_DTYPES.get(a.dtype) or torch.from_numpy(a[:0]).dtype
        view = buffer[offset : offset + a.nbytes].view(dtype)
        out.append(view if a.ndim == 1 else view.view(a.shape))
    return out

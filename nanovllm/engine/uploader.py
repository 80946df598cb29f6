"""Host arrays to the device in one copy per call, through a ring of pinned staging buffers."""
from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes; every array starts aligned so its bytes can be viewed as its dtype
# A step uploads twice (model inputs, then sampling parameters) and two steps overlap, so a
# buffer comes round again only once the step that last used it is done: reusing it never
# waits for the forward in flight. The sampling copy is queued behind that forward.
_RING = 4


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
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        i = self.turn
        self.turn = (i + 1) % _RING
        self.copied[i].synchronize()  # the copy out of this buffer, _RING calls ago, is done
        if self.staging[i].numel() < total:
            self.staging[i] = torch.empty(2 * total, dtype=torch.uint8).pin_memory()
        host = self.staging[i].numpy()
        for a, offset in zip(arrays, offsets):
            host[offset : offset + a.nbytes] = a.view(np.uint8).ravel()
        device = self.staging[i][:total].to(self.device, non_blocking=True)
        self.copied[i].record()
        return [device[offset : offset + a.nbytes].view(torch.from_numpy(a[:0]).dtype).view(a.shape)
                for a, offset in zip(arrays, offsets)]

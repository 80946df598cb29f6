"""Host arrays to the device in one copy per step, through a pinned staging buffer."""
from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes; every array starts aligned so its bytes can be viewed as its dtype


class Uploader:
    """`upload(arrays)` packs numpy arrays of any dtypes into one pinned buffer and copies it once.

    On CPU the arrays are wrapped without a copy. On CUDA the copy is asynchronous; the
    buffer is reused once the previous copy out of it is done.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.staging = torch.empty(0, dtype=torch.uint8)
        self.staging_free = torch.cuda.Event() if device.type == "cuda" else None

    def __call__(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        arrays = [np.ascontiguousarray(a) for a in arrays]
        if self.device.type == "cpu":
            return [torch.from_numpy(a) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        self.staging_free.synchronize()  # the previous copy out of the buffer is done
        if self.staging.numel() < total:
            self.staging = torch.empty(2 * total, dtype=torch.uint8).pin_memory()
        host = self.staging.numpy()
        for a, offset in zip(arrays, offsets):
            host[offset : offset + a.nbytes] = a.view(np.uint8).ravel()
        device = self.staging[:total].to(self.device, non_blocking=True)
        self.staging_free.record()
        return [device[offset : offset + a.nbytes].view(torch.from_numpy(a[:0]).dtype).view(a.shape)
                for a, offset in zip(arrays, offsets)]

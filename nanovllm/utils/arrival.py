"""Last-to-arrive reductions: a kernel whose programs each write a part of a sum (split-KV decode's
partitions, a split-K GEMM's K ranges) lets the last program of a group to finish combine the parts,
instead of a reduce kernel of its own, which in a latency-bound decode step costs a couple of
microseconds per kernel boundary.

Each group has an int32 counter, zero between kernels: a program writes its part, then adds 1
(`last_to_arrive`); the one that reads ``parts - 1`` combines the group's parts and resets the
counter for the next kernel (or graph replay), so a buffer is zeroed only when allocated. Kernels
that share the counters must touch them only after their PDL wait (`nanovllm.utils.pdl`), so that
no two run on them at once. Nothing spins, so a group's programs need not be resident together.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def last_to_arrive(counter_ptr, parts):
    """Whether this program is the last of its group's ``parts`` programs to have written its part.

    The barrier orders every thread's part stores before the one thread's atomic (a CTA-scope
    synchronization), and the atomic's release at GPU scope is cumulative, so it publishes them all;
    each arrival also acquires, so the count the last program reads carries every earlier program's
    part (each release includes what its program acquired). The result reaches all threads through
    a barrier after the acquire, so their loads of the parts come after it too. The caller reads the
    parts with ``cache_modifier=".cg"`` (from L2, not a stale L1 line) and resets the counter to 0."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return arrived == parts - 1


# Per device: every buffer handed out stays alive (a CUDA graph keeps the address it captured) and the
# newest, the largest, serves new calls.
_COUNTERS: dict[torch.device, list[Tensor]] = {}


def arrival_counters(device: torch.device, count: int) -> Tensor:
    """At least ``count`` int32 counters on ``device``, zero between kernels.

    A new buffer can only come outside CUDA-graph capture (the zeroing would be a node of the graph and
    the buffer unzeroed outside it): the eager warm-up of the same call before a capture allocates it.
    Calls on one device must not overlap on different streams (the engine runs its steps on one)."""
    held = _COUNTERS.setdefault(device, [])
    if held and held[-1].numel() >= count:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"a kernel needs {count} arrival counters on {device}, more than any call before the "
                           "CUDA graph capture: run the call once before capturing it")
    held.append(torch.zeros(max(count, 2 * held[-1].numel() if held else 0), dtype=torch.int32, device=device))
    return held[-1]

"""Triton's kernel builds for a piece of work, done in parallel before the work runs.

Triton builds a kernel specialization the first time it is launched: LLVM, ptxas and, once per
kernel, a C launcher compiled with gcc. On a fresh machine (no Triton cache) the engine's startup
met 24 of them one after another, 0.1-1.3 s each: 12.3 s of a 20.5 s startup on an H100 went to
the builds themselves (call DN), launchers not counted. `compile_ahead(device, fn)` runs
`fn` once with every Triton launch that would build turned into a build on a thread pool (Triton
releases the GIL while it compiles), and returns when all are built, launchers included; the
caller then runs the work for real and finds every kernel ready.

Inside, a kernel that needs a build does not run, so its outputs hold garbage (and a kernel already
built runs on them): `fn` must not act on values that Triton kernels compute (index with them,
branch on them). A CUDA-graph step meets that by construction; a step that reads the previous
step's sampled tokens must be pointed elsewhere. The hook is Triton's own
`knobs.runtime.jit_cache_hook` (Triton >= 3.4), process-wide while `fn` runs: where it is taken,
off CUDA, or in a process group of several ranks, `fn` is not run and the builds stay where the
launches are. Several ranks would skip different launches: one whose build finished first could
run a collective kernel (the one-shot all-reduce) that its peers skip, and wait for them.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

try:
    from triton import knobs
    from triton.runtime import driver
except ImportError:  # no Triton, or one older than 3.4
    knobs = None


@dataclass
class BuildTime:
    """What `compile_ahead` has spent in this process (Triton's kernel cache is process-wide too): wall
    seconds, the run of `fn` included, and builds."""

    seconds: float = 0.0
    builds: int = 0


BUILD_TIME = BuildTime()


def compile_ahead(device: torch.device, fn: Callable[[], object], max_workers: int | None = None) -> int:
    """Run `fn` with the Triton kernels it would build built in parallel instead of launched; returns
    how many builds it started (0 where it does nothing: see the module docstring). A build's
    error is raised here, after every build has finished."""
    if knobs is None or device.type != "cuda" or knobs.runtime.jit_cache_hook is not None \
            or (dist.is_initialized() and dist.get_world_size() > 1):
        return 0
    if device.index is None:  # the thread's current device is where a launch would build
        device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    builds: dict[tuple[int, str], Future] = {}
    pool = ThreadPoolExecutor(max_workers or min(16, os.cpu_count() or 1), thread_name_prefix="triton-build")

    def defer(*, key: str, fn, compile: dict, is_manual_warmup: bool, **_) -> bool:
        if is_manual_warmup:
            return False  # a build of the pool's (`preload`): Triton compiles it
        jit_function = fn.jit_function
        if (id(jit_function), key) not in builds:
            builds[id(jit_function), key] = pool.submit(_build, jit_function, compile["specialization_data"], device)
        return True  # nothing launched

    knobs.runtime.jit_cache_hook = defer
    try:
        fn()
    finally:
        pool.shutdown(wait=True)
        knobs.runtime.jit_cache_hook = None
    for build in builds.values():
        build.result()
    BUILD_TIME.seconds += time.perf_counter() - start
    BUILD_TIME.builds += len(builds)
    return len(builds)


def _build(jit_function, specialization: str, device: torch.device) -> None:
    """Compile one specialization into the kernel's in-memory cache (for the device), and build its
    launcher into Triton's cache, where its first launch will find it. The compiled kernel itself is
    left alone: `fn` may launch it as soon as it is in the cache, which loads it onto the device."""
    torch.cuda.set_device(device)  # the cache `preload` fills is the thread's current device's
    kernel = jit_function.preload(specialization)
    driver.active.launcher_cls(kernel.src, kernel.metadata)

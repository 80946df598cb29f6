"""Rank 0's side of tensor parallelism: the worker processes of ranks 1..N-1 and their pipes.

Starting the pool spawns the workers (torch.multiprocessing, spawn), waits until each has
started, and joins the group as rank 0. Each step's `StepInputs` go to every worker as one
packed message; a worker writes back only at startup or when it fails, so anything to read
on a pipe after startup is an error. `shutdown` stops the workers (also when the LLM is
garbage collected or the interpreter exits, through the engine's finalizer).

NCCL's teardown of a group waits until every rank takes part, so a clean shutdown tells the
workers to stop and leaves the group along with them, and only then waits for them to exit. Every
rank frees its CUDA graphs first: the teardown hangs while a graph that captured NCCL calls lives.
After a failure (a worker gone, or rank 0 left a step half done, so that a worker may wait in a
collective) the workers are killed and the group is aborted instead.
"""
from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait

import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.config import Config
from nanovllm.distributed.parallel_state import TensorParallel, init_tensor_parallel, leave_tensor_parallel
from nanovllm.distributed.worker import READY, SHUTDOWN, STARTED, run_worker
from nanovllm.engine.cuda_graph import DecodeGraphs
from nanovllm.engine.step_inputs import StepInputs

START_TIMEOUT_S = 180.0  # spawn and import; loading follows in step with rank 0
READY_TIMEOUT_S = 120.0  # after rank 0 is built: the workers build in step, so they are about done
ERROR_WAIT_S = 5.0  # after a collective failed: time for the worker's traceback to arrive
STOP_TIMEOUT_S = 10.0


class WorkerPool:
    def __init__(self, config: Config, calibration_ids: list[int] | None):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group (another "
                               "tensor-parallel LLM?); shut that down first: one per process")
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.conns, self.procs = [], []
        self.tp: TensorParallel | None = None  # once rank 0 joined the group
        self.worker_info: list[dict] = []  # ranks 1..N-1 once ready: num_blocks, cuda_graph_sizes
        self.closed = False
        self.broken = False  # an error escaped rank 0's part of a step: a worker may wait in a collective
        self.graphs: DecodeGraphs | None = None  # rank 0's, once captured: freed before leaving the group
        try:
            for rank in range(1, config.tensor_parallel_size):
                conn, child_conn = ctx.Pipe()
                proc = ctx.Process(target=run_worker, args=(rank, config, calibration_ids, init_method, child_conn),
                                   name=f"nanovllm-tp-rank{rank}", daemon=True)
                proc.start()
                child_conn.close()
                self.conns.append(conn)
                self.procs.append(proc)
            self.expect(STARTED, START_TIMEOUT_S)
            self.tp = init_tensor_parallel(0, config.tensor_parallel_size, init_method, config.device,
                                           not config.disable_custom_all_reduce)
        except BaseException:
            self.shutdown(timeout=0)
            raise

    def expect(self, tag: bytes, timeout: float) -> list[bytes]:
        """Wait for a message starting with `tag` from every worker and return the rest of each;
        RuntimeError on anything else or after timeout seconds."""
        rests = []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            if not wait([conn, proc.sentinel], timeout):
                raise RuntimeError(f"tensor-parallel worker rank {rank} sent no {tag.decode()!r} "
                                   f"within {timeout:.0f} s")
            message = conn.recv_bytes() if conn.poll() else b""
            if message.startswith(tag):
                rests.append(message[len(tag) :])
            elif message:
                raise RuntimeError(f"tensor-parallel worker rank {rank} failed:\n{message.decode()}")
            else:
                raise RuntimeError(self.failure(0.0) or f"tensor-parallel worker rank {rank} failed")
        return rests

    def wait_ready(self, num_blocks: int) -> None:
        """After rank 0's runner is built: every worker has built its own, with num_blocks KV blocks."""
        self.worker_info = [json.loads(m) for m in self.expect(READY, READY_TIMEOUT_S)]
        for rank, info in enumerate(self.worker_info, start=1):
            if info["num_blocks"] != num_blocks:
                raise RuntimeError(f"tensor-parallel worker rank {rank} has {info['num_blocks']} KV blocks, "
                                   f"rank 0 {num_blocks}")

    def send(self, step: StepInputs) -> None:
        """Every worker runs the step along with rank 0; RuntimeError if one has failed."""
        if self.closed:
            raise RuntimeError("this LLM was shut down")
        failure = self.failure(0.0)
        if failure:
            raise RuntimeError(failure)
        message = step.pack()
        for conn in self.conns:
            conn.send_bytes(message)

    def failure(self, timeout: float) -> str | None:
        """What went wrong in a worker (its traceback, or its exit), waiting up to timeout seconds; None if nothing."""
        ready = wait([*self.conns, *(p.sentinel for p in self.procs)], timeout)
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            if conn in ready:
                try:
                    return f"tensor-parallel worker rank {rank} failed:\n{conn.recv_bytes().decode()}"
                except EOFError:
                    pass
            if conn in ready or proc.sentinel in ready:
                proc.join(STOP_TIMEOUT_S)
                return f"tensor-parallel worker rank {rank} exited (exit code {proc.exitcode})"
        return None

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Turn an error in rank 0's part of a collective (a RuntimeError) into the error of the worker
        that caused it. Any error that escapes marks the pool broken (for `shutdown`)."""
        try:
            yield
        except RuntimeError as e:
            self.broken = True
            failure = None if self.closed else self.failure(ERROR_WAIT_S)
            if failure:
                raise RuntimeError(failure) from e
            raise
        except BaseException:
            self.broken = True
            raise

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the workers and leave the group; idempotent. Clean unless something failed or timeout
        is 0: then (or if a worker has not exited within timeout seconds) the workers are killed."""
        if self.closed:
            return
        self.closed = True
        clean = timeout > 0 and not self.broken and self.tp is not None and self.failure(0.0) is None
        if self.graphs is not None:
            self.graphs.reset()
        if clean:
            try:
                for conn in self.conns:
                    conn.send_bytes(SHUTDOWN)
            except OSError:  # a worker went just now: leaving with it would wait forever
                clean = False
        if clean:
            leave_tensor_parallel(clean=True)
        for proc in self.procs:
            proc.join(timeout if clean else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        if self.tp is not None and not clean:
            leave_tensor_parallel(clean=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

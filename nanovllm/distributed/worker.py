"""A tensor-parallel worker: the main function of the process that is rank r >= 1.

It joins the group, builds its ModelRunner (its shard of the model, the KV cache of its KV
heads, CUDA graphs) in step with the others, then runs every step rank 0 sends it until told
to stop. Messages on its pipe to rank 0: STARTED; READY with a JSON summary of its runner (KV
blocks, CUDA graph batch sizes); or the traceback of what went wrong.
"""
from __future__ import annotations

import json
import signal
import traceback
from contextlib import suppress
from multiprocessing.connection import Connection

import torch

from nanovllm.config import Config
from nanovllm.distributed.parallel_state import init_tensor_parallel, leave_tensor_parallel
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.step_inputs import StepInputs

STARTED = b"started"
READY = b"ready"
SHUTDOWN = b""  # rank 0's message for "exit"; any other is a packed StepInputs


def run_worker(rank: int, config: Config, calibration_ids: list[int] | None, init_method: str,
               conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it then stops the workers
    told_to_stop, runner = False, None
    try:
        conn.send_bytes(STARTED)
        if config.device == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
        tp = init_tensor_parallel(rank, config.tensor_parallel_size, init_method, config.device,
                                  not config.disable_custom_all_reduce)
        runner = ModelRunner(config, calibration_ids, tp)
        graph_sizes = runner.graphs.sizes if runner.graphs is not None else []
        conn.send_bytes(READY + json.dumps({"num_blocks": runner.num_blocks, "cuda_graph_sizes": graph_sizes}).encode())
        while (message := conn.recv_bytes()) != SHUTDOWN:
            runner.follow(StepInputs.unpack(message))
        told_to_stop = True
    except EOFError:  # rank 0 is gone
        pass
    except BaseException:
        with suppress(OSError):
            conn.send_bytes(traceback.format_exc().encode())
    finally:
        if runner is not None and runner.graphs is not None:
            runner.graphs.reset()  # before leaving: NCCL's teardown hangs while they live
        leave_tensor_parallel(clean=told_to_stop)  # on SHUTDOWN rank 0 leaves with us

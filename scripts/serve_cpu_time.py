"""CPU time per streamed token of each process of a serving run: the HTTP server, its children (the
engine process, and multiprocessing's resource tracker), and bench_serve.py's client processes. A
tiny random model on CPU, 256 streams at once.

    python scripts/serve_cpu_time.py [--client-processes N] [--py-spy FILE] [-- SERVER FLAGS...]

What it showed (2 cores): the server spent 62 us per token (54 with uvloop and httptools), one
httpx client process 141 us, more than a core at a GPU's ~20k tok/s. So served throughput was
capped by the benchmark's client, until bench_serve.py spread its requests over processes.
`--py-spy FILE` records the server's GIL-holding stacks (py-spy must be installed).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import build_tiny_model  # noqa: E402
from serve.server_process import ServerProcess  # noqa: E402

WORKLOAD = ["--num-prompts", "256", "--min-input-len", "16", "--max-input-len", "64", "--min-output-len", "100",
            "--max-output-len", "200", "--max-token-id", "300", "--warmup", "0"]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client-processes", type=int, default=None)
    p.add_argument("--py-spy", default=None, help="record the server's stacks (raw format) into this file")
    p.add_argument("server_flags", nargs="*")
    args = p.parse_args()
    path = tempfile.mkdtemp()
    build_tiny_model("qwen3", path)
    server = ServerProcess(path, "--skip-tokenizer-init", "--max-model-len", "512", "--max-num-seqs", "256",
                           *args.server_flags, log_path=os.path.join(path, "server.log"))
    try:
        pid = server.proc.pid
        procs = {"server (HTTP)": pid, **{f"server's child {child}": child for child in children(pid)}}
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        spy = subprocess.Popen(["py-spy", "record", "--gil", "-r", "200", "-f", "raw", "-o", args.py_spy,
                                "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
            if args.py_spy else None
        clients = ["--client-processes", str(args.client_processes)] if args.client_processes else []
        start_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, os.path.join(ROOT, "bench_serve.py"), "--base-url",
                               server.base_url, *WORKLOAD, *clients], capture_output=True, text=True,
                              check=True)
        end_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        tokens = result["output_tokens"]
        print(f"{tokens} tokens streamed at {result['throughput_tok_s']:.0f} tok/s; CPU time per token:")
        for name, pid in procs.items():
            print(f"  {name}: {(cpu_seconds(pid) - before[name]) / tokens * 1e6:.1f} us")
        client = sum(getattr(end_children, f) - getattr(start_children, f) for f in ("ru_utime", "ru_stime"))
        print(f"  bench_serve.py (all its processes): {client / tokens * 1e6:.1f} us")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

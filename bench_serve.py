"""Serving benchmark: N streaming completions with Poisson arrivals against a running server.

    nanovllm serve preset:qwen3-0.6b --load-format dummy --skip-tokenizer-init &
    python bench_serve.py                                  # bench.py's workload, all 256 at once
    python bench_serve.py --num-prompts 64 --max-concurrency 16 --min-input-len 512 --max-input-len 512

The prompts and output lengths are bench.py's, drawn the same way from the same seed (random
token ids, `ignore_eos`), so served throughput compares with `python bench.py` on the same GPU.
One untimed warm-up round on other prompts comes first, as in bench.py. Prints output throughput
and the p50/p90/p99 of time to first token (TTFT) and inter-token latency (ITL, per streamed
token after the first), then a JSON line.

The requests are spread over `--client-processes` processes (request i to process i mod P), each
with its own event loop, all starting at one instant. One Python process parses about 7-10k
streamed chunks a second (httpx, JSON), less than the server streams at 256 requests on a GPU:
measured with one client process, the client rather than the server set the throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Result:
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second; inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--min-output-len", type=int, default=100)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--max-token-id", type=int, default=10000, help="prompt token ids are drawn from 0..this")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--client-processes", type=int, default=min(8, os.cpu_count() or 1),
                   help="client processes the requests are spread over")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


async def one_request(http: httpx.AsyncClient, body: dict) -> Result:
    """Stream one completion; token counts come from the final usage chunk."""
    result, start = Result(), time.perf_counter()
    last = None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"]["message"])
            if not chunk["choices"]:
                result.output_tokens = chunk["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
    return result


def workload(args: argparse.Namespace, run: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) per request, drawn exactly as bench.py's `workload`."""
    rng = random.Random(args.seed + run)
    prompts = [[rng.randint(0, args.max_token_id) for _ in range(rng.randint(args.min_input_len, args.max_input_len))]
               for _ in range(args.num_prompts)]
    return [(prompt, rng.randint(args.min_output_len, args.max_output_len)) for prompt in prompts]


async def serve_share(args: argparse.Namespace, index: int, share: int, start_at: float) -> list[Result]:
    """This client process's requests of round `index` (every `client_processes`-th, from `share`),
    sent from wall-clock time `start_at` on; with a request rate, this process's share of it."""
    rng = random.Random(args.seed + index * 1000 + share)  # arrival times
    rate = args.request_rate / args.client_processes
    concurrency = args.max_concurrency or args.num_prompts
    concurrency = concurrency // args.client_processes + (share < concurrency % args.client_processes)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency)
    requests = workload(args, index)[share :: args.client_processes]
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as http:
        gate = asyncio.Semaphore(concurrency)

        async def send(body: dict) -> Result:
            async with gate:
                return await one_request(http, body)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        tasks = []
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(send(dict(
                model=args.model, prompt=prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0.6,
                stream=True, stream_options={"include_usage": True}))))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        return await asyncio.gather(*tasks)


def run_share(args: argparse.Namespace, index: int, share: int, start_at: float) -> tuple[list[Result], float]:
    results = asyncio.run(serve_share(args, index, share, start_at))
    return results, time.time()


def serve_round(pool: ProcessPoolExecutor, args: argparse.Namespace, index: int) -> tuple[list[Result], float]:
    """All requests of round `index` over the client processes; their results and the round's seconds."""
    start_at = time.time() + 0.5  # every process is up and waiting by then
    futures = [pool.submit(run_share, args, index, share, start_at) for share in range(args.client_processes)]
    shares = [f.result() for f in futures]
    return [r for results, _ in shares for r in results], max(end for _, end in shares) - start_at


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99 in milliseconds (0 without samples, e.g. ITL with --output-len 1)."""
    cuts = np.percentile(seconds, [50, 90, 99]) * 1000 if seconds else [0.0] * 3
    return dict(zip(("p50", "p90", "p99"), map(float, cuts)))


def main() -> None:
    args = parse_args()
    if args.client_processes < 1:
        raise ValueError(f"--client-processes must be >= 1, got {args.client_processes}")
    args.client_processes = min(args.client_processes, args.max_concurrency or args.num_prompts, args.num_prompts)
    if args.model is None:
        args.model = httpx.get(f"{args.base_url}/v1/models", headers={"authorization": f"Bearer {args.api_key}"}
                               if args.api_key else {}).json()["data"][0]["id"]
    with ProcessPoolExecutor(args.client_processes) as pool:
        for i in range(args.warmup):
            serve_round(pool, args, 1000 + i)
        results, seconds = serve_round(pool, args, 0)
    tokens = sum(r.output_tokens for r in results)
    ttft = percentiles([r.ttft for r in results])
    itl = percentiles([t for r in results for t in r.itl])
    print(f"requests: {len(results)}, output tokens: {tokens}, time: {seconds:.2f} s, "
          f"throughput: {tokens / seconds:.0f} tok/s, {len(results) / seconds:.2f} req/s")
    for name, p in (("TTFT", ttft), ("ITL", itl)):
        print(f"{name} ms: p50 {p['p50']:.1f}, p90 {p['p90']:.1f}, p99 {p['p99']:.1f}")
    print(json.dumps({"requests": len(results), "output_tokens": tokens, "seconds": round(seconds, 3),
                      "throughput_tok_s": round(tokens / seconds, 1),
                      "ttft_ms": {k: round(v, 2) for k, v in ttft.items()},
                      "itl_ms": {k: round(v, 2) for k, v in itl.items()}}))


if __name__ == "__main__":
    main()

"""Load check of `edgerun serve`: concurrent streaming clients against one server process.

Starts `edgerun serve` (the demo model unless --model) on a free loopback port, then runs --clients clients, each
sending --requests streamed chat completions one after the other (random short questions, sampled, with
`stream_options.include_usage`). Checks that every response is complete and well-formed (the role first, content
chunks, one finish reason on the last choice chunk, the usage chunk, `[DONE]`), that the server started requests in
the order they arrived (its `x-edgerun-arrival` numbering against the order of first tokens: one generation at a
time, so a request that arrived later cannot show a token first), and that the server's RSS after the run is within
5% of its RSS after the first 10 requests. Reports p50/p95 time to first token and the decode speed each client saw.

    python benchmarks/serve_load.py [--clients 8] [--requests 25] [--max-tokens 48] [--model PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx
import psutil

QUESTIONS = ["Who is the king?", "Speak of love.", "What news from Rome?", "Tell me of the war.", "Where is Romeo?",
             "What say you, my lord?", "Is the queen well?", "Why weep you so?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random, max_tokens: int) -> dict:
    body = {"model": "load", "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": rng.randrange(1 << 30), "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    events, problems = [], []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"problems": [f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"]}
        arrival = int(r.headers["x-edgerun-arrival"])
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                problems.append(f"not an event: {line[:80]!r}")
                continue
            data = line[6:]
            if data == "[DONE]":
                events.append(data)
                break
            chunk = json.loads(data)
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            events.append(chunk)
    ended = time.perf_counter()
    if not events or events[-1] != "[DONE]":
        problems.append("no [DONE]")
        return {"problems": problems}
    chunks = events[:-1]
    if chunks[0]["choices"][0]["delta"].get("role") != "assistant":
        problems.append("the role does not come first")
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    finishes = [c["finish_reason"] for c in choices]
    if finishes[-1] not in ("stop", "length") or any(finishes[:-1]):
        problems.append(f"finish reasons {finishes}")
    usage = chunks[-1].get("usage")
    if chunks[-1]["choices"] or not usage or \
            usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        problems.append("no usage chunk last")
    tokens = usage["completion_tokens"] if usage else 0
    decode = (tokens - 1) / (ended - first) if first and tokens > 1 and ended > first else None
    return {"problems": problems, "arrival": arrival, "first_token_at": first, "ttft": (first or ended) - sent,
            "tokens": tokens, "decode_tok_s": decode}


async def client_loop(i: int, url: str, requests: int, max_tokens: int, done: list, after_ten: asyncio.Event
                      ) -> list[dict]:
    rng = random.Random(i)
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(requests):
            out.append(await one_request(client, url, rng, max_tokens))
            done.append(1)
            if len(done) >= 10:
                after_ten.set()
    return out


async def run(a: argparse.Namespace, base: str, server: psutil.Process) -> dict:
    done: list = []
    after_ten = asyncio.Event()
    rss = {}

    async def watch() -> None:
        await after_ten.wait()
        rss["after_10"] = server.memory_info().rss

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    results = await asyncio.gather(*(client_loop(i, base + "/v1/chat/completions", a.requests, a.max_tokens, done,
                                                 after_ten) for i in range(a.clients)))
    wall = time.perf_counter() - t0
    await watcher
    rss["after_run"] = server.memory_info().rss
    flat = [r for per in results for r in per]
    problems = [p for r in flat for p in r["problems"]]
    ok = [r for r in flat if not r["problems"]]
    by_arrival = sorted(ok, key=lambda r: r["arrival"])
    starts = [r["first_token_at"] for r in by_arrival if r["first_token_at"] is not None]
    in_order = all(x < y for x, y in zip(starts, starts[1:]))
    ttft = [r["ttft"] for r in ok]
    per_client = [statistics.median([r["decode_tok_s"] for r in per if r.get("decode_tok_s")] or [0.0])
                  for per in results]
    return {
        "clients": a.clients, "requests": len(flat), "complete_and_well_formed": len(ok), "problems": problems[:10],
        "served_in_arrival_order": in_order, "wall_s": wall,
        "completion_tokens": sum(r["tokens"] for r in ok), "throughput_tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "decode_tok_s_per_client": per_client, "rss_after_10_bytes": rss["after_10"],
        "rss_after_run_bytes": rss["after_run"], "rss_growth": rss["after_run"] / rss["after_10"] - 1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per client (default 25)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--model", default=None, help="model to serve (default: the demo model)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "edgerun.cli", "serve", "--port", str(port), "--model-name", "load", "--ctx", "512"]
    proc = subprocess.Popen(cmd + ([a.model] if a.model else []), stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit(f"the server stopped: {proc.stderr.read()}")
                time.sleep(0.2)
        result = asyncio.run(run(a, base, psutil.Process(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if a.json:
        print(json.dumps(result, indent=2))
        return
    mib = 2 ** 20
    print(f"{result['requests']} requests from {a.clients} streaming clients in {result['wall_s']:.1f} s: "
          f"{result['complete_and_well_formed']} complete and well-formed, served in arrival order: "
          f"{result['served_in_arrival_order']}")
    print(f"time to first token p50 {result['ttft_p50_s']:.3f} s, p95 {result['ttft_p95_s']:.3f} s; "
          f"{result['throughput_tok_s']:.1f} tok/s in all")
    print("decode tok/s per client (medians): " + ", ".join(f"{v:.1f}" for v in result["decode_tok_s_per_client"]))
    print(f"server RSS {result['rss_after_10_bytes'] / mib:.1f} MiB after 10 requests, "
          f"{result['rss_after_run_bytes'] / mib:.1f} MiB after the run ({100 * result['rss_growth']:+.1f}%)")
    for problem in result["problems"]:
        print(f"problem: {problem}")


if __name__ == "__main__":
    main()

"""Aggregate decode throughput of `awqc serve` with 1, 4 and 8 concurrent streaming clients.

    python bench/serve_load.py ARTIFACT [--streams 1 4 8] [--max-tokens 64]

The server runs in this process (the app `awqc serve` runs) with --max-batch equal to the largest
stream count; the clients are the official `openai` AsyncOpenAI client. Each stream asks for
--max-tokens tokens (greedy, no stop, so every stream generates all of them); aggregate tok/s =
all streams' generated tokens / the wall time from the first request to the last token.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from pathlib import Path


def start_server(artifact: Path, max_batch: int) -> tuple[str, object]:
    import uvicorn

    from awqc.runtime.engine import Engine
    from awqc.runtime.serve import make_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(Engine(artifact, max_batch=max_batch), "bench", max_batch),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


async def load(url: str, streams: int, max_tokens: int) -> tuple[int, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    async def one(i: int) -> int:
        stream = await client.completions.create(model="bench", prompt=f"Request {i}: the compiler", stream=True,
                                                 max_tokens=max_tokens, temperature=0)
        return sum([1 async for c in stream if c.choices and c.choices[0].text])

    t0 = time.perf_counter()
    pieces = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(pieces), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import machine_name

    url, server = start_server(args.artifact, max(args.streams))
    asyncio.run(load(url, 1, 4))  # warm-up
    rows = []
    for n in args.streams:
        _, seconds = asyncio.run(load(url, n, args.max_tokens))
        rows.append((n, n * args.max_tokens / seconds, seconds))
    server.should_exit = True
    print(f"\nmachine: {machine_name()}; {args.artifact.name}; {args.max_tokens} tokens per stream, greedy\n")
    print("| streams | aggregate decode tok/s | per stream tok/s | vs 1 stream | wall s |")
    print("|---|---|---|---|---|")
    for n, rate, seconds in rows:
        print(f"| {n} | {rate:.1f} | {rate / n:.1f} | {rate / rows[0][1]:.2f}x | {seconds:.1f} |")


if __name__ == "__main__":
    main()

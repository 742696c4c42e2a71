"""`awqc bench`: prefill and decode speed of an artifact with llama-bench's conventions, so the two
tables read side by side: tests ppN (N prompt tokens into an empty cache, one call) and tgN (N
tokens decoded one by one from an empty cache, no sampling), each after one warm-up run, at each
thread count, repeated; t/s is the mean ± standard deviation over the repetitions."""
from __future__ import annotations

import csv
import io
import json
import statistics
import time
from typing import Any, Sequence

import tvm

from .engine import Engine

_THREADPOOL_BIG_CORES = 1  # TVM's affinity mode "big": all cores of the fastest kind


def set_threads(n: int) -> None:
    tvm.get_global_func("runtime.config_threadpool")(_THREADPOOL_BIG_CORES, n)


def param_count(model: dict[str, Any]) -> int:
    """Parameters of the model as its config describes it (packing does not change the count)."""
    h, inter, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    q, kv = model["num_attention_heads"] * model["head_dim"], model["num_key_value_heads"] * model["head_dim"]
    block = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    block += (q + 2 * kv if model.get("attention_bias") else 0) + (h if model.get("o_proj_bias") else 0)
    head = 0 if model["tie_word_embeddings"] else model["vocab_size"] * h
    return model["vocab_size"] * h + layers * block + h + head


def _tokens(engine: Engine, n: int) -> list[int]:
    vocab = engine.manifest["model"]["vocab_size"]
    return [(i * 7919) % (vocab - 100) + 50 for i in range(n)]


def time_prefill(engine: Engine, n: int) -> float:
    ids = _tokens(engine, n)
    engine.reset()
    t0 = time.perf_counter()
    engine.prefill(ids)
    return time.perf_counter() - t0


def time_decode(engine: Engine, n: int) -> float:
    ids = _tokens(engine, n)
    engine.reset()
    t0 = time.perf_counter()
    for t in ids:
        engine.decode(t)
    return time.perf_counter() - t0


def run_bench(engine: Engine, n_prompt: Sequence[int], n_gen: Sequence[int], threads: Sequence[int],
              reps: int) -> list[dict[str, Any]]:
    """One row per (threads, test), in llama-bench's JSON field names."""
    for n in [*n_prompt, *n_gen]:
        if n > engine.context_window:
            raise ValueError(f"a test of {n} tokens does not fit the artifact's context window of "
                             f"{engine.context_window}; recompile with --context-window {n} or more")
    m = engine.manifest
    common = {"model_type": m["model"]["model_type"], "model_size": (engine.root / "weights.safetensors").stat().st_size,
              "model_n_params": param_count(m["model"]), "target": m["target"]["name"],
              "quant": (m["quantization"] or {}).get("scheme", m["dtype"])}
    rows = []
    for t in threads:
        set_threads(t)
        for kind, sizes, timer in (("pp", n_prompt, time_prefill), ("tg", n_gen, time_decode)):
            for n in sizes:
                if n <= 0:
                    continue
                timer(engine, n)  # warm-up
                rates = [n / timer(engine, n) for _ in range(reps)]
                rows.append({**common, "n_threads": t, "n_prompt": n if kind == "pp" else 0,
                             "n_gen": n if kind == "tg" else 0, "test": f"{kind}{n}",
                             "avg_ts": statistics.fmean(rates),
                             "stddev_ts": statistics.stdev(rates) if len(rates) > 1 else 0.0, "samples_ts": rates})
    return rows


def format_rows(rows: list[dict[str, Any]], fmt: str, model_name: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    head = ["model", "size", "params", "target", "threads", "test", "t/s"]
    cells = [[f"{model_name} {r['quant']}", f"{r['model_size'] / 2**30:.2f} GiB", f"{r['model_n_params'] / 1e9:.2f} B",
              r["target"], str(r["n_threads"]), r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"] for r in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([*head[:-1], "avg_ts", "stddev_ts"])
        for r, c in zip(rows, cells):
            writer.writerow([*c[:-1], f"{r['avg_ts']:.4f}", f"{r['stddev_ts']:.4f}"])
        return out.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in ("threads", "t/s") else "---" for h in head) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)

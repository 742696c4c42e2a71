"""Decode speed: awqc artifacts against PyTorch eager float32 and llama.cpp Q4_0 on the same
model, same run.

Each (engine, threads) pair runs in its own process, so thread pools start with the right size.
Batch 1, a 32-token prompt, then 128 greedy tokens; decode tok/s counts the 128 steps only.
llama.cpp runs when `llama-cpp-python` is installed (optional: pip install llama-cpp-python);
its Q4_0 file is made from the default GGUF with llama.cpp's own quantize API.

    python bench/decode.py                       # compiles the default model's float + int4 artifacts
    python bench/decode.py --artifact dist/smollm2-f32 --threads 1 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS = 32, 128


def machine_name() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}"


def prompt_ids(vocab: int) -> list[int]:
    return [(i * 7919) % (vocab - 100) + 50 for i in range(PROMPT_TOKENS)]


def worker_awqc(artifact: str) -> dict:
    from awqc.runtime.engine import Engine

    engine = Engine(artifact)
    ids = prompt_ids(engine.manifest["model"]["vocab_size"])
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits = engine.decode(int(logits.argmax()))
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": NEW_TOKENS / (t2 - t1)}


def worker_torch(threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from awqc.compiler.model_import import default_model_path

    torch.set_num_threads(threads)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size)])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(NEW_TOKENS):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": NEW_TOKENS / (t2 - t1)}


def make_q4_0(out: Path) -> Path:
    """Requantize the default GGUF to Q4_0 with llama.cpp (every tensor, as `--pure` does, so the
    bits per weight compare with awqc's int4 model)."""
    import llama_cpp

    from awqc.compiler.model_import import default_model_path

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.pure = True
    if llama_cpp.llama_model_quantize(str(default_model_path()).encode(), str(out).encode(), params) != 0:
        raise RuntimeError("llama.cpp quantize failed")
    return out


def worker_llamacpp(gguf: str, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    ids = prompt_ids(llm.n_vocab())
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": NEW_TOKENS / (t2 - t1)}


def run_worker(kind: str, threads: int, artifact: str | None) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads)]
    if artifact:
        cmd += ["--artifact", artifact]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


DEFAULT_BUILDS = (("smollm2-f32", []), ("smollm2-rtn-w4g64", ["--quant", "rtn-w4g64", "--quantize-head"]),
                  # W4A8 (x86 with AVX2 or AVX-512 VNNI): int8 activations, as llama.cpp's Q4_0 runs
                  ("smollm2-rtn-w4a8g64", ["--quant", "rtn-w4a8g64", "--quantize-head"]))


def compile_default(tmp: Path, name: str, extra: list[str]) -> str:
    out = tmp / name
    subprocess.run([sys.executable, "-m", "awqc.compiler.cli", "compile", "--model", "default", "--target", "host",
                    "-o", str(out), "--context-window", "512", *extra], check=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", action="append", default=[], help="awqc artifact(s) to time (repeatable)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "torch":
            result = worker_torch(args.threads[0])
        elif args.worker == "llamacpp":
            result = worker_llamacpp(args.artifact[0], args.threads[0])
        else:
            result = worker_awqc(args.artifact[0])
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifact or [compile_default(Path(tmp), name, quant) for name, quant in DEFAULT_BUILDS]
        q4_0 = None
        if importlib.util.find_spec("llama_cpp") is not None:
            q4_0 = str(make_q4_0(Path(tmp) / "smollm2-q4_0.gguf"))
        rows = []
        for threads in args.threads:
            base = run_worker("torch", threads, None)
            rows.append(("PyTorch eager float32", threads, base, 1.0))
            if q4_0:
                r = run_worker("llamacpp", threads, q4_0)
                rows.append(("llama.cpp Q4_0 (pure)", threads, r, r["decode_tok_s"] / base["decode_tok_s"]))
            for art in artifacts:
                r = run_worker("awqc", threads, art)
                rows.append((f"awqc {Path(art).name}", threads, r, r["decode_tok_s"] / base["decode_tok_s"]))
    print(f"\nmachine: {machine_name()}; prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, batch 1\n")
    print("| engine | threads | prefill (ms) | decode tok/s | vs PyTorch eager |")
    print("|---|---|---|---|---|")
    for label, threads, r, ratio in rows:
        print(f"| {label} | {threads} | {r['prefill_s'] * 1e3:.0f} | {r['decode_tok_s']:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

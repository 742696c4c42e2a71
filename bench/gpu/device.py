"""The GPU check itself, run by bench/gpu/run.sh on the device with the payload of prepare.py.

Imports nothing of the compiler: TVM (runtime-only mode) and awqc's runtime come from the payload's
bundle, torch and numpy from the machine. Each part's result is written to OUT/gpu.json as soon as
it is known, so a run cut short still returns what it measured:

  1. correctness: every kernel of kernels/lib.so against numpy (check.npz), and the tiny int4 model
     (bundle/artifact) against the float32 host build of the same weights (tiny.npz)
  2. copy bandwidth: torch's device-to-device copy of 1 GiB (read + write bytes per second)
  3. int4 GEMV (decode) at the timing shapes: GB/s of the bytes it must read, against the copy
  4. int4 GEMM (prefill) at 512 and 2048 rows, SIMT and tensor cores: TFLOP/s against torch's
     matmul in the payload's float dtype on the same shapes
  5. decode tok/s of the 7B-shaped int4 and float16 artifacts (random weights written here) and of
     a torch eager Llama of the same shape (random weights, static KV cache)

Weights are cycled over copies that together exceed the GPU's L2 cache (payload.json's rotate_bytes),
so every timed kernel reads its weights from memory, as in decode.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import struct
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tvm
from awqc.runtime.artifact import MANIFEST, WEIGHTS, read_manifest, write_manifest
from awqc.runtime.engine import Engine

PROMPT = list(range(100, 116))
DECODE_TOKENS = 128
REPEATS = 3


class Check:
    """The device, its torch twin, and the JSON record that grows part by part."""

    def __init__(self, payload: Path, out: Path):
        self.payload, self.out = payload, out
        self.meta = json.loads((payload / "payload.json").read_text())
        self.kind = self.meta["device"]
        self.dev = tvm.device(self.kind)
        self.torch_dev = torch.device("cuda" if self.kind == "cuda" else "cpu")
        self.dtype = self.meta["dtype"]
        self.record: dict[str, Any] = {"format": "awqc-gpu-check/1", "machine": machine(self.kind),
                                       "target": self.meta["target"], "dry_run": self.kind != "cuda"}
        self.work = Path("/tmp/awqc-gpu-check")
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)

    def sync(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()
            self.dev.sync()

    def part(self, name: str, fn: Callable[[], Any]) -> None:
        """Run one part; its result (or its error) goes into the record, which is saved at once."""
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            self.record[name] = fn()
        except Exception as err:  # noqa: BLE001  (one broken part must not lose the others)
            traceback.print_exc()
            self.record[name] = {"error": f"{type(err).__name__}: {err}"}
        self.record.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        (self.out / "gpu.json").write_text(json.dumps(self.record, indent=1))

    def timed(self, calls: list[Callable[[], None]]) -> float:
        """Median seconds per call over REPEATS runs, each cycling through `calls` (one per weight
        copy) until the payload's min_seconds have passed; the first pass is warm-up."""
        min_s = self.meta["min_seconds"]
        for c in calls:
            c()
        self.sync()
        per_call = []
        for _ in range(REPEATS):
            n, start = 0, time.perf_counter()
            while True:
                for c in calls:
                    c()
                n += len(calls)
                self.sync()
                if time.perf_counter() - start >= min_s:
                    break
            per_call.append((time.perf_counter() - start) / n)
        return float(np.median(per_call))


# -- 1. correctness ----------------------------------------------------------------------------
def check_kernels(c: Check) -> dict:
    lib = tvm.runtime.load_module(str(c.payload / "kernels" / "lib.so"))
    data = np.load(c.payload / "kernels" / "check.npz")
    rows, failed = [], 0
    for chk in c.meta["checks"]:
        tag, m = chk["weights"], chk["rows"]
        w = [tvm.runtime.tensor(data[f"{tag}/w{i}"], c.dev) for i in range(3)]
        ref = data[f"{tag}/ref{m}"]
        y = tvm.runtime.tensor(np.zeros(ref.shape, np.float16), c.dev)
        lib[chk["kernel"]](tvm.runtime.tensor(data[f"{tag}/x{m}"], c.dev), *w, y)
        got = y.numpy().astype(np.float64)
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        ok = bool(np.isfinite(got).all() and err < 2e-3)  # fp16 output, fp32 accumulation
        failed += not ok
        rows.append({"kernel": chk["kernel"], "rows": m, "rel_err": err, "ok": ok})
    return {"passed": len(rows) - failed, "failed": failed, "checks": rows}


def check_tiny_model(c: Check) -> dict:
    """The tiny artifact on the device, fed the host build's greedy tokens, against its logits."""
    ref = np.load(c.payload / "tiny.npz")
    engine = Engine(c.payload / "bundle" / "artifact", c.kind)
    prompt, want = [int(t) for t in ref["prompt"]], ref["logits"]
    got = [engine.prefill(prompt)]
    for step in want[:-1]:
        got.append(engine.decode(int(step.argmax())))
    got = np.stack(got).astype(np.float64)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    same = int((got.argmax(-1) == want.argmax(-1)).sum())
    return {"steps": len(want), "rel_err": err, "argmax_equal": same,
            "ok": bool(np.isfinite(got).all() and err < 2e-2 and same == len(want))}


# -- 2-4. kernels ------------------------------------------------------------------------------
def copy_bandwidth(c: Check) -> dict:
    n = (1 << 30) if c.kind == "cuda" else (64 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=c.torch_dev).random_(0, 255)
    b = torch.empty_like(a)
    s = c.timed([lambda: b.copy_(a)])
    return {"bytes": n, "gb_s": 2 * n / s / 1e9}


def random_args(c: Check, k: int, n: int, copies: int) -> tuple[list[list[Any]], int]:
    """`copies` sets of the packed weights (qweight, scales, zeros) of a k x n int4 matrix in the
    shapes and dtypes prepare.py recorded (random bits, finite fp16 scales), and the bytes of one set."""
    rng = np.random.default_rng(k + n)
    specs = c.meta["timing_args"][f"{k}x{n}"]
    sets = []
    for _ in range(copies):
        ws = []
        for shape, dtype in specs:
            if dtype == "float16":
                a = (rng.random(shape, np.float32) * 0.02 + 0.002).astype(np.float16)
            else:
                a = rng.integers(0, 256, math.prod(shape) * np.dtype(dtype).itemsize, dtype=np.uint8)
                a = a.view(dtype).reshape(shape)
            ws.append(tvm.runtime.tensor(a, c.dev))
        sets.append(ws)
    return sets, sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs)


def gemv(c: Check) -> list[dict]:
    lib = tvm.runtime.load_module(str(c.payload / "kernels" / "lib.so"))
    copy = c.record.get("copy_bandwidth", {}).get("gb_s")
    rows = []
    for k, n in c.meta["timing_shapes"]:
        fn = lib[f"gemv_{k}x{n}_g{c.meta['group']}"]
        _, per = random_args(c, k, n, 0)
        sets, _ = random_args(c, k, n, max(2, math.ceil(c.meta["rotate_bytes"] / per)))
        x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, k)).astype(np.float16), c.dev)
        y = tvm.runtime.tensor(np.zeros((1, n), np.float16), c.dev)
        s = c.timed([lambda ws=ws: fn(x, *ws, y) for ws in sets])
        gb_s = (per + 2 * (k + n)) / s / 1e9
        rows.append({"k": k, "n": n, "us": s * 1e6, "gb_s": gb_s, "of_copy": gb_s / copy if copy else None})
    return rows


def gemm(c: Check) -> list[dict]:
    lib = tvm.runtime.load_module(str(c.payload / "kernels" / "lib.so"))
    tdt = getattr(torch, c.dtype)
    rows = []
    for k, n in c.meta["timing_shapes"]:
        sets, _ = random_args(c, k, n, 2)
        w_t = torch.randn(n, k, dtype=tdt, device=c.torch_dev) * 0.02
        for m in c.meta["gemm_rows"]:
            flops = 2 * m * k * n
            xn = np.random.default_rng(m).standard_normal((m, k)).astype(np.float16)
            x, y = tvm.runtime.tensor(xn, c.dev), tvm.runtime.tensor(np.zeros((m, n), np.float16), c.dev)
            row = {"m": m, "k": k, "n": n}
            for kind in ("gemm", "mma"):
                fn = lib[f"{kind}_{k}x{n}_g{c.meta['group']}"]
                row[f"{kind}_tflops"] = flops / c.timed([lambda ws=ws: fn(x, *ws, y) for ws in sets]) / 1e12
            x_t = torch.from_numpy(xn).to(c.torch_dev, tdt)
            row["torch_tflops"] = flops / c.timed([lambda: torch.nn.functional.linear(x_t, w_t)]) / 1e12
            row["mma_of_torch"] = row["mma_tflops"] / row["torch_tflops"]
            rows.append(row)
    return rows


# -- 5. decode ---------------------------------------------------------------------------------
def write_random_weights(art: Path) -> None:
    """art/weights.safetensors with the header prepare.py kept and random contents (finite floats,
    random bits for packed integers), and its hash in the manifest."""
    header_bytes = (art / "weights_header.json").read_bytes()
    header = json.loads(header_bytes)
    rng = np.random.default_rng(0)
    pools = {"F16": (rng.standard_normal(1 << 24, np.float32) * 0.02).astype(np.float16).view(np.uint8),
             "F32": (rng.standard_normal(1 << 23, np.float32) * 0.02).view(np.uint8)}
    bits = rng.integers(0, 256, 1 << 25, dtype=np.uint8)
    digest = hashlib.sha256()
    with open(art / WEIGHTS, "wb") as f:
        for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
            f.write(chunk)
            digest.update(chunk)
        data_start = f.tell()
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if begin > f.tell() - data_start:  # alignment padding
                pad = bytes(begin - (f.tell() - data_start))
                f.write(pad)
                digest.update(pad)
            pool = pools.get(info["dtype"], bits)
            while begin < end:
                piece = memoryview(pool)[: min(end - begin, len(pool))]
                f.write(piece)
                digest.update(piece)
                begin += len(piece)
    (art / "weights_header.json").unlink()
    manifest = read_manifest(art)
    manifest["files"][WEIGHTS] = digest.hexdigest()
    manifest.pop("manifest_sha256")
    write_manifest(art, manifest)


def awqc_decode(c: Check, name: str) -> dict:
    art = c.work / name
    shutil.copytree(c.payload / name, art)
    start = time.perf_counter()
    write_random_weights(art)
    engine = Engine(art, c.kind)
    load_s = time.perf_counter() - start
    rates = []
    for _ in range(REPEATS):
        engine.reset()
        token = int(engine.prefill(PROMPT).argmax())
        c.sync()
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(engine.decode(token).argmax())
        rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    del engine
    shutil.rmtree(art)
    return {"tok_s": float(np.median(rates)), "runs": rates, "write_and_load_s": load_s}


class TorchLlama(torch.nn.Module):
    """Llama in plain torch, eager: the fp16 baseline (random weights, static KV cache)."""

    def __init__(self, cfg: dict, dtype: torch.dtype, device: torch.device, max_len: int):
        super().__init__()
        h, self.heads, self.kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd, inter, self.eps = h // self.heads, cfg["intermediate_size"], cfg["rms_norm_eps"]
        w = lambda *s: torch.randn(*s, dtype=dtype, device=device) * 0.02  # noqa: E731
        self.embed, self.head, self.norm = w(cfg["vocab_size"], h), w(cfg["vocab_size"], h), w(h) + 1
        self.layers = [{"n1": w(h) + 1, "qkv": w((self.heads + 2 * self.kv) * self.hd, h), "o": w(h, h),
                        "n2": w(h) + 1, "gu": w(2 * inter, h), "down": w(h, inter)}
                       for _ in range(cfg["num_hidden_layers"])]
        shape = (1, self.kv, max_len, self.hd)
        self.cache = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                      for _ in self.layers]
        inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, self.hd, 2, device=device).float() / self.hd)
        ang = torch.outer(torch.arange(max_len, device=device).float(), inv)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        a, b = x[..., : self.hd // 2], x[..., self.hd // 2:]
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(start, start + t, device=ids.device)
        x = self.embed[ids]
        for layer, (kc, vc) in zip(self.layers, self.cache):
            q, k, v = torch.nn.functional.linear(self.rms(x, layer["n1"]), layer["qkv"]).split(
                [self.heads * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
            q = self.rope(q.view(1, t, self.heads, self.hd).transpose(1, 2), pos)
            kc[:, :, start:start + t] = self.rope(k.view(1, t, self.kv, self.hd).transpose(1, 2), pos)
            vc[:, :, start:start + t] = v.view(1, t, self.kv, self.hd).transpose(1, 2)
            keys, values = kc[:, :, :start + t], vc[:, :, :start + t]
            if self.kv != self.heads:
                keys, values = (a.repeat_interleave(self.heads // self.kv, 1) for a in (keys, values))
            att = torch.nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=t > 1)
            x = x + torch.nn.functional.linear(att.transpose(1, 2).reshape(1, t, -1), layer["o"])
            g, u = torch.nn.functional.linear(self.rms(x, layer["n2"]), layer["gu"]).chunk(2, -1)
            x = x + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, layer["down"])
        return torch.nn.functional.linear(self.rms(x[:, -1], self.norm), self.head)


def torch_decode(c: Check) -> dict:
    cfg = c.meta["model_config"]
    model = TorchLlama(cfg, getattr(torch, c.dtype), c.torch_dev, len(PROMPT) + DECODE_TOKENS + 1)
    rates = []
    for _ in range(REPEATS):
        ids = torch.tensor([PROMPT], device=c.torch_dev)
        token = model(ids, 0).argmax(-1, keepdim=True)
        c.sync()
        t0 = time.perf_counter()
        for i in range(DECODE_TOKENS):
            token = model(token, len(PROMPT) + i).argmax(-1, keepdim=True)
            int(token)  # the sampled token reaches the host each step, as in awqc's engine
        rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    del model
    if c.kind == "cuda":
        torch.cuda.empty_cache()
    return {"tok_s": float(np.median(rates)), "runs": rates}


def decode(c: Check) -> dict:
    result = {"shape": c.meta["models"][0]["shape"], "prompt": len(PROMPT), "tokens": DECODE_TOKENS,
              "torch_eager": torch_decode(c)}
    for m in c.meta["models"]:
        result[m["dir"]] = awqc_decode(c, m["dir"])
    w4, f16, eager = (result[k]["tok_s"] for k in ("llama7b-w4", "llama7b-f16", "torch_eager"))
    result["w4_of_torch"], result["w4_of_awqc_f16"] = w4 / eager, w4 / f16
    return result


# -- report ------------------------------------------------------------------------------------
def machine(kind: str) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "tvm": tvm.__version__, "cpu": platform.processor() or platform.machine()}
    if kind == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        if shutil.which("nvidia-smi"):  # the driver version; torch knows only its own CUDA's
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip()
        info["cuda_torch"] = torch.version.cuda
    return info


def markdown(r: dict) -> str:
    lines = [f"# awqc GPU check — {r['machine'].get('gpu', 'CPU dry run')}, {r['machine']['date']}", ""]

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    def table(title: str, rows: list[dict]) -> None:
        if isinstance(rows, dict) and "error" in rows:
            lines.extend([f"## {title}", "", f"error: {rows['error']}", ""])
            return
        keys = list(rows[0])
        lines.extend([f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)])
        lines.extend("| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows)
        lines.append("")

    k = r.get("kernel_correctness", {})
    lines.append(f"correctness: kernels {k.get('passed')} passed, {k.get('failed')} failed; tiny model "
                 f"{r.get('tiny_model')}")
    lines.append(f"copy bandwidth: {r.get('copy_bandwidth')}\n")
    table("int4 GEMV (decode)", r.get("gemv", [{"-": "-"}]))
    table("int4 GEMM (prefill), TFLOP/s", r.get("gemm", [{"-": "-"}]))
    d = r.get("decode", {})
    if "error" in d or not d:
        lines.append(f"decode: {d}")
    else:
        table(f"decode, {d['shape']} shape, tok/s", [{"engine": e, "tok_s": d[e]["tok_s"]}
                                                      for e in ("llama7b-w4", "llama7b-f16", "torch_eager")])
        lines.append(f"int4 / torch eager: {d['w4_of_torch']:.2f}x; int4 / awqc float16: {d['w4_of_awqc_f16']:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> int:
    payload, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    c = Check(payload, out)
    c.part("kernel_correctness", lambda: check_kernels(c))
    c.part("tiny_model", lambda: check_tiny_model(c))
    c.part("copy_bandwidth", lambda: copy_bandwidth(c))
    c.part("gemv", lambda: gemv(c))
    c.part("gemm", lambda: gemm(c))
    c.part("decode", lambda: decode(c))
    (out / "gpu.md").write_text(markdown(c.record))
    print((out / "gpu.md").read_text())
    shutil.rmtree(c.work, ignore_errors=True)
    bad = [p for p in ("kernel_correctness", "tiny_model") if c.record[p].get("failed") or c.record[p].get("error")
           or c.record[p].get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Knobs of the CPU int4 kernels, chosen by measuring them: records, defaults and the search.

A record (schedules/records/<target>.json) holds, for one target and one TVM version:
  * the packing layout (lanes x rows per tile, schedules/layouts.py), one per target because
    the weights of an artifact are packed once;
  * per weight shape "KxN": the GEMV knobs and the GEMM knobs (schedules/w4_cpu.py);
  * what was measured (ms, GB/s / GFLOP/s) and on which machine, for reference.
`awqc tune --target T` writes it; `awqc compile` reads it when present and uses the defaults
below otherwise (for a shape the record lacks, too). A record written for another target or
another TVM version is refused with a message naming the fix.

The search measures on this machine, so it only runs targets this machine can execute.
Layout: every candidate (lanes, rows) is timed on the GEMV of every shape, weights rotating
over copies bigger than the LLC (as in a decode step), and the one with the least total time
per token (each shape weighted by how often a token uses it) wins. Then, per shape, the GEMV
unroll knob and the GEMM knobs by coordinate descent (one knob at a time, best kept).
Candidates are raced (compiled first, then timed in interleaved rounds, best time each), and
a challenger replaces the incumbent (the defaults first) only if it is 5% faster: on a shared
machine smaller differences are noise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import tvm

from .layouts import DotLayout, InterleavedLayout, Layout, get_layout
from .w4_cpu import GemmKnobs, GemvKnobs, cpu_scheduler
from .w4a8_cpu import dot_isa, dot_scheduler

RECORD_FORMAT = "awqc-w4-tuning/1"
RECORDS_DIR = Path(__file__).resolve().parent / "records"
# Target attributes that change the generated code; "num-cores" does not (threads are chosen
# at run time), so a record stays valid for a host with another core count.
_CODEGEN_KEYS = ("kind", "mtriple", "mcpu", "mattr")


class TuningRecordError(ValueError):
    """A tuning record that does not belong to this target or TVM version, or is damaged."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One linear layer's weight [N, K] and how many times a decode step runs it."""
    k: int
    n: int
    per_token: int = 1

    @property
    def key(self) -> str:
        return f"{self.k}x{self.n}"


# SmolLM2-135M (the default model): fused qkv, o_proj, fused gate_up, down (30 layers each), LM head.
SHAPE_SETS: dict[str, list[Shape]] = {
    "default": [Shape(576, 960, 30), Shape(576, 576, 30), Shape(576, 3072, 30), Shape(1536, 576, 30),
                Shape(576, 49152, 1)],
    "llama7b": [Shape(4096, 4096, 64), Shape(4096, 11008, 64), Shape(11008, 4096, 32)],
    "tiny": [Shape(256, 128)],  # tests: seconds, not minutes
}


def parse_shapes(text: str) -> list[Shape]:
    """A named shape set, or 'KxN[,KxN...]' (each used once per token)."""
    if text in SHAPE_SETS:
        return SHAPE_SETS[text]
    shapes = []
    for item in text.split(","):
        k, sep, n = item.strip().partition("x")
        if not (sep and k.isdigit() and n.isdigit()):
            raise ValueError(f"cannot parse shape {item!r} in --shapes {text!r}; use a named set "
                             f"({', '.join(SHAPE_SETS)}) or KxN[,KxN...], e.g. 4096x11008")
        shapes.append(Shape(int(k), int(n)))
    return shapes


@dataclasses.dataclass
class TuningRecord:
    target: str  # record name (see record_name)
    tvm_target: dict[str, Any]
    tvm_version: str
    layout: str
    gemv: dict[str, GemvKnobs] = dataclasses.field(default_factory=dict)
    gemm: dict[str, GemmKnobs] = dataclasses.field(default_factory=dict)
    machine: str = ""
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)

    def gemv_knobs(self, k: int, n: int) -> GemvKnobs:
        return self.gemv.get(f"{k}x{n}", GemvKnobs())

    def gemm_knobs(self, k: int, n: int) -> GemmKnobs:
        return self.gemm.get(f"{k}x{n}", GemmKnobs())

    def to_json(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "target": self.target, "tvm_target": self.tvm_target,
                "tvm_version": self.tvm_version, "machine": self.machine, "layout": self.layout,
                "gemv": {k: dataclasses.asdict(v) for k, v in self.gemv.items()},
                "gemm": {k: dataclasses.asdict(v) for k, v in self.gemm.items()},
                "measured": self.measured}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "TuningRecord":
        if data.get("format") != RECORD_FORMAT:
            raise TuningRecordError(f"{where} is not an awqc tuning record (format {data.get('format')!r}, "
                                    f"expected {RECORD_FORMAT!r}); re-run `awqc tune`")
        try:
            get_layout(data["layout"])
            return cls(data["target"], data["tvm_target"], data["tvm_version"], data["layout"],
                       {k: GemvKnobs(**v) for k, v in data.get("gemv", {}).items()},
                       {k: GemmKnobs(**v) for k, v in data.get("gemm", {}).items()},
                       data.get("machine", ""), data.get("measured", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise TuningRecordError(f"{where} is damaged ({err}); re-run `awqc tune`") from None


# --- records on disk -----------------------------------------------------------------------------
def record_name(spec) -> str:
    """The record's name for a TargetSpec: its short name, except that `host` is named after
    the ISA it resolved to (host-x86-64-v4+avx512vnni, host-aarch64+neon+dotprod), so a record
    tuned on one machine is never taken for another kind of host."""
    if spec.name != "host":
        return spec.name
    t = spec.tvm_target
    return "host-" + "+".join([t.get("mcpu") or spec.arch, *(a.lstrip("+") for a in t.get("mattr", []))])


def record_path(spec, records_dir: Path | None = None) -> Path:
    return (records_dir or RECORDS_DIR) / f"{record_name(spec)}.json"


def _codegen_attrs(tvm_target: dict[str, Any]) -> dict[str, Any]:
    return {k: tvm_target[k] for k in _CODEGEN_KEYS if k in tvm_target}


def check_record(record: TuningRecord, spec, where: str) -> None:
    """Refuse a record for another target or TVM version."""
    name = record_name(spec)
    if record.target != name or _codegen_attrs(record.tvm_target) != _codegen_attrs(spec.tvm_target):
        raise TuningRecordError(
            f"{where} was tuned for target {record.target} ({json.dumps(_codegen_attrs(record.tvm_target))}), "
            f"not for {name} ({json.dumps(_codegen_attrs(spec.tvm_target))}); re-run `awqc tune --target "
            f"{spec.name}` or remove the file")
    if record.tvm_version != tvm.__version__:
        raise TuningRecordError(
            f"{where} was tuned with TVM {record.tvm_version}, but this is TVM {tvm.__version__}; kernels "
            f"and timings change between versions, so re-run `awqc tune --target {spec.name}` or remove the file")


def load_record(spec, path: Path | None = None) -> TuningRecord | None:
    """The record for `spec` (from `path`, default schedules/records/<name>.json); None if there
    is none; TuningRecordError if it is for another target or TVM version, or damaged."""
    path = path or record_path(spec)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TuningRecordError(f"{path} is not valid JSON ({err}); re-run `awqc tune`") from None
    record = TuningRecord.from_json(data, str(path))
    check_record(record, spec, str(path))
    return record


def save_record(record: TuningRecord, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written record
    return path


def default_layout(spec) -> InterleavedLayout:
    """Without a record: x86 8 lanes (one 256-bit AVX2 load) and 8-row tiles (8 independent FMA
    chains); NEON 4 lanes (one 128-bit register) and 4-row tiles, the widest whose inner loop
    compiles without spilling (i8r4 spills to the stack)."""
    return InterleavedLayout(8, 8) if spec.arch == "x86_64" else InterleavedLayout(4, 4)


def default_record(spec) -> TuningRecord:
    return TuningRecord(record_name(spec), spec.tvm_target, tvm.__version__, default_layout(spec).name)


def record_for(spec) -> TuningRecord:
    """What a build uses: the target's record if one exists (checked), else the defaults."""
    return load_record(spec) or default_record(spec)


# --- measuring -----------------------------------------------------------------------------------
LLC_BYTES = 32 << 20  # rotate weight copies over at least 2x this, so they come from DRAM
REPEATS = 5  # best of: the machine may be shared, the minimum is the least disturbed run


def machine_name() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(("model name", "Model"))), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}"


def compile_kernel(spec, layout: Layout, k: int, n: int, group: int, rows: int | None,
                   gemv: GemvKnobs | None = None, gemm: GemmKnobs | None = None, dtype: str = "float32"):
    """One scheduled int4 kernel, built for `spec`, as a callable (x, qweight, scales, zeros, y)."""
    if isinstance(layout, DotLayout):  # W4A8: the dot-product kernels of the target's ISA (no knobs)
        schedule = dot_scheduler(layout, dot_isa(spec.tvm_target))
    else:
        schedule = cpu_scheduler(layout, (lambda *_: gemv) if gemv else None, (lambda *_: gemm) if gemm else None)
    func = schedule(layout.kernel(k, n, group, dtype, rows), group, rows).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=spec.target())["main"]


def random_weights(layout: Layout, k: int, n: int, group: int, copies: int,
                   seed: int = 0) -> list[list[tvm.runtime.Tensor]]:
    """`copies` independent packed weights (qweight, scales, zeros) on the CPU."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(copies):
        q = rng.integers(0, 16, (n, k), dtype=np.uint8)
        s = (rng.random((n, k // group)) * 0.02 + 0.001).astype(np.float16)
        z = rng.integers(0, 16, (n, k // group))
        out.append([tvm.runtime.tensor(a) for a in layout.pack(q, s, z)])
    return out


def packed_bytes(k: int, n: int, group: int) -> int:
    """Bytes one call reads from the weights: int4 values + float16 scales + 4-bit zeros."""
    return n * k // 2 + n * (k // group) * 2 + n * (k // group) // 2


def cold_copies(k: int, n: int, group: int, floor: int = 2 * LLC_BYTES, most: int = 256) -> int:
    """Copies of a weight to rotate over so that together they exceed `floor` bytes (at most
    `most`: tiny test shapes would need thousands)."""
    return max(2, min(most, -(-floor // packed_bytes(k, n, group))))


def time_calls(fn: Callable[[int], None], calls: int, repeats: int = REPEATS) -> float:
    """Best mean seconds per call of fn(i) over `repeats` runs of `calls` calls (after a warm-up)."""
    for i in range(calls):
        fn(i)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def time_gemv(kernel, weights: list[list[tvm.runtime.Tensor]], k: int, n: int, repeats: int = REPEATS) -> float:
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, k)).astype("float32"))
    y = tvm.runtime.tensor(np.zeros((1, n), "float32"))
    return time_calls(lambda i: kernel(x, *weights[i % len(weights)], y), len(weights), repeats)


def time_gemm(kernel, weights: list[tvm.runtime.Tensor], k: int, n: int, m: int, repeats: int = REPEATS) -> float:
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((m, k)).astype("float32"))
    y = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    return time_calls(lambda i: kernel(x, *weights, y), 1, repeats)


# --- search --------------------------------------------------------------------------------------
GEMM_ROWS = 64  # prefill rows the GEMM knobs are timed at
GEMM_SPACE = {"mr": (2, 4, 6, 8), "nr": (1, 2, 3, 4), "block_rows": (12, 24, 48, 96), "lanes": (8, 16)}
GEMM_SPACE_QUICK = {"mr": (4, 6), "nr": (2, 3)}


def check_tunable(spec) -> None:
    """Tuning runs the kernels: the target must be a CPU this machine can execute."""
    if spec.device != "cpu" or spec.arch != platform.machine():
        raise ValueError(f"awqc tune times kernels on this machine ({platform.machine()}), which cannot run "
                         f"target {spec.name} ({spec.arch}, {spec.device}); run `awqc tune` on the device itself")
    mcpu = spec.tvm_target.get("mcpu", "")
    if mcpu == "x86-64-v4" and not _has_avx512():
        raise ValueError(f"target {spec.name} needs AVX-512, which this CPU does not report; tune it on one that does")


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


def layout_candidates(spec, shapes: Iterable[Shape], group: int, quick: bool = False) -> list[InterleavedLayout]:
    """Layouts worth timing for the target that hold every shape."""
    wide = spec.arch == "x86_64" and spec.tvm_target.get("mcpu") == "x86-64-v4"
    lanes = (8, 16) if wide else (4, 8) if spec.arch == "aarch64" else (8,)
    rows = (4, 8) if quick else (1, 2, 4, 8, 16)
    shapes = list(shapes)
    return [lay for lay in (InterleavedLayout(lanes_, r) for lanes_ in lanes for r in rows)
            if all(lay.supports(s.k, s.n, group) for s in shapes)]


ROUNDS = 5  # a race times every candidate once per round, interleaved; each keeps its best
MARGIN = 0.05  # a challenger must beat the incumbent by this fraction to replace it (noise guard)


def tune(spec, shapes: list[Shape], group: int = 64, quick: bool = False,
         progress: Callable[[int], Any] | None = None) -> TuningRecord:
    """Search the layout and per-shape knobs for `spec` on this machine; a new TuningRecord.
    `progress(total)` makes a progress bar (e.g. tqdm) advanced once per compiled candidate.

    Candidates are compared in races: all are compiled first, then timed in turn, round after
    round, each keeping its best time. On a shared machine a slow spell then hits every
    candidate alike instead of condemning whichever was being timed."""
    check_tunable(spec)
    record = default_record(spec)
    record.machine, record.measured = machine_name(), {"group": group, "gemm_rows": GEMM_ROWS,
                                                       "threads": os.environ.get("TVM_NUM_THREADS", "default")}
    candidates = layout_candidates(spec, shapes, group, quick)
    if not candidates:
        raise ValueError(f"no interleaved layout holds every shape {[s.key for s in shapes]} with group {group}")
    gemm_space = _gemm_space(spec, quick)
    passes = 1 if quick else 2
    # one tick per compiled candidate (an upper bound: a raced value may repeat the current best)
    total = len(shapes) * (len(candidates) + 2 + passes * sum(len(v) + 1 for v in gemm_space.values()))
    bar = progress(total) if progress else None
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)

    # 1. the layout: least GEMV time per token over all shapes
    per_token = dict.fromkeys((lay.name for lay in candidates), 0.0)
    for s in shapes:
        race = {lay.name: _gemv_timer(spec, lay, s, group, GemvKnobs(), tick) for lay in candidates}
        for name, ms in _race(race).items():
            per_token[name] += s.per_token * ms
    default = default_layout(spec).name
    record.layout = _pick(per_token, default if default in per_token else min(per_token, key=per_token.get))
    layout = get_layout(record.layout)
    record.measured["layout_ms_per_token"] = {k: round(v, 4) for k, v in per_token.items()}

    # 2. per shape: the GEMV unroll knob (against the default, raced again), then the GEMM knobs
    record.measured["gemv"], record.measured["gemm"] = {}, {}
    for s in shapes:
        race = {u: _gemv_timer(spec, layout, s, group, GemvKnobs(u), tick) for u in (True, False)}
        ms_by_unroll = _race(race)
        unroll = _pick(ms_by_unroll, GemvKnobs().unroll_steps)
        record.gemv[s.key] = GemvKnobs(unroll)
        ms = ms_by_unroll[unroll]
        record.measured["gemv"][s.key] = {"ms": round(ms, 4),
                                          "GBps": round(packed_bytes(s.k, s.n, group) / ms / 1e6, 2)}
        knobs, ms = _search_gemm(spec, layout, s, group, gemm_space, passes, tick)
        record.gemm[s.key] = knobs
        record.measured["gemm"][s.key] = {"ms": round(ms, 4),
                                          "GFLOPs": round(2 * GEMM_ROWS * s.k * s.n / ms / 1e6, 1)}
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    return record


def _gemm_space(spec, quick: bool) -> dict[str, tuple[int, ...]]:
    if quick:
        return GEMM_SPACE_QUICK
    wide = spec.tvm_target.get("mcpu") == "x86-64-v4"  # 16 float lanes only with AVX-512
    return {k: tuple(v for v in vals if k != "lanes" or v <= (16 if wide else 8)) for k, vals in GEMM_SPACE.items()}


Timer = Callable[[], float]  # one measurement, in ms


def _race(timers: dict[Any, Timer], rounds: int = ROUNDS) -> dict[Any, float]:
    """Best ms of each timer over `rounds` interleaved rounds."""
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(rounds):
        for key, timer in timers.items():
            best[key] = min(best[key], timer())
    return best


def _pick(times: dict[Any, float], incumbent: Any, margin: float = MARGIN) -> Any:
    """The fastest candidate if it beats `incumbent` by `margin`, else the incumbent: on a
    shared machine a few percent is noise, and the defaults were chosen for a reason."""
    fastest = min(times, key=times.get)
    return fastest if times[fastest] < (1 - margin) * times[incumbent] else incumbent


def _gemv_timer(spec, layout: Layout, s: Shape, group: int, knobs: GemvKnobs, tick: Callable) -> Timer:
    """Compile the GEMV and make its cold weights now; the timer runs one pass over the copies."""
    kernel = compile_kernel(spec, layout, s.k, s.n, group, 1, gemv=knobs)
    weights = random_weights(layout, s.k, s.n, group, cold_copies(s.k, s.n, group))
    tick()
    return lambda: time_gemv(kernel, weights, s.k, s.n, repeats=1) * 1e3


def _gemm_timer(spec, layout: Layout, s: Shape, group: int, knobs: GemmKnobs, weights: list, tick: Callable) -> Timer:
    kernel = compile_kernel(spec, layout, s.k, s.n, group, None, gemm=knobs)
    tick()
    return lambda: time_gemm(kernel, weights, s.k, s.n, GEMM_ROWS, repeats=1) * 1e3


def _search_gemm(spec, layout: Layout, s: Shape, group: int, space: dict[str, tuple[int, ...]], passes: int,
                 tick: Callable) -> tuple[GemmKnobs, float]:
    """Coordinate descent from the defaults: each knob in turn, its values raced (the current
    best among them), the winner kept."""
    weights = random_weights(layout, s.k, s.n, group, 1)[0]
    best, best_ms = GemmKnobs(), float("inf")
    for _ in range(passes):
        for name, values in space.items():
            variants = {dataclasses.replace(best, **{name: v}) for v in values} | {best}
            times = _race({knobs: _gemm_timer(spec, layout, s, group, knobs, weights, tick) for knobs in variants})
            best = _pick(times, best)
            best_ms = times[best]
    return best, best_ms

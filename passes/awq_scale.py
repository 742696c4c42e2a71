"""AWQ activation-aware scaling as a compiler pass: find the scaling groups in the Relax graph,
search one scale vector per group on calibration statistics, fold it into the weights.

**Groups come from the graph.** A *producer* is an `rms_norm`/`layer_norm` whose weight is a
parameter, or a linear layer `matmul(x, permute_dims(W)) (+ b)`. Its output channels are traced
forward through operations that keep each channel separate and are linear (degree 1) in it:

* reshape / astype that keep the feature part (the dims after the token dims) in row-major order;
* split / strided_slice / concat along a feature axis;
* multiply or divide by a tensor that does not carry traced channels (`silu(gate) * up` is linear
  in `up`; the `gate` channels went through silu and are not);
* the paged KV cache's `attention_with_fused_qkv`: its output is linear in the value channels
  (head j of the values feeds query heads j*g .. j*g+g-1 under grouped-query attention), while the
  query and key channels go through the softmax.

A channel that reaches a linear layer `matmul(., permute_dims(W'))` is compensated there (column of
W' times s); a channel that reaches anything else (silu, softmax, a residual add, the function's
return value, a weight shared by two layers) is *dead* and keeps s = 1. The group is the producer's
live channels and the consumers they reach. So a norm feeding q/k/v (fused or not), v → o through
attention (scales tied per KV head), and up → down through the gated product are found whatever
the modules are called, and a producer that is not linear in the channel is left alone.

**Search.** For a group with consumers W_c [N_c, K_c] (input Gram G_c = mean x xᵀ from calibration),
scales s = s_x^α / s_w^(1-α) (AutoAWQ's default "duo" scaling; s_x: mean |x| per channel, s_w: mean
|w| relative to its quantization group's max; normalized by sqrt(max·min)) for α = 0, 1/20 .. 19/20,
and the loss is the consumers' output error under quantization, computed exactly from the Gram:
Σ_c sum((E_c @ G_c) * E_c) with E_c = Q(W_c·diag(s_c))·diag(1/s_c) − W_c. With `duo=False` (the
paper's s = s_x^α) α = 0 is round-to-nearest, so those scales never do worse than RTN on the
calibration data; with duo, as in AutoAWQ, only the grid is compared.

**Apply.** Consumer columns × s, producer ÷ s (norm weight and bias, or the producer linear's output
rows and their bias entries; a norm that scales by `w + c`, as Gemma's `1 + w`, gets
w' = (w + c) / s − c). In float the model's output is unchanged.

Differences from the reference (llm-awq `auto_scale.py`, AutoAWQ `_search_best_scale`), which
measures each group's loss by running a module on cached activations:

* By default the loss for a norm → q/k/v (or → gate/up) group is the error of the consumers' own
  outputs, not of the whole attention (or MLP) block output; for v → o and up → down both use the
  consumer output, as here. One float forward pass then suffices (scaling preserves float
  outputs), and the Gram gives the loss over all calibration tokens in O(N·K²) per α, independent
  of the token count. `search_scales(output_loss=...)` takes the reference's loss instead where
  the caller can run what a group feeds (compiler/calibrate.BlockProbe: the block's attention or
  MLP on a few samples, with the consumers' effective weights Q(W·diag(s))·diag(1/s)).
* Past `SEARCH_MACS` multiply-adds per loss (7B-sized layers), the loss is measured on a seeded
  sample of each consumer's output rows, so a 7B search takes minutes on a CPU, not hours; the
  references measure every row on a GPU. The α grid is compared on the same rows.
* v → o is also scaled under grouped-query attention (scales tied per KV head); llm-awq skips it
  when v_proj and o_proj shapes differ.
* awqc's quantizer (passes/quantizer.py) clamps each group's range to include 0; the reference's
  does not. The scale normalization and the α grid are the reference's.
* Both references compute all of a block's scales from the unscaled weights and then apply them;
  so does this pass (row scaling of a producer that is also a consumer commutes with quantization).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
import tvm
from tvm import relax

from .dataflow import ADD, Graph, Linear, op_name, operands, static_shape
from .quantizer import QuantScheme, group_params

T = TypeVar("T")
ATTENTION_FUSED_QKV = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
NORMS = ("relax.nn.rms_norm", "relax.nn.layer_norm")
N_GRID = 20


class NonFiniteError(ValueError):
    """A weight or activation holds NaN or inf; the message names it."""


# ============================================================================ channel tracing
@dataclasses.dataclass
class Trace:
    """Where one producer's output channels go."""

    n_channels: int
    consumers: dict[str, np.ndarray]  # weight -> producer channel of each input column (-1: none)
    dead: np.ndarray  # bool [C]: reaches something scaling cannot compensate
    qk: np.ndarray  # bool [C]: feeds attention queries or keys
    killed_by: np.ndarray  # object [C]: for a dead channel, the first operation it reached that killed it


def _feature_shape(shape: Sequence[int | None]) -> tuple[int, ...] | None:
    """The dims after the token dims (those up to the last symbolic one; the last dim alone when
    every dim is static). None when a feature dim is symbolic."""
    last_sym = max((i for i, d in enumerate(shape) if d is None), default=len(shape) - 2)
    feat = shape[last_sym + 1:]
    return tuple(feat) if feat and all(d is not None for d in feat) else None


def _features(var: relax.Expr) -> tuple[int, ...] | None:
    shape = static_shape(var)
    return None if shape is None else _feature_shape(shape)


def _token_dims(var: relax.Expr) -> int | None:
    shape, feat = static_shape(var), _features(var)
    return None if shape is None or feat is None else len(shape) - len(feat)


def _ints(expr) -> list[int] | None:
    """Static integers of an attribute or argument (IntImm, prim values, tuples or arrays of them)."""
    if expr is None:
        return None
    if isinstance(expr, int):
        return [expr]
    if isinstance(expr, relax.Tuple):
        expr = list(expr.fields)
    value = getattr(expr, "value", None)
    if isinstance(value, int):
        return [int(value)]
    if hasattr(expr, "__iter__") and not isinstance(expr, (str, bytes)):
        out = [_ints(e) for e in expr]
        return None if any(o is None or len(o) != 1 for o in out) else [o[0] for o in out]
    return None


class _Tracer:
    """Propagates producer channels through the graph in binding (topological) order."""

    def __init__(self, graph: Graph, start: relax.Var, n_channels: int):
        self.g = graph
        feat = _features(start)
        self.src: dict[relax.Var, object] = {start: np.arange(n_channels).reshape(feat)}
        self.dead = np.zeros(n_channels, bool)
        self.killed_by = np.full(n_channels, "", dtype=object)
        self.qk = np.zeros(n_channels, bool)
        self.consumers: dict[str, np.ndarray] = {}
        self.start = start

    def run(self) -> Trace:
        for b in self.g.bindings[self.g.position[self.start] + 1:]:
            tracked = [v for v in dict.fromkeys(operands(b.value)) if v in self.src]
            if tracked:
                out = self._rule(b.var, b.value, tracked)
                if out is not None:
                    self.src[b.var] = out
        for v in self.g.returned:
            if v in self.src:
                self._kill(self.src[v], "the function's output")
        return Trace(len(self.dead), self.consumers, self.dead, self.qk, self.killed_by)

    def _kill(self, src, why: str) -> None:
        for s in (src if isinstance(src, list) else [src]):
            s = np.asarray(s).ravel()
            s = s[s >= 0]
            fresh = s[~self.dead[s]]
            self.killed_by[fresh] = why
            self.dead[s] = True

    def _live(self, v: relax.Expr) -> bool:
        s = self.src.get(v) if isinstance(v, relax.Var) else None
        return s is not None and not isinstance(s, list) and bool((s >= 0).any())

    def _rule(self, var: relax.Var, value: relax.Expr, tracked: list[relax.Var]):
        name = op_name(value)
        handler = _RULES.get(name) if name else None
        if isinstance(value, relax.TupleGetItem):
            handler = _tuple_get_item
        out = handler(self, var, value) if handler else None
        if out is _CONSUMED:
            return None
        if out is None:  # not a channel-wise linear op: every traced channel it reads is dead
            for v in tracked:
                self._kill(self.src[v], name or type(value).__name__)
        return out


# -- per-op rules: return the output's channel map, or None (inputs die) ---------------------------
def _same_features(t: _Tracer, var: relax.Var, value: relax.Call):
    x = value.args[0]
    src, feat = t.src.get(x), _features(var)
    if isinstance(src, np.ndarray) and feat is not None and math.prod(feat) == src.size:
        return src.reshape(feat)  # row-major order of the feature dims is kept
    return None


def _split(t: _Tracer, var: relax.Var, value: relax.Call):
    x = value.args[0]
    src, ntok = t.src.get(x), _token_dims(x)
    if not isinstance(src, np.ndarray) or ntok is None:
        return None
    axis = int(value.attrs.axis) % (ntok + src.ndim)
    n_out = len(var.ty.fields)
    if axis < ntok:
        return [src] * n_out
    ios = value.attrs.indices_or_sections
    sections = _ints(ios)
    parts = np.split(src, sections[0] if hasattr(ios, "value") else sections, axis=axis - ntok)
    return parts if len(parts) == n_out else None


def _tuple_get_item(t: _Tracer, var: relax.Var, value: relax.TupleGetItem):
    src = t.src.get(value.tuple_value)
    return src[int(value.index)] if isinstance(src, list) else None


def _strided_slice(t: _Tracer, var: relax.Var, value: relax.Call):
    x = value.args[0]
    src, ntok = t.src.get(x), _token_dims(x)
    if not isinstance(src, np.ndarray) or ntok is None or len(value.args) < 4:
        return None
    axes, begin, end = (_ints(a) for a in value.args[1:4])
    strides = _ints(value.args[4]) if len(value.args) > 4 else None
    if axes is None or begin is None or end is None:
        return None
    index: list[slice] = [slice(None)] * src.ndim
    for i, ax in enumerate(axes):
        ax %= ntok + src.ndim
        if ax < ntok:
            return None  # slicing tokens is fine, but rare; keep the rule set small
        index[ax - ntok] = slice(begin[i], end[i], strides[i] if strides else 1)
    out = src[tuple(index)]
    return out if _features(var) == out.shape else None


def _concat(t: _Tracer, var: relax.Var, value: relax.Call):
    fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else None
    ntok = _token_dims(var)
    if fields is None or ntok is None:
        return None
    axis = int(value.attrs.axis) % (ntok + len(_features(var)))
    if axis < ntok:
        return None
    parts = []
    for f in fields:
        src = t.src.get(f) if isinstance(f, relax.Var) else None
        feat = _features(f)
        if src is None and feat is not None:
            src = np.full(feat, -1)
        if not isinstance(src, np.ndarray):
            return None
        parts.append(src)
    return np.concatenate(parts, axis=axis - ntok)


def _scale_by_other(t: _Tracer, var: relax.Var, value: relax.Call, both_sides: bool):
    a, b = value.args[0], value.args[1]
    live_a, live_b = t._live(a), t._live(b)
    if live_a == live_b or (live_b and not both_sides):
        return None  # degree 2 in the channels (or dividing by them)
    x = a if live_a else b
    src = t.src[x]
    return src if _features(var) == src.shape else None  # broadcasting a traced operand copies channels


def _multiply(t, var, value):
    return _scale_by_other(t, var, value, both_sides=True)


def _divide(t, var, value):
    return _scale_by_other(t, var, value, both_sides=False)


def _matmul(t: _Tracer, var: relax.Var, value: relax.Call):
    weight = t.g.weight_of_matmul(value)
    x, wt = value.args[0], value.args[1]
    src = t.src.get(x)
    if (weight is None or not isinstance(src, np.ndarray) or src.ndim != 1 or wt in t.src
            or t.g.param_uses(weight) != 1 or len(t.g.users(wt)) != 1):
        return None
    t.consumers[weight] = src.copy()
    return _CONSUMED


def _attention_fused_qkv(t: _Tracer, var: relax.Var, value: relax.Call):
    qkv = value.args[1].fields[3]
    src, out_feat = t.src.get(qkv), _features(var)
    if not isinstance(src, np.ndarray) or src.ndim != 2 or out_feat is None or len(out_feat) != 2:
        return None
    n_heads, n_q = src.shape[0], out_feat[0]
    n_kv = (n_heads - n_q) // 2
    if n_kv < 1 or n_q + 2 * n_kv != n_heads or n_q % n_kv or out_feat[1] != src.shape[1]:
        return None
    qk = src[:n_q + n_kv].ravel()
    t.qk[qk[qk >= 0]] = True
    t._kill(src[:n_q + n_kv], "attention's softmax (queries and keys)")
    v = src[n_q + n_kv:]
    return v[np.arange(n_q) // (n_q // n_kv)]  # query head h reads value head h // g


# Returned by a rule that handled its op and whose output carries no traced channel (a consumer
# matmul: it compensates the channels it reads).
_CONSUMED = object()

_RULES: dict[str, Callable] = {
    "relax.reshape": _same_features,
    "relax.astype": _same_features,
    "relax.split": _split,
    "relax.strided_slice": _strided_slice,
    "relax.concat": _concat,
    "relax.multiply": _multiply,
    "relax.divide": _divide,
    "relax.matmul": _matmul,
    ATTENTION_FUSED_QKV: _attention_fused_qkv,
}


# ============================================================================ groups
@dataclasses.dataclass
class Consumer:
    weight: str
    columns: np.ndarray  # [K]: index into the group's `channels` for scaled columns, -1 otherwise


@dataclasses.dataclass
class ScalingGroup:
    producer: str  # norm weight or producer linear weight (parameter names)
    kind: str  # "norm" | "linear"
    extra: tuple[str, ...]  # scaled with the producer: the linear's bias, the layer norm's bias
    channels: np.ndarray  # producer output channels scaled together (norm entries / weight rows)
    consumers: list[Consumer]
    offset: float = 0.0  # a norm that scales by (offset + w), as Gemma's (1 + w)

    def describe(self) -> str:
        return (f"{self.producer} [{len(self.channels)} ch] -> "
                f"{', '.join(c.weight for c in self.consumers)}")


@dataclasses.dataclass
class Producer:
    weight: str
    kind: str
    extra: tuple[str, ...]
    output: relax.Var
    n_channels: int
    offset: float = 0.0


def find_producers(graph: Graph) -> list[Producer]:
    """Norms over the last axis with parameter weights, and linear layers, whose parameters are
    used nowhere else (a shared weight cannot absorb one group's scales)."""
    out = []
    for b in graph.bindings:
        if op_name(b.value) in NORMS:
            p = _norm_producer(graph, b.var, b.value)
            if p is not None:
                out.append(p)
        elif b.var in graph.linear_of_matmul:
            lin: Linear = graph.linear_of_matmul[b.var]
            params = [lin.weight] + ([lin.bias] if lin.bias else [])
            shape = static_shape(lin.output)
            if all(graph.param_uses(p) == 1 for p in params) and shape and shape[-1]:
                out.append(Producer(lin.weight, "linear", tuple(params[1:]), lin.output, shape[-1]))
    return out


def _offset_param(graph: Graph, gamma: relax.Expr) -> tuple[relax.Expr, float]:
    """(w, c) when the norm's weight is `w + c` for a scalar constant c (Gemma's 1 + w) computed
    for this norm alone, else (gamma, 0)."""
    value = graph.value.get(gamma) if isinstance(gamma, relax.Var) else None
    if op_name(value) != ADD or len(graph.users(gamma)) != 1 or gamma in graph.returned:
        return gamma, 0.0
    w, c = value.args
    if isinstance(w, tvm.ir.expr.Constant):
        w, c = c, w
    if not isinstance(c, tvm.ir.expr.Constant) or c.value.numpy().size != 1 or graph.param(w) is None:
        return gamma, 0.0
    return w, float(c.value.numpy().reshape(()))


def _norm_producer(graph: Graph, var: relax.Var, value: relax.Call) -> Producer | None:
    x, gamma = value.args[0], value.args[1]
    beta = value.args[2] if op_name(value) == "relax.nn.layer_norm" else None
    shape, gshape = static_shape(x), static_shape(gamma)
    axes = _ints(value.attrs.axes)
    gamma, offset = _offset_param(graph, gamma)
    params = [graph.param(gamma)] + ([graph.param(beta)] if beta is not None else [])
    if (shape is None or gshape is None or axes is None or len(axes) != 1 or axes[0] % len(shape) != len(shape) - 1
            or any(p is None or graph.param_uses(p) != 1 for p in params) or _features(var) != tuple(gshape)):
        return None
    return Producer(params[0], "norm", tuple(params[1:]), var, gshape[0], offset)


def trace(graph: Graph, producer: Producer) -> Trace:
    return _Tracer(graph, producer.output, producer.n_channels).run()


def _traced(func: relax.Function, param_names: Sequence[str]) -> Iterator[tuple[Producer, Trace, np.ndarray]]:
    """Every producer, its trace, and which of its channels reach a consumer (bool [C])."""
    graph = Graph(func, param_names)
    for p in find_producers(graph):
        tr = trace(graph, p)
        reached = np.zeros(p.n_channels, bool)
        for cols in tr.consumers.values():
            reached[cols[cols >= 0]] = True
        yield p, tr, reached


def find_scaling_groups(func: relax.Function, param_names: Sequence[str]) -> list[ScalingGroup]:
    """Every producer → consumers group whose channels can be rescaled without changing the
    function's float output."""
    groups = []
    for p, tr, reached in _traced(func, param_names):
        channels = np.flatnonzero(reached & ~tr.dead)
        if channels.size == 0:
            continue
        pos = np.full(p.n_channels, -1)
        pos[channels] = np.arange(channels.size)
        consumers = []
        for weight, cols in tr.consumers.items():
            mapped = np.where(cols >= 0, pos[np.maximum(cols, 0)], -1)
            if (mapped >= 0).any():
                consumers.append(Consumer(weight, mapped))
        groups.append(ScalingGroup(p.weight, p.kind, p.extra, channels, consumers, p.offset))
    return groups


def unscaled_channels(func: relax.Function, param_names: Sequence[str]) -> list[str]:
    """One line per producer some of whose channels reach a linear but cannot be scaled, because
    they also reach an operation scaling cannot compensate (a residual add, the output, a
    nonlinearity): AWQ leaves those channels at s = 1, and says so rather than silently."""
    lines = []
    for p, tr, reached in _traced(func, param_names):
        lost = reached & tr.dead
        if lost.any():
            why = ", ".join(sorted({str(w) for w in tr.killed_by[lost]}))
            lines.append(f"{p.weight}: {int(lost.sum())} of its {int(reached.sum())} channels that feed "
                         f"{', '.join(tr.consumers)} also reach {why}, so AWQ leaves them unscaled")
    return lines


def attention_qk_rows(func: relax.Function, param_names: Sequence[str]) -> dict[str, np.ndarray]:
    """For each linear layer, the output rows that feed attention queries or keys (bool [N])."""
    graph = Graph(func, param_names)
    out = {}
    for p in find_producers(graph):
        if p.kind == "linear":
            tr = trace(graph, p)
            if tr.qk.any():
                out[p.weight] = tr.qk
    return out


# ============================================================================ threads
@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def thread_map(fn: Callable[[Any], T], items: Sequence[Any], progress: Any = None,
               workers: int | None = None) -> list[T]:
    """fn over items, one Python thread per core, each running torch single-threaded (torch releases
    the GIL). The searches are many small ops on [N, K] tensors: multi-threaded torch synchronizes
    its threads at every op, and on a machine shared with other processes a descheduled thread
    stalls each op (measured 10-30x slower elementwise ops on two loaded cores); independent
    single-threaded work per core has no such barrier. `progress` (a tqdm bar) advances per item."""
    workers = workers or os.cpu_count() or 1
    with torch_threads(1), ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(fn, item) for item in items]
        out = []
        for f in futures:
            out.append(f.result())
            if progress is not None:
                progress.update(1)
        return out


# ============================================================================ search
def fake_quantize_(w: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None) -> torch.Tensor:
    """quantizer.fake_quantize(w) computed in place in w (the same operations in the same order, so
    the same values). The searches run it thousands of times on [N, K] weights: every temporary of
    that size costs a fresh allocation and its page faults, which took longer than the arithmetic."""
    n, k = w.shape
    scale, zero = group_params(w, scheme, clip)
    s, z = scale[..., None], zero[..., None]
    w.view(n, k // scheme.group_size, scheme.group_size).div_(s).add_(z).round_().clamp_(0, scheme.qmax).sub_(z).mul_(s)
    return w


@dataclasses.dataclass(frozen=True)
class SecondMoment:
    """mean x xᵀ [K, K] of a linear's input, held as the Gram itself or, when fewer tokens than K
    fed it, as those tokens' rows F [T, K] (scaled so that Fᵀ F is the Gram): smaller to keep,
    and an output error then costs N·K·T instead of N·K²."""

    gram: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.gram is None) == (self.rows is None):
            raise ValueError("a SecondMoment holds either the Gram or its rows")

    @property
    def width(self) -> int:
        return (self.gram if self.gram is not None else self.rows).shape[-1]

    @property
    def rank(self) -> int:
        """The inner size of an output error: K for a Gram, T for rows."""
        return self.width if self.gram is not None else self.rows.shape[0]

    def dense(self) -> torch.Tensor:
        return self.gram if self.gram is not None else self.rows.T @ self.rows

    def error(self, e: torch.Tensor, out: torch.Tensor | None = None) -> float:
        """Mean over tokens of ||x eᵀ||² for a weight error e [N, K]; `out` [N, rank] is scratch."""
        if self.gram is not None:
            p = torch.mm(e, self.gram, out=out)
            return float(torch.dot(p.view(-1), e.view(-1)))
        p = torch.mm(e, self.rows.T, out=out)
        return float(torch.dot(p.view(-1), p.view(-1)))

    def diagonal_blocks(self, group_size: int) -> torch.Tensor:
        """The Gram's diagonal blocks G_gg [K/G, G, G]."""
        ng = self.width // group_size
        if self.gram is not None:
            return self.gram.reshape(ng, group_size, ng, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        r = self.rows.reshape(-1, ng, group_size).transpose(0, 1)  # [K/G, T, G]
        return torch.bmm(r.transpose(1, 2), r)


# A loss evaluation of the scale search multiplies rows × K × rank; above this many multiply-adds
# per consumer it measures a seeded sample of the consumer's output rows instead of all of them
# (every row's error is its own: the grid compares α on the same rows). The default model's layers
# stay under it, so they are searched on every row; a 7B model's are sampled to 1k-2k rows.
SEARCH_MACS = 1 << 33


def loss_rows(n: int, k: int, rank: int, seed: int = 0) -> torch.Tensor | None:
    """The output rows a scale-search loss is measured on (None: all n)."""
    if n * k * rank <= SEARCH_MACS:
        return None
    keep = max(SEARCH_MACS // (k * rank), 256)
    if keep >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


class LossWorkspace:
    """Preallocated buffers for repeated losses of one weight [N, K] on inputs of `rank`."""

    def __init__(self, w: torch.Tensor, rank: int):
        self.err = torch.empty_like(w)
        self.prod = torch.empty(w.shape[0], rank, dtype=w.dtype)


def group_loss(w: torch.Tensor, moment: SecondMoment, col_scale: torch.Tensor, scheme: QuantScheme,
               ws: LossWorkspace | None = None) -> float:
    """Output error of replacing w [N, K] by Q(w·diag(s))·diag(1/s) on inputs of second moment
    `moment`: mean over tokens of ||x Eᵀ||²."""
    ws = ws or LossWorkspace(w, moment.rank)
    e = fake_quantize_(torch.mul(w, col_scale, out=ws.err), scheme)
    e.div_(col_scale).sub_(w)
    return moment.error(e, ws.prod)


def _column_scales(s: torch.Tensor, columns: np.ndarray) -> torch.Tensor:
    out = torch.ones(len(columns), dtype=s.dtype)
    idx = torch.from_numpy(np.flatnonzero(columns >= 0))
    out[idx] = s[torch.from_numpy(columns[columns >= 0])]
    return out


def activation_scale(group: ScalingGroup, stats) -> torch.Tensor:
    """s_x per group channel: mean |x| of the consumer input columns it feeds (averaged when it
    feeds several, e.g. one value channel → g query heads' columns of o_proj)."""
    total = torch.zeros(len(group.channels), dtype=torch.float64)
    count = torch.zeros(len(group.channels), dtype=torch.float64)
    for c in group.consumers:
        if c.weight not in stats:
            continue
        m = c.columns >= 0
        idx = torch.from_numpy(c.columns[m])
        total.index_add_(0, idx, stats.of(c.weight).abs_mean[torch.from_numpy(m)].double())
        count.index_add_(0, idx, torch.ones(int(m.sum()), dtype=torch.float64))
    return (total / count.clamp(min=1)).float()


@dataclasses.dataclass
class ScaleResult:
    scales: torch.Tensor  # [len(channels)]
    alpha: float
    loss: float
    rtn_loss: float  # α = 0


def weight_scale(group: ScalingGroup, weights: Mapping[str, torch.Tensor], scheme: QuantScheme,
                 consumers: Sequence[Consumer]) -> torch.Tensor:
    """s_w per group channel: mean over output rows of |w| / max |w| of its quantization group
    (AutoAWQ's `w_mean` for duo scaling), averaged over the columns the channel feeds."""
    total = torch.zeros(len(group.channels), dtype=torch.float64)
    count = torch.zeros(len(group.channels), dtype=torch.float64)
    for c in consumers:
        rel = _relative_magnitude(weights[c.weight], scheme.group_size)
        m = c.columns >= 0
        idx = torch.from_numpy(c.columns[m])
        total.index_add_(0, idx, rel[torch.from_numpy(m)].double())
        count.index_add_(0, idx, torch.ones(int(m.sum()), dtype=torch.float64))
    return (total / count.clamp(min=1)).float()


# Weights a row-chunked pass over a large layer holds per temporary: a 128k-row LM head is handled
# in pieces of ~64 MB instead of 2 GB copies (the 8B AWQ compile's peak).
CHUNK_ELEMENTS = 1 << 24


def _relative_magnitude(w: torch.Tensor, group_size: int, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean over rows of |w| / (max |w| of its group) [K]; in row chunks of `chunk` weights when w
    is larger (a 128k-row LM head would need 2 GB per temporary)."""
    n, k = w.shape

    def rel(rows: torch.Tensor) -> torch.Tensor:
        g = rows.abs().view(rows.shape[0], k // group_size, group_size)
        return (g / (g.amax(-1, keepdim=True) + 1e-6)).view(rows.shape[0], k)

    step = max(1, chunk // k)
    if n <= step:
        return rel(w).mean(0)
    return (sum(rel(w[i:i + step]).sum(0, dtype=torch.float64) for i in range(0, n, step)) / n).float()


OutputLoss = Callable[[Mapping[str, torch.Tensor]], float]  # replaced consumer weights -> output error


def effective_weight(w: torch.Tensor, col_scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Q(w·diag(s))·diag(1/s): what the scaled, quantized layer computes, in w's own basis."""
    return fake_quantize_(w * col_scale, scheme).div_(col_scale)


def search_group(group: ScalingGroup, weights: Mapping[str, torch.Tensor], stats, scheme: QuantScheme,
                 quantized: Callable[[str], bool], n_grid: int = N_GRID, duo: bool = False,
                 output_loss: OutputLoss | None = None) -> ScaleResult | None:
    """Best s = s_x^α (duo: s_x^α / s_w^(1-α), AutoAWQ's default) over the grid; None when no
    consumer is quantized (nothing to protect). The loss is the consumers' output error from their
    input Grams, or with `output_loss` the error of what they feed, measured by running it with the
    consumers' effective weights."""
    measured = [c for c in group.consumers if quantized(c.weight) and c.weight in stats]
    if not measured:
        return None
    s_x = activation_scale(group, stats)
    s_w = weight_scale(group, weights, scheme, measured) if duo else None
    if output_loss is not None:
        def loss(s: torch.Tensor) -> float:
            return output_loss({c.weight: effective_weight(weights[c.weight], _column_scales(s, c.columns), scheme)
                                for c in measured})
    else:
        loss = _gram_loss(measured, weights, stats, scheme)

    best: ScaleResult | None = None
    rtn = loss(torch.ones(len(group.channels)))
    for k in range(n_grid):
        alpha = k / n_grid
        s = s_x.pow(alpha) if s_w is None else s_x.pow(alpha) / (s_w.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1.0
        value = rtn if k == 0 and s_w is None else loss(s)  # α = 0 is s = 1 (RTN) without duo
        if best is None or value < best.loss:
            best = ScaleResult(s, alpha, value, rtn)
    return best


def _gram_loss(measured: Sequence[Consumer], weights: Mapping[str, torch.Tensor], stats,
               scheme: QuantScheme) -> Callable[[torch.Tensor], float]:
    """The consumers' summed output error at scales s, from their input second moments."""
    moments = {c.weight: stats.of(c.weight).moment for c in measured}
    sampled = {}
    for c in measured:
        w = weights[c.weight]
        rows = loss_rows(w.shape[0], w.shape[1], moments[c.weight].rank)
        sampled[c.weight] = w if rows is None else w.index_select(0, rows)
    spaces = {c.weight: LossWorkspace(sampled[c.weight], moments[c.weight].rank) for c in measured}

    def loss(s: torch.Tensor) -> float:
        return sum(group_loss(sampled[c.weight], moments[c.weight], _column_scales(s, c.columns), scheme,
                              spaces[c.weight]) for c in measured)
    return loss


def search_scales(groups: Sequence[ScalingGroup], weights: Mapping[str, torch.Tensor], stats,
                  scheme: QuantScheme, quantized: Callable[[str], bool], n_grid: int = N_GRID,
                  progress: bool = True, duo: bool = False,
                  output_loss: Callable[[ScalingGroup], OutputLoss | None] | None = None) -> dict[int, ScaleResult]:
    """Search every group (index into `groups` → result); all from the unscaled weights.
    `output_loss(group)`: the group's output loss, or None for the Gram loss. Groups with one run
    one after another on all threads (a submodule forward per candidate); the rest one per core."""
    from tqdm import tqdm

    losses = [output_loss(g) if output_loss else None for g in groups]
    results: dict[int, ScaleResult | None] = {}
    with tqdm(total=len(groups), desc="awq scale", unit="group", disable=not progress, file=sys.stderr) as bar:
        for i, g in enumerate(groups):
            if losses[i] is not None:
                results[i] = search_group(g, weights, stats, scheme, quantized, n_grid, duo, losses[i])
                bar.update(1)
        rest = [i for i in range(len(groups)) if losses[i] is None]
        found = thread_map(lambda i: search_group(groups[i], weights, stats, scheme, quantized, n_grid, duo),
                           rest, bar)
        results.update(zip(rest, found))
    return {i: r for i, r in sorted(results.items()) if r is not None}


# ============================================================================ apply
def check_finite_weights(weights: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    for n in names:
        if not bool(torch.isfinite(weights[n]).all()):
            raise NonFiniteError(f"weight {n} contains NaN or inf; AWQ cannot scale it (the checkpoint is damaged)")


def apply_scales(weights: Mapping[str, torch.Tensor], groups: Sequence[ScalingGroup],
                 results: Mapping[int, ScaleResult]) -> dict[str, torch.Tensor]:
    """A new weight dict with every group's scales folded in (edited tensors are copies)."""
    out = dict(weights)
    copied: set[str] = set()

    def edit(name: str) -> torch.Tensor:
        if name not in copied:
            out[name] = out[name].clone()
            copied.add(name)
        return out[name]

    for i, r in results.items():
        g = groups[i]
        ch = torch.from_numpy(g.channels)
        for name in (g.producer, *g.extra):
            t = edit(name)  # norm weight/bias [C], or linear weight rows [N, K] / bias [N]
            offset = g.offset if name == g.producer else 0.0  # (offset + w) / s = offset + w'
            t[ch] = (t[ch] + offset) / (r.scales if t.dim() == 1 else r.scales[:, None]) - offset
        for c in g.consumers:
            w = edit(c.weight)
            w.mul_(_column_scales(r.scales, c.columns)[None, :])
    return out


def column_scales(weights: Mapping[str, torch.Tensor], groups: Sequence[ScalingGroup],
                  results: Mapping[int, ScaleResult]) -> dict[str, torch.Tensor]:
    """For each consumer weight, the factor its input columns were multiplied by (its inputs are
    divided by the same: the clip search transforms the Gram with it)."""
    out: dict[str, torch.Tensor] = {}
    for i, r in results.items():
        for c in groups[i].consumers:
            cur = out.get(c.weight, torch.ones(weights[c.weight].shape[1]))
            out[c.weight] = cur * _column_scales(r.scales, c.columns)
    return out

"""Relax pass: from the model's `score` function, make a `calibrate` function that returns the input
of every linear layer (matmul by a weight parameter) instead of the logits.

Calibration then runs the float model compiled by TVM itself, one sample at a time, and sees
exactly the activations the deployed model computes. Linears that read the same tensor (q, k and
v of an unfused model) share one tap. The logits are not returned, so dead-code elimination drops
the LM head, the largest matmul of a small model, unless a selected tap needs its input.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import tvm
from tvm import relax

from .dataflow import Graph, GraphError, static_shape

CALIBRATE = "calibrate"


@dataclasses.dataclass(frozen=True)
class Tap:
    """One returned tensor: the input [.., features] shared by the linears `consumers`."""

    consumers: tuple[str, ...]  # weight parameter names
    features: int  # K, the last dimension


def find_taps(graph: Graph, select: Callable[[str], bool]) -> list[tuple[relax.Var, Tap]]:
    """The distinct inputs of the selected linears, in graph order."""
    by_input: dict[relax.Var, list[str]] = {}
    for lin in graph.linears:
        if select(lin.weight):
            by_input.setdefault(lin.input, []).append(lin.weight)
    taps = []
    for var, consumers in sorted(by_input.items(), key=lambda kv: graph.position.get(kv[0], -1)):
        shape = static_shape(var)
        if shape is None or shape[-1] is None:
            raise GraphError(f"the input of {consumers[0]} has no static feature dimension")
        taps.append((var, Tap(tuple(consumers), shape[-1])))
    return taps


def add_calibration_function(mod: tvm.IRModule, param_names: Sequence[str], select: Callable[[str], bool],
                             source: str = "score", keep: Sequence[str] = ("create_tir_paged_kv_cache",),
                             ) -> tuple[tvm.IRModule, list[Tap]]:
    """A module holding `calibrate(input_ids, kv, params) -> (tap_0, tap_1, ...)` (same inputs as
    `source`) plus the functions named in `keep`; and the taps in output order."""
    func = relax.utils.copy_with_new_vars(mod[source])  # fresh vars: a var may not live in two functions
    graph = Graph(func, param_names)
    taps = find_taps(graph, select)
    if not taps:
        raise GraphError(f"{source} has no linear layer to calibrate")
    block = [b for b in func.body.blocks if b.bindings][0]
    out = relax.Var("calibration_taps", relax.TupleType([v.ty for v, _ in taps]))
    bindings = list(block.bindings) + [relax.VarBinding(out, relax.Tuple([v for v, _ in taps]))]
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], out)
    new_func = relax.Function(func.params, body, out.ty, func.is_pure, func.attrs)
    new_func = new_func.with_attr("global_symbol", CALIBRATE)  # public: the VM looks it up by name

    new_mod = tvm.IRModule({gv: mod[gv] for gv in mod.get_global_vars() if gv.name_hint != source
                            and gv.name_hint not in ("prefill", "decode", "score")})
    new_mod[CALIBRATE] = new_func
    new_mod = relax.transform.Normalize()(new_mod)
    # Drop what the taps do not need (the LM head, the logits) and the unused functions.
    new_mod = relax.transform.DeadCodeElimination([CALIBRATE, *keep])(new_mod)
    return new_mod, [tap for _, tap in taps]

"""Orders the stores of VMShapeLower's shape functions canonically, so a compile's bytes do not
depend on where objects happened to sit in memory.

TVM 0.27's VMShapeLower emits the symbolic-shape computations of a `shape_func` (straight-line
stores `H[slot] = f(H[...])` into the VM's shape heap) in the order of a map keyed by object
address. In one process that order changes from compile to compile, LLVM sometimes schedules
the reordered stores differently, and two compiles of the same model give different lib.so bytes.
This pass re-emits each such body in one order fixed by the IR alone: repeatedly, of the stores
whose inputs are all written, the one with the lowest slot. That is a topological order of the
same stores, so the function computes the same heap.
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.ir.expr import TensorLoad
from tvm.tirx.expr import BinaryOpExpr


def _slot(index: tirx.PrimExpr) -> int | None:
    return int(index.value) if isinstance(index, tirx.IntImm) else None


def _reads(value: tirx.PrimExpr, heap: tvm.ir.Node) -> set[int] | None:
    """The heap slots `value` loads; None when it holds anything but integer arithmetic on
    constant-slot loads (then the body is left alone rather than reordered on a guess)."""
    if isinstance(value, tirx.IntImm):
        return set()
    if isinstance(value, TensorLoad):  # what tirx.BufferLoad builds in TVM 0.27
        slot = _slot(value.indices[0]) if len(value.indices) == 1 and value.source.same_as(heap) else None
        return None if slot is None else {slot}
    if isinstance(value, tirx.Cast):
        return _reads(value.value, heap)
    if isinstance(value, BinaryOpExpr):
        a, b = _reads(value.a, heap), _reads(value.b, heap)
        return None if a is None or b is None else a | b
    return None


def canonical_stores(body: tirx.Stmt) -> tirx.Stmt:
    """`body` with its stores in canonical order, or `body` itself when it is not a sequence of
    constant-slot stores into one buffer, the heap (then it is left as TVM made it)."""
    if not (isinstance(body, tirx.SeqStmt) and isinstance(body.seq[0], tirx.BufferStore)):
        return body
    heap = body.seq[0].buffer
    stores = []
    for stmt in body.seq:
        if not (isinstance(stmt, tirx.BufferStore) and stmt.buffer.same_as(heap) and len(stmt.indices) == 1):
            return body
        slot, reads = _slot(stmt.indices[0]), _reads(stmt.value, heap)
        if slot is None or reads is None:
            return body
        stores.append((slot, reads, stmt))
    written = {slot for slot, _, _ in stores}
    if len(written) != len(stores):  # a slot stored twice: order matters beyond dependencies
        return body
    done: set[int] = set()
    ordered = []
    pending = sorted(stores, key=lambda s: s[0])
    while pending:
        i = next((i for i, (_, reads, _) in enumerate(pending) if not (reads & written) - done), None)
        if i is None:  # a cycle cannot come from VMShapeLower; keep its order rather than guess
            return body
        slot, _, stmt = pending.pop(i)
        done.add(slot)
        ordered.append(stmt)
    return tirx.SeqStmt(ordered)


@tvm.transform.module_pass(opt_level=0, name="CanonicalShapeFuncOrder")
def CanonicalShapeFuncOrder(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    updates = {}
    for gv in mod.get_global_vars():
        func = mod[gv]
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func") and len(func.params) == 1:
            body = canonical_stores(func.body)
            if not body.same_as(func.body):
                updates[gv] = func.with_body(body)
    if not updates:
        return mod
    mod = mod.clone()  # a pass does not change the module it was given
    for gv, func in updates.items():
        mod[gv] = func
    return mod

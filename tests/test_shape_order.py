"""CanonicalShapeFuncOrder: VMShapeLower's shape-heap stores in one order fixed by the IR."""
from __future__ import annotations

import itertools

import numpy as np
import tvm
from tvm import relax, tirx

from awqc.passes.shape_order import CanonicalShapeFuncOrder

N = 7  # the symbolic n the heap is run with


def _shape_func() -> tirx.PrimFunc:
    """The shape function VMShapeLower makes for three reshapes of an [n, 4] tensor: heap slot 0
    is n, slots 1-5 are products and quotients of it."""
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 4], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        a = bb.emit(relax.op.reshape(x, [n * 2, 2]))
        b = bb.emit(relax.op.reshape(a, [n * 8 // 2]))
        bb.emit_func_output(bb.emit(relax.op.reshape(b, [n, 2, 2])))
    lower = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(), relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(), relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(), relax.transform.VMShapeLower()])
    with tvm.target.Target("llvm"):
        mod = lower(bb.get())
    return mod["shape_func"]


def _with_stores(func: tirx.PrimFunc, stores: list[tirx.BufferStore]) -> tvm.IRModule:
    return tvm.IRModule({"shape_func": func.with_body(tirx.SeqStmt(stores))})


def _slots(mod: tvm.IRModule) -> list[int]:
    return [int(s.indices[0].value) for s in mod["shape_func"].body.seq]


def _heap(mod: tvm.IRModule) -> list[int]:
    """Runs the shape function on a heap whose slot 0 is N."""
    lib = tvm.compile(tvm.IRModule({"shape_func": mod["shape_func"].with_attr("global_symbol", "shape_func")}),
                      "llvm")
    heap = tvm.runtime.tensor(np.array([N, 0, 0, 0, 0, 0], dtype="int64"))
    lib["shape_func"](heap)
    return heap.numpy().tolist()


def test_every_order_becomes_the_same_one_and_computes_the_same_heap() -> None:
    """Any order of these independent stores (VMShapeLower's varies with object addresses)
    becomes one: lowest slot first. The heap is what the shapes say: 2n, 4·2n, 8n/2, 4·8n/2, 16n."""
    func = _shape_func()
    stores = list(func.body.seq)
    orders = {tuple(_slots(CanonicalShapeFuncOrder(_with_stores(func, list(p)))))
              for p in itertools.permutations(stores)}
    assert orders == {(1, 2, 3, 4, 5)}
    expected = [N, 8 * (N * 2), N * 2, 4 * (N * 8 // 2), N * 8 // 2, 4 * N * 2 * 2]
    assert _heap(CanonicalShapeFuncOrder(_with_stores(func, stores[::-1]))) == expected
    assert _heap(tvm.IRModule({"shape_func": func})) == expected


def test_a_store_that_reads_another_waits_for_it() -> None:
    """Slot 1 rewritten to read slot 4: slot 4 must be stored first, though its number is higher;
    the rest keep lowest-first."""
    func = _shape_func()
    by_slot = {int(s.indices[0].value): s for s in func.body.seq}
    heap = by_slot[1].buffer
    four = tirx.BufferLoad(heap, [tirx.IntImm("int64", 4)])
    by_slot[1] = tirx.BufferStore(heap, four + tirx.IntImm("int64", 1), by_slot[1].indices)
    mod = CanonicalShapeFuncOrder(_with_stores(func, [by_slot[s] for s in (4, 1, 5, 3, 2)]))
    assert _slots(mod) == [2, 3, 4, 1, 5]
    assert _heap(mod)[1] == N * 8 // 2 + 1


def test_a_slot_stored_twice_is_left_alone() -> None:
    """Two stores to one slot: their order is meaning, not noise, so the pass keeps it."""
    func = _shape_func()
    first = func.body.seq[0]
    mod = _with_stores(func, [first, tirx.BufferStore(first.buffer, tirx.IntImm("int64", 3), first.indices)])
    assert CanonicalShapeFuncOrder(mod)["shape_func"].same_as(mod["shape_func"])

"""Lowering: every linear whose weight is quantized becomes a call to a dequant-fused int4 kernel.

The exported model takes its parameters as one packed tuple. A quantized weight W [N, K] is
replaced in that tuple by three entries (W.qweight, W.scales, W.zeros), and each
`matmul(x, permute_dims(W))` by `call_tir(kernel, [x2d, qweight, scales, zeros])` — a GEMV
when the rows are statically 1 (decode), a GEMM over dynamic rows otherwise (prefill). The
packing layout (schedules/layouts.py) gives the three entries' shapes and the kernel that reads
them; the target's scheduler schedules it.

Stacked experts W [E, N, K] (compiler/models/moe.py) are packed k8 per expert, whatever the
model's layout, into [E, ...] parts, and their `expert_matmul` calls become `w4_expert_matmul`
calls, which read only the experts each token chose.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from awqc.schedules.layouts import DTYPES, K8, Layout
from awqc.schedules.w4_kernels import w4_expert_matmul

EXPERT_MATMUL = "expert_matmul"  # compiler/models/moe.py's kernel name

# A kernel scheduler: (unscheduled kernel, group size, static rows or None) -> scheduled kernel.
Scheduler = Callable[[tvm.tirx.PrimFunc, int, "int | None"], tvm.tirx.PrimFunc]
_OPAQUE = 8  # relax op pattern kOpaque: keep FuseOps from merging other ops into a scheduled kernel

QUANT_SUFFIXES = ("qweight", "scales", "zeros")


def quantized_param_names(names: list[str], quantized: set[str]) -> list[str]:
    """The parameter order after lowering: each quantized weight expands to its three parts."""
    out: list[str] = []
    for name in names:
        out.extend([f"{name}.{s}" for s in QUANT_SUFFIXES] if name in quantized else [name])
    return out


def _quant_ty(ty: relax.TensorType, group: int, layout: Layout) -> list[relax.TensorType]:
    *experts, n, k = (int(d) for d in ty.shape.values)
    if experts:
        layout = K8
    return [relax.TensorType((*experts, *shape), dtype)
            for shape, dtype in zip(layout.shapes(n, k, group), DTYPES)]


@mutator
class _LinearRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, old_packed: relax.Var, new_packed: relax.Var,
                 index_map: dict[int, list[int]], quantized_idx: set[int], group: int, schedule: Scheduler | None,
                 layout: Layout, shapes: dict[int, tuple[int, int]]):
        super().__init__(mod)
        self.old_packed, self.new_packed = old_packed, new_packed
        self.index_map, self.quantized_idx, self.group = index_map, quantized_idx, group
        self.schedule, self.layout, self.shapes = schedule, layout, shapes
        self.parts: dict[relax.Var, list[relax.Var]] = {}  # W var or permute_dims(W) var -> parts
        self.weight_shape: dict[relax.Var, tuple[int, int]] = {}  # W var -> (N, K)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(self.old_packed):
            self._rebind_param(binding.var, value.index)
        elif _is_op(value, "permute_dims") and value.args[0] in self.parts:
            self.parts[binding.var] = self.parts[value.args[0]]
            self.weight_shape[binding.var] = self.weight_shape[value.args[0]]
        elif _is_op(value, "matmul") and value.args[1] in self.parts:
            self._emit_linear(binding.var, self.visit_expr(value.args[0]), self.parts[value.args[1]],
                              self.weight_shape[value.args[1]])
        elif _is_expert_matmul(value) and value.args[1].fields[2] in self.parts:
            x, chosen, w = value.args[1].fields
            self._emit_experts(binding.var, self.visit_expr(x), self.visit_expr(chosen), self.parts[w],
                               self.weight_shape[w])
        else:
            super().visit_var_binding_(binding)

    def _rebind_param(self, var: relax.Var, index: int) -> None:
        if index in self.quantized_idx:
            self.parts[var] = [self.builder_.emit(relax.TupleGetItem(self.new_packed, j), name_hint=f"{var.name}_{s}")
                               for j, s in zip(self.index_map[index], QUANT_SUFFIXES)]
            self.weight_shape[var] = self.shapes[index]
        else:
            (j,) = self.index_map[index]
            self.set_var_remap(var, self.builder_.emit(relax.TupleGetItem(self.new_packed, j), name_hint=var.name))

    def _emit_linear(self, var: relax.Var, x: relax.Expr, parts: list[relax.Var], shape: tuple[int, int]) -> None:
        bb = self.builder_
        n, k = shape
        lead = list(x.ty.shape.values[:-1])
        rows = _product(lead)
        static_rows = int(rows) if isinstance(rows, (int, tvm.tirx.IntImm)) else None
        dtype = x.ty.dtype
        key = (k, n, self.group, dtype, static_rows)
        if key not in self.kernels:
            kind = "gemv" if static_rows == 1 else "gemm"
            kernel = self.layout.kernel(k, n, self.group, dtype, static_rows)
            if self.schedule is not None:
                kernel = self.schedule(kernel, self.group, static_rows).with_attrs(
                    {"tirx.is_scheduled": True, "op_pattern": _OPAQUE})
            self.kernels[key] = bb.add_func(kernel, f"w4_{kind}_{k}x{n}_g{self.group}")
        x2 = bb.emit(relax.op.reshape(x, [rows, k]))
        y2 = bb.emit(relax.call_tir(self.kernels[key], [x2, *parts], relax.TensorType([rows, n], dtype)))
        y = bb.emit(relax.op.reshape(y2, [*lead, n]), name_hint=var.name)
        self.set_var_remap(var, y)


    def _emit_experts(self, var: relax.Var, x: relax.Expr, chosen: relax.Expr, parts: list[relax.Var],
                      shape: tuple[int, ...]) -> None:
        experts, n, k = shape
        slots = int(chosen.ty.shape.values[1])
        per_slot = len(x.ty.shape.values) == 3
        key = ("experts", experts, n, k, slots, per_slot, x.ty.dtype)
        if key not in self.kernels:
            kernel = w4_expert_matmul(k, n, self.group, experts, slots, x.ty.dtype, per_slot)
            self.kernels[key] = self.builder_.add_func(kernel.with_attr("op_pattern", _OPAQUE),
                                                       f"w4_experts_{experts}x{k}x{n}_g{self.group}")
        tokens = x.ty.shape.values[0]
        y = self.builder_.emit(relax.call_tir(self.kernels[key], [x, chosen, *parts],
                                              relax.TensorType([tokens, slots, n], x.ty.dtype)), name_hint=var.name)
        self.set_var_remap(var, y)


def _is_expert_matmul(expr: relax.Expr) -> bool:
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir"
            and isinstance(expr.args[0], tvm.ir.GlobalVar) and expr.args[0].name_hint.startswith(EXPERT_MATMUL))


def _product(dims: list) -> object:
    """Product of shape dims, folding the static ones, so [1, seq_len] gives seq_len itself."""
    static, symbolic = 1, None
    for d in dims:
        if isinstance(d, tvm.tirx.IntImm):
            static *= int(d)
        else:
            symbolic = d if symbolic is None else symbolic * d
    if symbolic is None:
        return static
    return symbolic if static == 1 else symbolic * static


def _is_op(expr: relax.Expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == f"relax.{name}"


def quantize_linear(mod: tvm.IRModule, param_names: list[str], quantized: set[str], group: int,
                    schedule: Scheduler | None = None, layout: Layout = K8) -> tvm.IRModule:
    """Rewrite every function that takes the packed parameters; `quantized` names the weights to
    lower (each must be a linear weight [N, K] with K a multiple of `group`). `schedule` is the
    target's kernel scheduler (None leaves the kernels for later scheduling passes); `layout`
    the packing the weights will be stored in (it picks the kernels)."""
    unknown = quantized - set(param_names)
    if unknown:
        raise ValueError(f"quantized weights not in the model: {', '.join(sorted(unknown))}")
    quantized_idx = {i for i, n in enumerate(param_names) if n in quantized}
    index_map, j = {}, 0
    for i in range(len(param_names)):
        width = 3 if i in quantized_idx else 1
        index_map[i] = list(range(j, j + width))
        j += width
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not func.params:
            continue
        old_packed = func.params[-1]
        if old_packed.name != "packed_params":
            continue
        fields = []
        for i, ty in enumerate(old_packed.ty.fields):
            fields.extend(_quant_ty(ty, group, layout) if i in quantized_idx else [ty])
        shapes = {i: tuple(int(d) for d in old_packed.ty.fields[i].shape.values) for i in quantized_idx}  # [(E,) N, K]
        new_packed = relax.Var("packed_params", relax.TupleType(fields))
        rewriter = _LinearRewriter(mod, old_packed, new_packed, index_map, quantized_idx, group, schedule,
                                   layout, shapes)
        body = rewriter.visit_expr(func.body)
        new_func = relax.Function([*func.params[:-1], new_packed], body, func.ret_ty, func.is_pure,
                                  func.attrs)
        mod = rewriter.builder_.get()
        mod[gv] = new_func
    return relax.transform.DeadCodeElimination()(mod)

"""Read an exported Relax function as a small dataflow graph: its bindings, who uses what, which
variables are model parameters, and which calls are linear layers.

The AWQ passes and the calibration taps both work on the function the model exports (before
legalization), where a linear layer is `matmul(x, permute_dims(W))` with W a parameter, so they
look at the graph itself and never at module or parameter names.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from tvm import relax

MATMUL = "relax.matmul"
PERMUTE_DIMS = "relax.permute_dims"
ADD = "relax.add"


class GraphError(ValueError):
    """The function is not in the form the AWQ passes read (one dataflow block, parameters by name)."""


@dataclasses.dataclass(frozen=True)
class Linear:
    """y = x @ W^T (+ b): `weight` [N, K] (and `bias` [N]) are parameter names."""

    weight: str
    input: relax.Var  # x
    matmul: relax.Var  # x @ W^T
    output: relax.Var  # the bias add when there is one, else `matmul`
    bias: str | None


def op_name(value: relax.Expr) -> str | None:
    """'relax.matmul' for a call of a Relax operator, the symbol for call_dps_packed(extern, ...)."""
    if not isinstance(value, relax.Call):
        return None
    name = getattr(value.op, "name", None)
    if name == "relax.call_dps_packed" and isinstance(value.args[0], relax.ExternFunc):
        return str(value.args[0].global_symbol)
    return name


def operands(value: relax.Expr) -> Iterator[relax.Var]:
    """The variables an expression reads (through tuples), in argument order."""
    if isinstance(value, relax.Var):
        yield value
    elif isinstance(value, relax.Call):
        for arg in value.args:
            yield from operands(arg)
    elif isinstance(value, relax.Tuple):
        for field in value.fields:
            yield from operands(field)
    elif isinstance(value, relax.TupleGetItem):
        yield from operands(value.tuple_value)


def static_shape(var: relax.Expr) -> list[int | None] | None:
    """The tensor shape with None for symbolic dimensions; None when not a tensor of known rank."""
    ty = var.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim < 0 or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return [int(d.value) if hasattr(d, "value") else None for d in ty.shape.values]


class Graph:
    """The bindings of a function's single dataflow block, indexed for the passes."""

    def __init__(self, func: relax.Function, param_names: Sequence[str]):
        blocks = [b for b in func.body.blocks if b.bindings]
        if len(blocks) != 1:
            raise GraphError(f"expected one dataflow block, found {len(blocks)}; pass the exported "
                             "function before lowering")
        self.func = func
        self.bindings: list[relax.Binding] = list(blocks[0].bindings)
        self.value: dict[relax.Var, relax.Expr] = {b.var: b.value for b in self.bindings}
        self.position: dict[relax.Var, int] = {b.var: i for i, b in enumerate(self.bindings)}
        self.uses: dict[relax.Var, list[relax.Var]] = {}
        for b in self.bindings:
            for v in set(operands(b.value)):
                self.uses.setdefault(v, []).append(b.var)
        # Variables the function returns count as uses that no pass may change.
        self.returned = set(operands(func.body.body))
        self.param_of: dict[relax.Var, str] = self._params(func, list(param_names))
        self.linears: list[Linear] = self._linears()
        self.linear_of_matmul = {lin.matmul: lin for lin in self.linears}

    # -- parameters ------------------------------------------------------------------------------
    def _params(self, func: relax.Function, names: list[str]) -> dict[relax.Var, str]:
        """Weight parameters: either a packed tuple (`param_mode="packed"`, read by TupleGetItem) or
        one function parameter each after the `num_input` inputs."""
        num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
        rest = list(func.params[num_input:])
        out: dict[relax.Var, str] = {}
        if len(rest) == 1 and isinstance(rest[0].ty, relax.TupleType):
            packed = rest[0]
            for b in self.bindings:
                v = b.value
                if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(packed):
                    out[b.var] = names[int(v.index)]
        else:
            if len(rest) != len(names):
                raise GraphError(f"the function takes {len(rest)} weight parameters but {len(names)} names were given")
            out.update(zip(rest, names))
        return out

    def param(self, var: relax.Expr) -> str | None:
        return self.param_of.get(var) if isinstance(var, relax.Var) else None

    def users(self, var: relax.Var) -> list[relax.Var]:
        return self.uses.get(var, [])

    def param_uses(self, name: str) -> int:
        """How many bindings read parameter `name` (a weight shared by two layers cannot be rescaled
        for one of them alone)."""
        return sum(len(self.users(v)) + (v in self.returned) for v, n in self.param_of.items() if n == name)

    # -- linear layers ---------------------------------------------------------------------------
    def weight_of_matmul(self, value: relax.Expr) -> str | None:
        """W when `value` is matmul(x, permute_dims(W)) with W a 2-D parameter [N, K]."""
        if op_name(value) != MATMUL:
            return None
        wt = value.args[1]
        if not isinstance(wt, relax.Var) or op_name(self.value.get(wt)) != PERMUTE_DIMS:
            return None
        perm = self.value[wt]
        axes = perm.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        name = self.param(perm.args[0])
        shape = static_shape(perm.args[0])
        return name if name is not None and shape is not None and len(shape) == 2 else None

    def _linears(self) -> list[Linear]:
        out = []
        for b in self.bindings:
            weight = self.weight_of_matmul(b.value)
            if weight is None:
                continue
            bias, output = None, b.var
            users = self.users(b.var)
            if len(users) == 1 and b.var not in self.returned and op_name(self.value[users[0]]) == ADD:
                add = self.value[users[0]]
                other = add.args[1] if add.args[0].same_as(b.var) else add.args[0]
                other_shape = static_shape(other)
                out_shape = static_shape(b.var)
                if (self.param(other) is not None and other_shape is not None and out_shape is not None
                        and len(other_shape) == 1 and other_shape[0] == out_shape[-1]):
                    bias, output = self.param(other), users[0]
            out.append(Linear(weight, b.value.args[0], b.var, output, bias))
        return out

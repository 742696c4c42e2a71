"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE, as transformers computes it: a router
(a float linear, hidden → experts) scores every expert, softmax in float32, the top
num_experts_per_tok are chosen (their probabilities renormalized to sum to 1 where the config
says so), and the token's output is the probability-weighted sum of the chosen experts'
SiLU-gated MLPs.

The experts' weights are stacked per layer: gate and up fused as `experts.gate_up_proj.weight`
[E, 2I, H], `experts.down_proj.weight` [E, H, I]. `expert_matmul` multiplies each token by the
experts chosen for it, indexing the stack with the router's choice, so a decode step reads the
weights of num_experts_per_tok experts only, not all E."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, TypeVar

import torch
import tvm
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from awqc.compiler.config import ModelConfig
from awqc.passes.quantize_linear import EXPERT_MATMUL  # the int4 lowering finds the op by this name

T = TypeVar("T")



def expert_matmul(x: Tensor, chosen: Tensor, w: Tensor) -> Tensor:
    """[T, slots, N]: token t's input times expert chosen[t, j]'s weight [N, K], for every slot j.
    x is [T, K] (one input for all slots) or [T, slots, K] (one per slot); w is [E, N, K]."""

    def compute(xt: te.Tensor, ct: te.Tensor, wt: te.Tensor) -> te.Tensor:
        tokens, slots = ct.shape
        _, n, k = wt.shape
        r = te.reduce_axis((0, k), name="r")
        per_slot = len(xt.shape) == 3

        def row(t, j, o):
            a = xt[t, j, r] if per_slot else xt[t, r]
            return te.sum(a * wt[ct[t, j], o, r], axis=r)

        return te.compute((tokens, slots, n), row, name=EXPERT_MATMUL)

    return op.tensor_expr_op(compute, EXPERT_MATMUL, [x, chosen, w])


class StackedWeight(nn.Module):
    def __init__(self, experts: int, n: int, k: int, dtype: str):
        self.weight = nn.Parameter((experts, n, k), dtype)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = StackedWeight(e, 2 * i, h, dtype)
        self.down_proj = StackedWeight(e, h, i, dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype)
        self.experts = Experts(cfg, dtype)

    def route(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's chosen experts [T, slots] and their float32 weights [T, slots]."""
        c = self.cfg
        probs = op.softmax(self.router(x2).astype("float32"), axis=-1)
        weights, chosen = op.topk(probs, c.num_experts_per_tok, axis=-1, ret_type="both", largest=True,
                                  dtype="int32")
        if c.norm_topk_prob:
            weights = weights / op.sum(weights, axis=-1, keepdims=True)
        return weights, chosen

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        x2 = op.reshape(x, (b * s, h))
        weights, chosen = self.route(x2)
        gate, up = op.split(expert_matmul(x2, chosen, self.experts.gate_up_proj.weight), 2, axis=-1)
        y = expert_matmul(op.silu(gate) * up, chosen, self.experts.down_proj.weight)  # [T, slots, H]
        out = op.sum(y * op.unsqueeze(weights.astype(x.dtype), -1), axis=1)
        return op.reshape(out, (b, s, h))


def moe_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The parameters of block `p`'s mixture-of-experts MLP, with their shapes."""
    e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    return {f"{p}.mlp.router.weight": (e, h), f"{p}.mlp.experts.gate_up_proj.weight": (e, 2 * i, h),
            f"{p}.mlp.experts.down_proj.weight": (e, h, i)}


def with_experts(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A dense family's parameter shapes with the MLP of every MoE layer replaced by experts."""
    out = {}
    for name, shape in shapes.items():
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is not None and int(layer) in cfg.moe_layers and ".mlp." in name:
            continue
        out[name] = shape
    for n in cfg.moe_layers:
        out.update(moe_shapes(cfg, f"layers.{n}"))
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointNames:
    """How a family's checkpoints name an MoE block's tensors: block p's router is
    `p.{block}.{router}.weight`, expert e's linears `p.{block}.experts.{e}.{gate|up|down}.weight`."""
    block: str
    router: str
    gate: str
    up: str
    down: str

    def parts(self, cfg: ModelConfig, name: str) -> list[str] | None:
        """The checkpoint tensors of an MoE parameter, in stacking order; None for any other."""
        p, _, rest = name.partition(".mlp.")
        experts = f"{p}.{self.block}.experts"
        if rest == "router.weight":
            return [f"{p}.{self.block}.{self.router}.weight"]
        if rest == "experts.gate_up_proj.weight":
            return [f"{experts}.{e}.{x}.weight" for e in range(cfg.num_experts) for x in (self.gate, self.up)]
        if rest == "experts.down_proj.weight":
            return [f"{experts}.{e}.{self.down}.weight" for e in range(cfg.num_experts)]
        return None

    def checkpoint_names(self, cfg: ModelConfig, dense: list[str]) -> list[str]:
        """Every tensor name the checkpoint may hold: the dense family's names `dense` without the
        MLP of the MoE layers, and the MoE layers' routers and experts."""
        moe = tuple(f"layers.{n}.mlp." for n in cfg.moe_layers)
        return [n for n in dense if not n.startswith(moe)] + [
            n for layer in cfg.moe_layers for w in moe_shapes(cfg, f"layers.{layer}") for n in self.parts(cfg, w)]


def hf_block_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], prefix: str,
                     dense: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A block's awqc weights under transformers 5's names: its router as `mlp.gate`, its experts
    stacked as awqc stacks them (`mlp.experts.gate_up_proj` [E, 2I, H]); the rest as the dense
    family's `dense` hf_block_weights names them."""
    renames = {"mlp.router.weight": "mlp.gate.weight", "mlp.experts.gate_up_proj.weight": "mlp.experts.gate_up_proj",
               "mlp.experts.down_proj.weight": "mlp.experts.down_proj"}
    moe = {k: v for k, v in weights.items() if k.removeprefix(prefix) in renames}
    rest = {k: v for k, v in weights.items() if k not in moe}
    return {**dense(cfg, rest, prefix), **{renames[k.removeprefix(prefix)]: v for k, v in moe.items()}}


# ------------------------------------------------------------------------------- AWQ's view
# AWQ finds its scaling groups by tracing the graph's linears (passes/awq_scale.py), and the
# stacked experts' kernel is not one. So AWQ and calibration see each expert as its own linears,
# `experts.{e}.gate_up_proj.weight` [2I, H] and `experts.{e}.down_proj.weight` [H, I], in a view
# of the model that runs every expert densely and weights its output by the token's routing
# weight (0 for experts not chosen): the same function, and the channel structure the tracer
# needs (the norm feeds the router and every expert's gate/up; each expert's up feeds its down).
# The compile then stacks the per-expert results back (`stack_experts`).
class ExpertMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str):
        i, h = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=False, dtype=dtype)


def _routing_weights(weights: Tensor, chosen: Tensor, experts: int) -> Tensor:
    """[T, E]: each token's weight per expert, 0 for the experts it did not choose."""

    def compute(w: te.Tensor, c: te.Tensor) -> te.Tensor:
        slots = w.shape[1]
        j = te.reduce_axis((0, slots), name="j")
        return te.compute((w.shape[0], experts),
                          lambda t, e: te.sum(tvm.tirx.if_then_else(c[t, j] == e, w[t, j], tvm.tirx.const(0, w.dtype)),
                                              axis=j), name="routing_weights")

    return op.tensor_expr_op(compute, "routing_weights", [weights, chosen])


class UnrolledMoE(MoE):
    """MoE's function with every expert its own pair of linears (AWQ's view, not compiled)."""

    def __init__(self, cfg: ModelConfig, dtype: str):
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype)
        self.experts = nn.ModuleList([ExpertMLP(cfg, dtype) for _ in range(cfg.num_experts)])

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        x2 = op.reshape(x, (b * s, h))
        weights, chosen = self.route(x2)
        routing = _routing_weights(weights.astype(x.dtype), chosen, self.cfg.num_experts)
        out = None
        for expert, route in zip(self.experts, op.split(routing, self.cfg.num_experts, axis=1)):
            gate, up = op.split(expert.gate_up_proj(x2), 2, axis=-1)
            y = expert.down_proj(op.silu(gate) * up) * route
            out = y if out is None else out + y
        return op.reshape(out, (b, s, h))


def awq_view(model_cls: type) -> type:
    """`model_cls` (a family's model) with UnrolledMoE in its MoE layers."""
    base = model_cls.layer

    class Layer(base):
        def make_mlp(self, cfg: ModelConfig, dtype: str, layer: int) -> nn.Module:
            return UnrolledMoE(cfg, dtype) if layer in cfg.moe_layers else super().make_mlp(cfg, dtype, layer)

    return type(f"{model_cls.__name__}AWQView", (model_cls,), {"layer": Layer})


_STACKED = (".mlp.experts.gate_up_proj.weight", ".mlp.experts.down_proj.weight")


def unstack_experts(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert weights [E, N, K] as AWQ's view names them, one [N, K] per expert (views)."""
    out = {}
    for name, w in weights.items():
        if name.endswith(_STACKED):
            p, _, rest = name.partition(".mlp.experts.")
            out.update({f"{p}.mlp.experts.{e}.{rest}": w[e] for e in range(w.shape[0])})
        else:
            out[name] = w
    return out


def stack_experts(cfg: ModelConfig, weights: Mapping[str, T]) -> dict[str, T]:
    """Inverse of unstack_experts, for any per-expert values (float weights, (q, scale, zero))."""
    out, stacked = {}, {}
    for name, v in weights.items():
        p, sep, rest = name.partition(".mlp.experts.")
        if sep and rest.split(".", 1)[0].isdigit():
            e, tail = rest.split(".", 1)
            stacked.setdefault(f"{p}{sep}{tail}", {})[int(e)] = v
        else:
            out[name] = v
    for name, parts in stacked.items():
        items = [parts[e] for e in range(cfg.num_experts)]
        out[name] = (tuple(torch.stack([x[i] for x in items]) for i in range(len(items[0])))
                     if isinstance(items[0], tuple) else torch.stack(items))
    return out

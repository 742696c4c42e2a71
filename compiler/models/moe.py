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
from typing import Callable, Mapping

import torch
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from awqc.compiler.config import ModelConfig
from awqc.passes.quantize_linear import EXPERT_MATMUL  # the int4 lowering finds the op by this name



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

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        b, s, h = x.shape
        x2 = op.reshape(x, (b * s, h))
        probs = op.softmax(self.router(x2).astype("float32"), axis=-1)
        weights, chosen = op.topk(probs, c.num_experts_per_tok, axis=-1, ret_type="both", largest=True,
                                  dtype="int32")
        if c.norm_topk_prob:
            weights = weights / op.sum(weights, axis=-1, keepdims=True)
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

    def names(self, cfg: ModelConfig) -> list[str]:
        """Every MoE tensor name of the checkpoint."""
        return [n for layer in cfg.moe_layers for w in moe_shapes(cfg, f"layers.{layer}")
                for n in self.parts(cfg, w)]


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

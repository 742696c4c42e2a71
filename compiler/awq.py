"""Quantize an imported model: round-to-nearest, or AWQ (scale search, then clip search) on
calibration statistics. The result is passes/quantizer.QuantizedWeights either way.

The compile streams it (`quantized_blocks`): each decoder block is read, calibrated on the hidden
states the previous block produced, searched and quantized, then dropped. Evaluation and tests
on small models take the whole model at once:

    stats = calibrate(model, load_samples(model))
    qw = awq_quantize(model, QuantScheme(group_size=64), stats).weights
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import torch

from awqc.passes.awq_clip import search_clip
from awqc.passes.gptq import gptq_quantize
from awqc.passes.awq_scale import (ScaleResult, ScalingGroup, apply_scales, attention_qk_rows, check_finite_weights,
                                   column_scales, find_scaling_groups, search_scales, unscaled_channels)
from awqc.passes.quantizer import QuantizedWeights, QuantScheme, is_quantized_linear, quantize, rtn_quantize

from .calibrate import CalibrationStats
from .config import ModelConfig
from .model_import import ImportedModel, expected_shapes, weight_parts
from .models import family
from .models.moe import stack_experts, unstack_experts
from .targets import get_target

AWQ_METHODS = ("awq", "awq+gptq")  # compile methods that calibrate

# AutoAWQ's default scaling (s_x^α / s_w^(1-α)). On the default model (w4g64, same statistics) it
# gives perplexity 14.856 against 14.913 for the paper's s_x^α (session 5, README).
DUO_SCALING = True


@dataclasses.dataclass
class AWQResult:
    weights: QuantizedWeights  # scaled, clipped (when searched) and quantized
    groups: list[ScalingGroup]
    scales: dict[int, ScaleResult]  # group index -> searched scales
    clip: dict[str, torch.Tensor]  # weight -> clip ratio per (row, group)
    scaled: dict[str, torch.Tensor]  # float weights with the scales folded in
    col_scales: dict[str, torch.Tensor]  # weight -> the factor its input columns were multiplied by
    seconds: dict[str, float]  # scale (search + apply), clip, quantize

    def scale_only(self) -> QuantizedWeights:
        """The same scales without the clipping: AWQ's scale search alone."""
        return quantize_weights(self.scaled, list(self.weights.quantized), self.weights.scheme, {})


def quantize_weights(weights: dict[str, torch.Tensor], names: list[str], scheme: QuantScheme,
                     clips: dict[str, torch.Tensor]) -> QuantizedWeights:
    q = {n: quantize(weights[n], scheme, clips.get(n)) for n in names}
    return QuantizedWeights(scheme, q, {n: w for n, w in weights.items() if n not in q})


def gptq_weights(weights: dict[str, torch.Tensor], names: list[str], scheme: QuantScheme,
                 clips: dict[str, torch.Tensor], stats: Any, col_scales: Mapping[str, torch.Tensor]) -> QuantizedWeights:
    """quantize_weights with error-compensated rounding for every linear that has input
    statistics (the others round to nearest)."""
    q = {n: (gptq_quantize(weights[n], stats.of(n).moment.dense(), scheme, clips.get(n), col_scales.get(n))
             if n in stats else quantize(weights[n], scheme, clips.get(n))) for n in names}
    return QuantizedWeights(scheme, q, {n: w for n, w in weights.items() if n not in q})


def torch_weights(model: ImportedModel) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.weights.items()}


def awq_weights(model: ImportedModel) -> dict[str, torch.Tensor]:
    """The weights as AWQ sees them: stacked experts as one [N, K] linear per expert (views)."""
    return unstack_experts(torch_weights(model))


def _stacked(cfg: ModelConfig, qw: QuantizedWeights) -> QuantizedWeights:
    """AWQ's per-expert results stacked back as the compiled model takes them."""
    if not cfg.num_experts:
        return qw
    return QuantizedWeights(qw.scheme, stack_experts(cfg, qw.quantized), stack_experts(cfg, qw.floats))


def quantized_names(weights: Mapping[str, Any], quantize_head: bool = False) -> list[str]:
    """The linears that get quantized (weights: torch tensors or numpy arrays)."""
    return [n for n, w in weights.items() if is_quantized_linear(n, tuple(w.shape), quantize_head)]


def check_group_sizes(weights: Mapping[str, Any], scheme: QuantScheme, quantize_head: bool = False) -> list[str]:
    """The quantized linears' names, after checking the group size divides each one's input
    dimension (an error names the layer and the sizes that work)."""
    names = quantized_names(weights, quantize_head)
    for n in names:
        scheme.check_layer(n, weights[n].shape[-1])
    return names


def quantized_shapes(cfg: ModelConfig, quantize_head: bool = False) -> dict[str, tuple[int, ...]]:
    """The [N, K] of every linear that gets quantized ([E, N, K] of stacked experts), from the config alone (a tied head
    quantized with --quantize-head is its own parameter, lm_head.weight)."""
    shapes = expected_shapes(cfg)
    if quantize_head and cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return {n: s for n, s in shapes.items() if is_quantized_linear(n, s, quantize_head)}  # type: ignore[misc]


def awq_graph(model: ImportedModel):
    """The graph AWQ finds its groups in: the model's, or for a mixture of experts its view with
    one linear per expert (compiler/models/moe.py)."""
    fam, cfg = family(model.config.model_type), model.config
    mod, named = fam.export_awq_view(cfg) if cfg.num_experts else fam.export_model(cfg, "float32",
                                                                                 get_target("host").target())
    return mod["score"], [n for n, _ in named]


def _output_loss(probe: Any) -> Callable[[ScalingGroup], Any] | None:
    """With a calibration probe (calibrate.BlockProbe), a norm's group is measured on the output of
    the submodule its consumers sit in (attention for q/k/v, the MLP for gate/up), as AWQ's
    reference does; linear → linear groups keep their consumers' output error from the Gram (the
    consumer is that submodule's last layer, so it is the same quantity)."""
    if probe is None:
        return None

    def loss(group: ScalingGroup):
        module = probe.module([c.weight for c in group.consumers]) if group.kind == "norm" else None
        return None if module is None else (lambda replaced: probe.loss(module, replaced))
    return loss


def awq_block(weights: Mapping[str, torch.Tensor], names: list[str], groups: list[ScalingGroup],
              qk_rows: Mapping[str, Any], stats: Any, scheme: QuantScheme, clip: bool = True,
              progress: bool = False, duo_scaling: bool = DUO_SCALING, gptq: bool = False) -> AWQResult:
    """AWQ on a set of weights (one block, or a whole small model): search and fold the scales
    of `groups`, search the clipping of `names`, quantize `names` (to nearest, or with `gptq`
    error-compensated rounding on the same grid: passes/gptq.py)."""
    t0 = time.perf_counter()
    quantized: Callable[[str], bool] = set(names).__contains__
    results = search_scales(groups, weights, stats, scheme, quantized, progress=progress, duo=duo_scaling,
                            output_loss=_output_loss(getattr(stats, "probe", None)))
    scaled = apply_scales(weights, groups, results)
    t1 = time.perf_counter()
    clips: dict[str, torch.Tensor] = {}
    col_scales = column_scales(weights, groups, results)
    if clip:
        clips = search_clip(scaled, names, stats, scheme, col_scales, qk_rows, progress=progress)
    t2 = time.perf_counter()
    qw = (gptq_weights(scaled, names, scheme, clips, stats, col_scales) if gptq
          else quantize_weights(scaled, names, scheme, clips))
    t3 = time.perf_counter()
    return AWQResult(qw, groups, results, clips, scaled, col_scales,
                     {"scale": t1 - t0, "clip": t2 - t1, "quantize": t3 - t2})


def awq_quantize(model: ImportedModel, scheme: QuantScheme, stats: CalibrationStats, clip: bool = True,
                 quantize_head: bool = False, progress: bool = True, duo_scaling: bool = DUO_SCALING,
                 gptq: bool = False) -> AWQResult:
    """AWQ on the whole model at once: find the scaling groups in the model's graph, search and
    fold their scales, search clipping ranges, quantize every linear weight. The result's weights
    and scaled weights are named as the compiled model's (stacked experts)."""
    weights = awq_weights(model)
    names = check_group_sizes(weights, scheme, quantize_head)
    check_finite_weights(weights, list(weights))
    func, param_names = awq_graph(model)
    groups = find_scaling_groups(func, param_names)
    if progress:
        _say_unscaled(func, param_names)
    result = awq_block(weights, names, groups, attention_qk_rows(func, param_names), stats, scheme, clip, progress,
                       duo_scaling, gptq)
    cfg = model.config
    if cfg.num_experts:
        result = dataclasses.replace(result, weights=_stacked(cfg, result.weights),
                                     scaled=stack_experts(cfg, result.scaled))
    return result


def quantized_blocks(model: ImportedModel, quant: Any, func: Any, param_names: list[str],
                     progress: bool = True) -> Iterator[QuantizedWeights]:
    """The model's weights part by part (embedding, each decoder block, final norm and head), each
    quantized as soon as it is read: round to nearest, or AWQ with the block calibrated on the
    hidden states of the blocks before it. `func`/`param_names`: the exported model's `score`
    function, where AWQ finds its scaling groups. `quant`: build.QuantConfig."""
    from tqdm import tqdm

    from .calibrate import Calibration

    cfg, scheme = model.config, quant.scheme
    tied_head = quant.quantize_head and cfg.tie_word_embeddings
    head_searched = quant.quantize_head and not cfg.tie_word_embeddings
    calibration = groups = qk_rows = None
    searched: dict[str, float] = {}
    if quant.method in AWQ_METHODS:
        if cfg.num_experts:  # the compiled graph stacks the experts: AWQ traces its per-expert view
            func, param_names = awq_graph(model)
        groups = find_scaling_groups(func, param_names)
        if progress:
            _say_unscaled(func, param_names)
        qk_rows = attention_qk_rows(func, param_names)
        calibration = Calibration(model, quant.calibration, head_searched)
    try:
        for key, names in tqdm(weight_parts(cfg), desc=f"{quant.method} {scheme.name}", unit="block", disable=not progress,
                               file=sys.stderr):
            weights = {n: torch.from_numpy(model.weights[n]) for n in names}
            if key == "head" and tied_head:  # the head's own copy of the embedding, rounded to nearest
                weights["lm_head.weight"] = torch.from_numpy(model.weights["embed_tokens.weight"])
            targets = [n for n in weights if is_quantized_linear(n, tuple(weights[n].shape), quant.quantize_head)]
            if calibration is None or not targets or (key == "head" and not head_searched):
                part = quantize_weights(weights, targets, scheme, {})
            else:
                stats = calibration.head(weights["norm.weight"]) if key == "head" else calibration.block(key, weights)
                weights = unstack_experts(weights)  # AWQ's names (one linear per expert); the same tensors
                linears = [n for n in weights if is_quantized_linear(n, tuple(weights[n].shape), quant.quantize_head)]
                result = awq_block(weights, linears, [g for g in groups if g.producer in weights], qk_rows, stats,
                                   scheme, progress=False, gptq=quant.method == "awq+gptq")
                for phase, sec in result.seconds.items():
                    searched[phase] = searched.get(phase, 0.0) + sec
                part = _stacked(cfg, result.weights)
                del stats, result
            del weights  # before the next block is read: one block alive at a time
            yield part
            del part
        if calibration is not None:
            calibration.finish()
            if progress:
                print(_awq_times(calibration, searched), file=sys.stderr)
    except BaseException:
        if calibration is not None:
            calibration.abandon()
        raise


def _say_unscaled(func: Any, param_names: list[str]) -> None:
    for line in unscaled_channels(func, param_names):
        print(f"awq: {line}", file=sys.stderr)


def _awq_times(calibration: Any, searched: dict[str, float]) -> str:
    """Where an AWQ compile's time went; the per-sample figure projects other --calib-samples."""
    forward = calibration.seconds.get("forward")
    calib = ("calibration read from the cache" if forward is None else
             f"calibration {forward:.0f} s ({forward / calibration.n_samples:.2f} s per sample)")
    return (f"awq: {calib}, scale search {searched.get('scale', 0):.0f} s, clip search {searched.get('clip', 0):.0f} s, "
            f"quantize {searched.get('quantize', 0):.0f} s")


def rtn(model: ImportedModel, scheme: QuantScheme, quantize_head: bool = False) -> QuantizedWeights:
    return rtn_quantize(torch_weights(model), scheme, quantize_head)


def quantize_model(model: ImportedModel, method: str, scheme: QuantScheme, quantize_head: bool = False,
                   stats: CalibrationStats | None = None) -> QuantizedWeights:
    """The whole model's quantized weights in memory (tests and small models): round to nearest,
    or AWQ (method "awq" or "awq+gptq") from calibration `stats`. A tied head quantized with
    `quantize_head` gets its own copy, rounded to nearest (the embedding stays float)."""
    weights = torch_weights(model)
    tied_head = quantize_head and "lm_head.weight" not in weights
    if tied_head:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    if method == "rtn":
        return rtn_quantize(weights, scheme, quantize_head)
    result = awq_quantize(model, scheme, stats, clip=True, quantize_head=quantize_head,
                          gptq=method == "awq+gptq").weights
    if not tied_head:
        return result
    head = {"lm_head.weight": quantize(weights["lm_head.weight"], scheme)}
    return QuantizedWeights(scheme, {**result.quantized, **head}, result.floats)

"""Quantize an imported model: round-to-nearest, or AWQ (scale search, then clip search) on
calibration statistics. The result is passes/quantizer.QuantizedWeights either way.

    stats = calibrate(model, load_samples(model))          # one float forward pass, in TVM
    qw = awq_quantize(model, QuantScheme(group_size=64), stats)
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import torch

from awqc.passes.awq_clip import search_clip
from awqc.passes.awq_scale import (ScaleResult, ScalingGroup, apply_scales, attention_qk_rows, check_finite_weights,
                                   column_scales, find_scaling_groups, search_scales)
from awqc.passes.quantizer import QuantizedWeights, QuantScheme, is_quantized_linear, quantize, rtn_quantize

from .calibrate import CalibrationStats
from .llama import export_model
from .model_import import ImportedModel
from .targets import get_target

METHODS = ("float", "rtn", "awq", "awq-scale")


@dataclasses.dataclass
class AWQResult:
    weights: QuantizedWeights  # scaled, clipped (when searched) and quantized
    groups: list[ScalingGroup]
    scales: dict[int, ScaleResult]  # group index -> searched scales
    clip: dict[str, torch.Tensor]  # weight -> clip ratio per (row, group)
    scaled: dict[str, torch.Tensor]  # float weights with the scales folded in
    seconds: dict[str, float]  # scale (search + apply), clip, quantize

    def scale_only(self) -> QuantizedWeights:
        """The same scales without the clipping: AWQ's scale search alone."""
        return quantize_weights(self.scaled, list(self.weights.quantized), self.weights.scheme, {})


def quantize_weights(weights: dict[str, torch.Tensor], names: list[str], scheme: QuantScheme,
                     clips: dict[str, torch.Tensor]) -> QuantizedWeights:
    q = {n: quantize(weights[n], scheme, clips.get(n)) for n in names}
    return QuantizedWeights(scheme, q, {n: w for n, w in weights.items() if n not in q})


def torch_weights(model: ImportedModel) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.weights.items()}


def quantized_names(weights: Mapping[str, Any], quantize_head: bool = False) -> list[str]:
    """The linears that get quantized (weights: torch tensors or numpy arrays)."""
    return [n for n, w in weights.items() if is_quantized_linear(n, tuple(w.shape), quantize_head)]


def check_group_sizes(weights: Mapping[str, Any], scheme: QuantScheme, quantize_head: bool = False) -> list[str]:
    """The quantized linears' names, after checking the group size divides each one's input
    dimension (an error names the layer and the sizes that work)."""
    names = quantized_names(weights, quantize_head)
    for n in names:
        scheme.check_layer(n, weights[n].shape[1])
    return names


def _score_function(model: ImportedModel):
    mod, named = export_model(model.config, "float32", get_target("host").target())
    return mod["score"], [n for n, _ in named]


def awq_quantize(model: ImportedModel, scheme: QuantScheme, stats: CalibrationStats, clip: bool = True,
                 quantize_head: bool = False, progress: bool = True, duo_scaling: bool = False) -> AWQResult:
    """AWQ: find the scaling groups in the model's graph, search and fold their scales, search
    clipping ranges, quantize every linear weight."""
    t0 = time.perf_counter()
    weights = torch_weights(model)
    names = check_group_sizes(weights, scheme, quantize_head)
    check_finite_weights(weights, list(weights))
    func, param_names = _score_function(model)
    groups = find_scaling_groups(func, param_names)
    quantized: Callable[[str], bool] = set(names).__contains__
    results = search_scales(groups, weights, stats, scheme, quantized, progress=progress, duo=duo_scaling)
    scaled = apply_scales(weights, groups, results)
    t1 = time.perf_counter()
    clips: dict[str, torch.Tensor] = {}
    if clip:
        clips = search_clip(scaled, names, stats, scheme, column_scales(weights, groups, results),
                            attention_qk_rows(func, param_names), progress=progress)
    t2 = time.perf_counter()
    qw = quantize_weights(scaled, names, scheme, clips)
    t3 = time.perf_counter()
    return AWQResult(qw, groups, results, clips, scaled, {"scale": t1 - t0, "clip": t2 - t1, "quantize": t3 - t2})


def rtn(model: ImportedModel, scheme: QuantScheme, quantize_head: bool = False) -> QuantizedWeights:
    return rtn_quantize(torch_weights(model), scheme, quantize_head)

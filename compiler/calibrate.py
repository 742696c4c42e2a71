"""Calibration: text → token samples → per-input-channel statistics of every linear layer's input.

The float model runs compiled by TVM (the `calibrate` function of passes/calibration_taps.py), one
sample at a time with a fresh KV-cache sequence, and the statistics are accumulated in torch as
the samples stream by, so memory does not grow with the number of samples:

* `abs_mean[k]` = mean |x_k| over every calibration token (AWQ's activation scale s_x);
* `gram` = mean x xᵀ, the input's second-moment matrix G/T. AWQ's loss for weights W' replacing W
  on inputs X is ||X (W' - W)ᵀ||² = T · sum((E @ gram) * E) with E = W' - W, so the scale and clip
  searches never need the activations themselves.

The Gram costs T·K² per input, ~13 TFLOP for SmolLM2 on 65k tokens, which is minutes on two
cores, so by default it is estimated from `gram_tokens` tokens drawn at random (seeded) from each
sample; `abs_mean` always uses every token. `gram_tokens=None` uses all of them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from awqc.passes.awq_scale import torch_threads
from awqc.passes.calibration_taps import CALIBRATE, Tap, add_calibration_function
from awqc.passes.quantizer import is_quantized_linear

from .model_import import ImportedModel
from .targets import TargetSpec, get_target
from .text_data import default_calibration_text, read_text, token_windows, tokenize

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_GRAM_TOKENS = 128  # per sample: 16k tokens for the Gram at the defaults
_PAGE_SIZE = 16


class CalibrationError(ValueError):
    """Calibration cannot run or produced unusable activations (the message names the layer)."""


@dataclasses.dataclass
class InputStats:
    """Statistics of one tensor that feeds the linears `consumers` (weight names)."""

    consumers: tuple[str, ...]
    abs_mean: torch.Tensor  # [K] float32, mean |x| per input channel
    gram: torch.Tensor  # [K, K] float32, mean x xᵀ
    n_tokens: int
    n_gram_tokens: int


@dataclasses.dataclass
class CalibrationStats:
    inputs: list[InputStats]
    n_samples: int
    seq_len: int
    seconds: dict[str, float]  # wall time of the phases: compile, forward, stats

    def __post_init__(self) -> None:
        self._by_weight = {w: s for s in self.inputs for w in s.consumers}

    def of(self, weight: str) -> InputStats:
        """The statistics of the input of linear layer `weight`."""
        if weight not in self._by_weight:
            raise KeyError(f"no calibration statistics for {weight}")
        return self._by_weight[weight]

    def __contains__(self, weight: str) -> bool:
        return weight in self._by_weight

    def save(self, path: str | Path) -> None:
        torch.save({"inputs": [dataclasses.asdict(s) for s in self.inputs], "n_samples": self.n_samples,
                    "seq_len": self.seq_len, "seconds": self.seconds}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        d = torch.load(str(path))
        inputs = [InputStats(**{**s, "consumers": tuple(s["consumers"])}) for s in d["inputs"]]
        return cls(inputs, d["n_samples"], d["seq_len"], d["seconds"])


# -- samples ---------------------------------------------------------------------------------------
def calibration_samples(encode: Callable[[str], list[int]], text: str | None = None,
                        n_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN) -> list[list[int]]:
    """`n_samples` windows of `seq_len` tokens spread over the text (default: the Python library
    reference). A text shorter than one sample is an error that names the minimum."""
    if n_samples < 1:
        raise CalibrationError(f"the number of calibration samples must be positive, got {n_samples}")
    text = default_calibration_text() if text is None else text
    windows = token_windows(tokenize(encode, text), seq_len, n_samples, what="calibration text",
                            hint=" (--calib-text FILE, or a shorter --calib-seq-len)")
    if len(windows) < n_samples:
        print(f"calibrate: the text holds {len(windows)} samples of {seq_len} tokens, fewer than the "
              f"{n_samples} asked; using {len(windows)}", file=sys.stderr)
    return windows


def hf_encoder(tokenizer) -> Callable[[str], list[int]]:
    """Token ids of a text without special tokens, from a transformers tokenizer."""
    return lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]


def load_samples(model: ImportedModel, calib_text: str | Path | None = None, n_samples: int = DEFAULT_SAMPLES,
                 seq_len: int = DEFAULT_SEQ_LEN) -> list[list[int]]:
    text = None if calib_text is None else read_text(calib_text)
    return calibration_samples(hf_encoder(model.tokenizer), text, n_samples, seq_len)


# -- the compiled calibration function -------------------------------------------------------------
class CalibrationRunner:
    """The model's `calibrate` function compiled for the host, with its weights loaded."""

    def __init__(self, model: ImportedModel, select: Callable[[str], bool], max_len: int,
                 spec: TargetSpec | None = None):
        import tvm
        from tvm.runtime import ShapeTuple
        from tvm.runtime.vm import VirtualMachine

        from .llama import export_model
        from .pipeline import relax_pipeline

        spec = spec or get_target("host")
        mod, named = export_model(model.config, "float32", spec.target())
        self.param_names = [n for n, _ in named]
        mod, self.taps = add_calibration_function(mod, self.param_names, select)
        ex = tvm.compile(mod, spec.target(), relax_pipeline=relax_pipeline(spec))
        self.device = tvm.cpu()
        self.vm = VirtualMachine(ex, self.device)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(model.weights[n], dtype="float32"), self.device)
                       for n in self.param_names]
        self._shape = ShapeTuple
        self._tensor = tvm.runtime.tensor
        self._kv_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._kv_remove = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._kv_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._kv_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self.kv = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([1]), ShapeTuple([max_len]), ShapeTuple([max_len]), ShapeTuple([_PAGE_SIZE]))
        self.max_len = max_len

    def run(self, ids: Sequence[int]) -> list[torch.Tensor]:
        """The tapped activations of one sample, each [len(ids), K] float32 (in `self.taps` order)."""
        if len(ids) > self.max_len:
            raise CalibrationError(f"a sample of {len(ids)} tokens exceeds the compiled length {self.max_len}")
        self._kv_add(self.kv, 0)  # a fresh sequence: every sample starts at position 0
        try:
            self._kv_begin(self.kv, self._shape([0]), self._shape([len(ids)]))
            data = self._tensor(np.asarray([ids], dtype=np.int32), self.device)
            outs = self.vm[CALIBRATE](data, self.kv, self.params)
            self._kv_end(self.kv)
        finally:
            self._kv_remove(self.kv, 0)
        # Zero-copy views of the VM's outputs: valid until the next call, which is all the stats need.
        return [torch.from_dlpack(o).reshape(len(ids), tap.features) for o, tap in zip(outs, self.taps)]


# -- accumulation ----------------------------------------------------------------------------------
class _Accumulator:
    """Running sums for one tap; the Gram in float32 via addmm (per-sample sums of ≤512 tokens are
    exact enough, and float64 would double the time)."""

    def __init__(self, tap: Tap):
        self.tap = tap
        self.abs_sum = torch.zeros(tap.features, dtype=torch.float64)
        self.gram = torch.zeros(tap.features, tap.features, dtype=torch.float32)
        self.n = 0
        self.n_gram = 0

    def add(self, x: torch.Tensor, rows: torch.Tensor | None, sample: int) -> None:
        # sum |x| per channel without a temporary copy of x; NaN/inf in x show up in it
        abs_sum = torch.linalg.vector_norm(x, ord=1, dim=0)
        if not bool(torch.isfinite(abs_sum).all()):
            raise CalibrationError(
                f"the input of {', '.join(self.tap.consumers)} has NaN or inf on calibration sample {sample}; "
                "the float model overflows on this text (check the weights, or calibrate on other text)")
        self.abs_sum += abs_sum
        self.n += x.shape[0]
        xs = x if rows is None else x.index_select(0, rows)
        torch.addmm(self.gram, xs.T, xs, out=self.gram)
        self.n_gram += xs.shape[0]

    def result(self) -> InputStats:
        return InputStats(self.tap.consumers, (self.abs_sum / max(self.n, 1)).float(),
                          self.gram / max(self.n_gram, 1), self.n, self.n_gram)


def collect_stats(runner: CalibrationRunner, samples: Sequence[Sequence[int]],
                  gram_tokens: int | None = DEFAULT_GRAM_TOKENS, seed: int = 0,
                  progress: bool = True) -> CalibrationStats:
    """Run every sample through the compiled model and accumulate the statistics of each tap.

    The taps of a sample are split over one Python thread per core, each running torch
    single-threaded (see awq_scale.thread_map for why); TVM's forward pass keeps its own threads."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from tqdm import tqdm

    accs = [_Accumulator(t) for t in runner.taps]
    gen = torch.Generator().manual_seed(seed)
    t_forward = t_stats = 0.0
    cpu0 = time.process_time()
    workers = os.cpu_count() or 1
    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        for i, ids in enumerate(tqdm(samples, desc="calibrate", unit="sample", disable=not progress,
                                     file=sys.stderr)):
            t0 = time.perf_counter()
            acts = runner.run(ids)
            t1 = time.perf_counter()
            rows = None
            if gram_tokens is not None and gram_tokens < len(ids):
                rows = torch.randperm(len(ids), generator=gen)[:gram_tokens].sort().values
            # Largest first, so the threads finish together.
            order = sorted(range(len(accs)), key=lambda j: -accs[j].tap.features)
            futures = {j: pool.submit(accs[j].add, acts[j], rows, i) for j in order}
            # Wait for all (every view of this sample's outputs is consumed before the next run),
            # then report the first failing tap in model order, whichever thread finished first.
            wait(futures.values())
            for j in range(len(accs)):
                futures[j].result()
            del acts
            t_forward += t1 - t0
            t_stats += time.perf_counter() - t1
    seq_len = max(len(s) for s in samples)
    return CalibrationStats([a.result() for a in accs], len(samples), seq_len,
                            {"forward": t_forward, "stats": t_stats, "cpu": time.process_time() - cpu0})


def quantized_selector(model: ImportedModel, quantize_head: bool = False) -> Callable[[str], bool]:
    """Which linears calibration taps: those that will be quantized."""
    return lambda name: name in model.weights and is_quantized_linear(name, tuple(model.weights[name].shape),
                                                                     quantize_head)


def calibrate(model: ImportedModel, samples: Sequence[Sequence[int]], quantize_head: bool = False,
              gram_tokens: int | None = DEFAULT_GRAM_TOKENS, spec: TargetSpec | None = None,
              progress: bool = True) -> CalibrationStats:
    """Compile the model's calibration function and collect the statistics of every quantized
    linear's input over `samples`."""
    if not samples:
        raise CalibrationError("no calibration samples")
    t0 = time.perf_counter()
    runner = CalibrationRunner(model, quantized_selector(model, quantize_head), max(len(s) for s in samples), spec)
    t_compile = time.perf_counter() - t0
    stats = collect_stats(runner, samples, gram_tokens, progress=progress)
    stats.seconds["compile"] = t_compile
    return stats


def calibration_stats(model: ImportedModel, calib_text: str | Path | None = None, n_samples: int = DEFAULT_SAMPLES,
                      seq_len: int = DEFAULT_SEQ_LEN, quantize_head: bool = False,
                      gram_tokens: int | None = DEFAULT_GRAM_TOKENS, cache: str | Path | None = None,
                      progress: bool = True) -> CalibrationStats:
    """The statistics of `model` on its calibration text, read from `cache` if that file exists
    (else computed, and written there when a path is given)."""
    if cache is not None and Path(cache).is_file():
        return CalibrationStats.load(cache)
    stats = calibrate(model, load_samples(model, calib_text, n_samples, seq_len), quantize_head, gram_tokens,
                      progress=progress)
    if cache is not None:
        stats.save(cache)
    return stats

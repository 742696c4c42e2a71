"""Compile an imported model for a target and write the artifact directory atomically, with the
weights streamed: the model is exported to Relax once (that one IRModule serves AWQ's graph
analysis and the lowering), and its weights are read, quantized, packed and appended to the
artifact one decoder block at a time, so memory is bounded by one block, not by the model.

    check -o, config, group sizes, chat template         (before any work)
    export_model                                         (once)
    for each block: read → [calibrate → scale → clip] → quantize → pack → append → free
    quantize_linear + tvm.compile → lib.so; tokenizer, manifest; atomic rename into place
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import tvm

from awqc.passes.quantize_linear import quantize_linear, quantized_param_names
from awqc.passes.quantizer import QuantizationError, QuantizedWeights, QuantScheme
from awqc.runtime.artifact import FORMAT, LIBRARY, TOKENIZER_DIR, WEIGHTS, hash_tree, write_manifest
from awqc.runtime.sampling import generation_defaults
from awqc.schedules.layouts import K8, DotLayout, Layout, choose_layout, get_layout

from .calibrate import CalibrationSettings
from .config import ModelConfig, for_context_window
from .model_import import ImportedModel, weight_parts
from .models import family
from .output import OutputError, check_output, install, make_staging_dir, staging_path
from .pipeline import relax_pipeline, w4_scheduler
from .targets import TargetSpec
from .tensor_file import SafetensorsWriter

SUPPORTED_DTYPES = ("float32", "float16")

# A part of the model's weights as they stream to the artifact: (quantized linears as
# (q, scale, zero), float parameters).
Part = tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What `awqc compile --quant` asks for."""
    scheme: QuantScheme
    method: str  # "rtn" | "awq"
    quantize_head: bool = False
    calibration: CalibrationSettings = CalibrationSettings()  # AWQ only


@dataclasses.dataclass(frozen=True)
class W4Backend:
    """How a target runs int4 linears: the packing layout (its pack function and kernels,
    schedules/layouts.py) and the scheduler for those kernels. One place maps target → both,
    so the weights are always packed in the layout the compiled kernels read."""
    layout: Layout
    schedule: Callable


def check_int8_activations(spec: TargetSpec, scheme: QuantScheme | None, dtype: str) -> str | None:
    """For a W4A8 scheme, the target's integer dot-product ISA (schedules/w4a8_cpu.py); refuses
    a target or dtype that cannot run it. None for every other scheme."""
    if scheme is None or scheme.act_bits != 8:
        return None
    from awqc.schedules.w4a8_cpu import dot_isa

    isa = dot_isa(spec.tvm_target) if spec.device == "cpu" else None
    plain = dataclasses.replace(scheme, act_bits=16).name
    if isa is None:
        raise QuantizationError(
            f"{scheme.name} (int8 activations) runs on CPU targets with integer dot products (x86 with AVX2 "
            f"or AVX-512 VNNI, aarch64 with dotprod: --target arm-neon-dotprod), not on target {spec.name}; "
            f"use {plain} (float activations) there")
    if dtype != "float32":
        raise QuantizationError(f"{scheme.name} kernels take float32 activations; compile with --dtype float32 "
                                f"or use {plain}")
    return isa


def check_experts(cfg: ModelConfig, scheme: QuantScheme | None) -> None:
    """A mixture of experts quantizes to W4A16 only: its experts' int4 kernel takes float activations."""
    if cfg.num_experts and scheme is not None and scheme.act_bits == 8:
        plain = dataclasses.replace(scheme, act_bits=16).name
        raise QuantizationError(f"{scheme.name} (int8 activations) is not supported for mixture-of-experts models "
                                f"({cfg.model_type}) yet; use {plain}")


def w4_backend(spec: TargetSpec, scheme: QuantScheme, shapes: Iterable[tuple[int, int]]) -> W4Backend:
    """CUDA: layout k8 and schedules/cuda.py. CPU: the layout and knobs of the target's tuning
    record (schedules/records/, `awqc tune`) or the defaults; k8 if the layout cannot hold
    every quantized weight `shapes` ([N, K]) of this model. W4A8 schemes: layout d16 (VNNI, every
    N a multiple of 16) or d8, and the integer dot-product kernels of the target's ISA."""
    if spec.device == "cuda":
        return W4Backend(K8, w4_scheduler(spec))
    from awqc.schedules.tuning import record_for
    from awqc.schedules.w4_cpu import cpu_scheduler

    record = record_for(spec)
    shapes = list(shapes)
    isa = check_int8_activations(spec, scheme, "float32")
    if isa is not None:
        from awqc.schedules.w4a8_cpu import dot_scheduler

        # 512-bit dot products where the CPU has VNNI and every weight's rows fill 16 lanes: the
        # prefill GEMM runs ~2x faster than in 256-bit vectors, the GEMV as fast (bench/int4_kernels.py)
        wide = DotLayout(16)
        layout = wide if isa == "vnni" and all(wide.supports(k, n, scheme.group_size) for n, k in shapes) \
            else DotLayout(8)
        bad = [f"{n}x{k}" for n, k in shapes if not layout.supports(k, n, scheme.group_size)]
        if bad:
            raise QuantizationError(f"{scheme.name} needs every quantized weight's output size to be a "
                                    f"multiple of {layout.lanes}; these are not: {', '.join(bad)}")
        return W4Backend(layout, dot_scheduler(layout, isa))
    layout = choose_layout(get_layout(record.layout), shapes, scheme.group_size)
    return W4Backend(layout, cpu_scheduler(layout, record.gemv_knobs, record.gemm_knobs))


def compile_library(mod: tvm.IRModule, names: list[str], spec: TargetSpec, scheme: QuantScheme | None,
                    quantized: set[str], backend: W4Backend | None) -> Any:
    """tvm.compile the exported model for the target, its `quantized` linears lowered to int4
    kernels of `backend`."""
    if quantized:
        mod = quantize_linear(mod, names, quantized, scheme.group_size, backend.schedule, backend.layout)
    if spec.device == "cuda":
        from .cuda_package import source_codegen

        with source_codegen():  # kernels stay CUDA source; export compiles them with nvcc
            return tvm.compile(mod, spec.target(), relax_pipeline=relax_pipeline(spec))
    return tvm.compile(mod, spec.target(), relax_pipeline=relax_pipeline(spec))


def quantization_info(scheme: QuantScheme | None, method: str | None, quantized: Iterable[str],
                      layout: Layout = K8) -> dict[str, Any] | None:
    if scheme is None:
        return None
    return {"method": method, "scheme": scheme.name, "bits": scheme.bits, "group_size": scheme.group_size,
            "symmetric": scheme.symmetric, "layout": layout.name, "quantized": sorted(quantized)}


def tokenizer_info(model: ImportedModel) -> dict[str, Any]:
    tok = model.tokenizer
    eos = list(model.config.eos_token_ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(int(tok.eos_token_id))
    info = {"eos_token_ids": eos, "bos_token_id": model.config.bos_token_id,
            "bos_token": tok.bos_token or "", "eos_token": tok.eos_token or "",
            "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None}
    if info["chat_template"]:
        # The template is the checkpoint author's code and runs at `awqc run --chat`: a syntax error or a
        # sandbox escape is a compile error (ChatTemplateError is a ValueError), not a surprise on a device.
        from awqc.runtime.chat_template import check_chat_template

        check_chat_template(info["chat_template"], model.source, info["bos_token"], info["eos_token"])
    return info


def compile_artifact(out: Path, model: ImportedModel, spec: TargetSpec, dtype: str, context_window: int,
                     quant: QuantConfig | None = None, force: bool = False, progress: bool = True) -> Path:
    """Compile `model` for `spec` and write the artifact to `out`, streaming the weights block by
    block (quantized by `quant`: round to nearest, or AWQ calibrated and searched per block);
    nothing is left at `out` if anything fails."""
    from .awq import quantized_blocks, quantized_shapes

    model = dataclasses.replace(model, config=for_context_window(model.config, context_window))
    scheme = quant.scheme if quant else None
    shapes = quantized_shapes(model.config, quant.quantize_head) if quant else {}
    for name, shape in shapes.items():
        scheme.check_layer(name, shape[-1])  # before the minutes of calibration

    def parts(func: Any, names: list[str]) -> Iterator[Part]:
        if quant is None:
            for _, group in weight_parts(model.config):
                yield {}, {n: model.weights[n] for n in group}
            return
        for qw in quantized_blocks(model, quant, func, names, progress):
            yield qw.quantized, qw.floats
            del qw  # before the next block is read

    method = quant.method if quant else None
    return _build(out, model, spec, dtype, context_window, force, scheme, method, shapes, parts)


def write_artifact(out: Path, model: ImportedModel, spec: TargetSpec, dtype: str, context_window: int,
                   force: bool = False, quant: QuantizedWeights | None = None, method: str | None = None) -> Path:
    """compile_artifact for weights quantized beforehand in memory (`quant`; `method` is recorded,
    e.g. 'rtn'), or float weights: for tests and small models."""
    if quant is None:
        return compile_artifact(out, model, spec, dtype, context_window, force=force, progress=False)
    model = dataclasses.replace(model, config=for_context_window(model.config, context_window))
    shapes = {n: tuple(q.shape) for n, (q, _, _) in quant.quantized.items()}
    return _build(out, model, spec, dtype, context_window, force, quant.scheme, method, shapes,
                  lambda _func, _names: iter([(quant.quantized, quant.floats)]))


def prefill_chunk(cfg: ModelConfig, context_window: int) -> int:
    """Tokens per prefill call: at most 512, and no more than a sliding window, because the KV
    cache's attention within a chunk is causal over the whole chunk (the window limits only what a
    chunk sees of the cache), which is sliding-window attention only while the chunk fits it."""
    return min(context_window, 512, cfg.sliding_window or 512)


def _build(out: Path, model: ImportedModel, spec: TargetSpec, dtype: str, context_window: int, force: bool,
           scheme: QuantScheme | None, method: str | None, shapes: dict[str, tuple[int, int]],
           parts: Callable[[Any, list[str]], Iterable[Part]]) -> Path:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")
    check_output(out, force, [Path(model.source)])
    check_int8_activations(spec, scheme, dtype)
    check_experts(model.config, scheme)
    # stacked experts are always k8, read by their own kernel (w4_expert_matmul)
    linears = [s for s in shapes.values() if len(s) == 2]
    backend = w4_backend(spec, scheme, linears) if scheme is not None else None
    layout = backend.layout if backend else K8
    tokenizer = tokenizer_info(model)  # checks the chat template
    quantized = set(shapes)
    mod, named = family(model.config.model_type).export_model(model.config, dtype, spec.target(),
                                                           separate_head="lm_head.weight" in quantized)
    names = [n for n, _ in named]
    param_names = quantized_param_names(names, quantized)
    tmp = staging_path(out)
    try:
        make_staging_dir(tmp)
        _write_weights(tmp / WEIGHTS, parts(mod["score"], names), param_names, dtype, layout)
        ex = compile_library(mod, names, spec, scheme, quantized, backend)
        kernels = None
        if spec.device == "cuda":  # CUDA kernels embedded as an nvcc fatbin (compiler/cuda_package.py)
            from .cuda_package import export_cuda_library

            kernels = export_cuda_library(ex, tmp / LIBRARY, spec)
        else:  # object files go inside tmp, so an interrupt leaves none in the system temp dir
            (tmp / ".build").mkdir()
            ex.export_library(str(tmp / LIBRARY), fcompile=spec.fcompile(), workspace_dir=str(tmp / ".build"))
            shutil.rmtree(tmp / ".build", ignore_errors=True)
        model.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        manifest = {
            "format": FORMAT,
            "awqc_version": importlib.metadata.version("awqc"),
            "tvm_version": tvm.__version__,
            "target": {"name": spec.name, "tvm": spec.tvm_target, "arch": spec.arch, "device": spec.device,
                       **({"cuda": kernels} if kernels else {})},
            "model": model.config.to_dict(),
            "source": model.source,
            "dtype": dtype,
            "quantization": quantization_info(scheme, method, quantized, layout),
            "context_window": context_window,
            "prefill_chunk": prefill_chunk(model.config, context_window),
            "params": param_names,
            "tokenizer": tokenizer,
            # a Hugging Face directory's generation_config.json; a GGUF has none
            "generation": generation_defaults(Path(model.source) if Path(model.source).is_dir() else None),
            "files": hash_tree(tmp),
        }
        write_manifest(tmp, manifest)
        _make_readable(tmp)
        install(tmp, out, force)
    except OSError as err:  # a full disk, a vanished directory: say so, leave nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"writing the artifact failed: {err.strerror or err} ({err.filename or tmp}); "
                          f"nothing was left at {out}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(path: Path, parts: Iterable[Part], names: list[str], dtype: str, layout: Layout) -> None:
    """Append each part's tensors to the weights file as it arrives: floats cast to `dtype`, int4
    weights packed in `layout`. Exactly the library's parameters `names` must arrive."""
    writer = SafetensorsWriter(path, names)
    try:
        for part in parts:
            _write_part(writer, part, set(names), dtype, layout)
            del part  # before the next part is read: one block alive at a time
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_part(writer: SafetensorsWriter, part: Part, wanted: set[str], dtype: str, layout: Layout) -> None:
    def cast(a: Any) -> np.ndarray:
        a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        return a.astype(dtype, copy=False) if a.dtype.kind == "f" else a

    quantized, floats = part
    for name, w in floats.items():
        if name in wanted:  # e.g. a tied embedding whose head copy was quantized
            writer.write(name, cast(w))
    for name, (q, scale, zero) in quantized.items():
        if q.dim() == 3:  # stacked experts: k8, its rows independent, so E * N rows packed at once
            e = q.shape[0]
            packed = [a.reshape(e, -1, a.shape[-1]) for a in
                      K8.pack(*(t.reshape(-1, t.shape[-1]).numpy() for t in (q, scale, zero)))]
        else:
            packed = layout.pack(q.numpy(), scale.numpy(), zero.numpy())
        for suffix, a in zip(("qweight", "scales", "zeros"), packed):  # in the layout's dtypes
            writer.write(f"{name}.{suffix}", a)


def _make_readable(root: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; an artifact is meant to be shared."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() or p.suffix == ".so" else 0o644)

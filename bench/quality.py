"""Quality of 4-bit quantization on the default model (SmolLM2-135M-Instruct): perplexity of float,
round-to-nearest, AWQ (scale + clip search) and AWQ + GPTQ rounding
(passes/gptq.py) at w4 g64 and g32, with the search time (calibration + search); prints a markdown
table. `--block-loss` adds both with the block-output loss (`awqc compile --awq-loss block`).

    python bench/quality.py                      # 40 windows x 512 tokens, 128 x 512 calibration
    python bench/quality.py --windows 20 --group-sizes 64

Evaluation texts: the Python tutorial, FAQ and HOWTOs (python3.11-doc) and the Jargon File
(jargon-text: English prose of another kind); calibration text: half the Python library reference,
half the fortunes' English prose (compiler/text_data.py; disjoint from both). Quantized weights are scored dequantized in the float
library compiled once (compiler/evaluate.py), so the table does not depend on the int4 kernels.

llama.cpp's Q4_0, Q4_1 and Q4_K_M of the same weights (bench/llamacpp.py: llama-quantize from the
float GGUF, with and without an importance matrix from llama-imatrix on the same calibration
samples) are scored the same way: their GGUF read back through awqc's importer (dequantized) into
the same float library, on the same windows. Their token embedding and output stay float, as the
table's LM head does, so only the decoder blocks' linears are quantized in every row; bpw counts
those linears as stored. `--no-llamacpp` leaves these rows out.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from awqc.compiler.calibrate import DEFAULT_PROBE_SAMPLES, CalibrationSettings, load_samples  # noqa: E402
from awqc.compiler.evaluate import QualityRun, QualitySettings, format_table, gap_closed, perplexity  # noqa: E402
from awqc.compiler.model_import import load_model  # noqa: E402
from awqc.passes.quantizer import QuantScheme  # noqa: E402

LLAMACPP_TYPES = ("Q4_0", "Q4_1", "Q4_K_M")


def llamacpp_rows(run: QualityRun, model: str, args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """One row per llama.cpp type, without and with an importance matrix, per domain; the gap is
    RTN w4g64's (the issue's cell), from `rows`."""
    from llamacpp import float_gguf, importance_matrix, linear_bits_per_weight, llama_bin, quantize

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = llama_bin()
    source = float_gguf(model, work, bin_dir)
    calib = work / "calibration.txt"  # the calibration samples awqc uses, as text
    samples = load_samples(run.model, None, args.calib_samples, args.calib_seq_len)
    calib.write_text("\n\n".join(run.model.tokenizer.decode(ids) for ids in samples))
    imatrix = importance_matrix(bin_dir, source, calib, work / "imatrix.dat", args.calib_samples, args.calib_seq_len)

    def ref(domain: str, method: str) -> float:
        return next(r["perplexity"] for r in rows if r["text"] == domain and r["method"] == method
                    and r["quant"] in ("–", "w4g64"))

    out = []
    for qtype in LLAMACPP_TYPES:
        for imat in (None, imatrix):
            name = f"{qtype}{'-imatrix' if imat else ''}"
            gguf = quantize(bin_dir, source, work / f"{name}.gguf", qtype, imatrix=imat, float_embedding=True)
            engine = run.float_engine.use(load_model(str(gguf)).weights)
            bpw = round(linear_bits_per_weight(gguf), 2)  # one read of the file, not one per domain
            for domain in args.domains:
                ppl = perplexity(engine, run.domain_windows(domain), desc=f"llama.cpp {name}").ppl
                f, r = ref(domain, "float"), ref(domain, "rtn")
                out.append({"text": domain, "method": f"llama.cpp{' +imatrix' if imat else ''}", "quant": qtype,
                            "bpw": bpw, "perplexity": ppl, "Δ vs float": ppl - f,
                            "RTN gap closed": f"{100 * gap_closed(f, r, ppl):.0f}%", "search s": None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32])
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of --window-len tokens (default 40)")
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--gram-tokens", type=int, default=128, help="tokens per sample for the Gram (0: all)")
    p.add_argument("--calib-stats", type=Path, default=None, help="calibration statistics cache file")
    p.add_argument("--domains", nargs="+", default=["python-docs", "jargon"],
                   help="evaluation texts (compiler/text_data.py EVAL_DOMAINS; default both)")
    p.add_argument("--block-loss", action="store_true",
                   help="also AWQ and AWQ+GPTQ with the block-output loss (awqc compile --awq-loss block): "
                        "rows awq/block, awq+gptq/block")
    p.add_argument("--block-loss-samples", type=int, default=DEFAULT_PROBE_SAMPLES,
                   help=f"samples the block loss runs on (default {DEFAULT_PROBE_SAMPLES})")
    p.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp's rows (and its build)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/awqc-quality"), help="llama.cpp's GGUFs go here")
    args = p.parse_args(argv)
    if args.model != "default" and not args.no_llamacpp and not Path(args.model).is_dir():
        p.error("llama.cpp's rows need the default model or a checkpoint directory; pass --no-llamacpp")

    t0 = time.perf_counter()
    model = load_model(args.model)
    t_load = time.perf_counter() - t0
    calibration = CalibrationSettings(None, args.calib_samples, args.calib_seq_len, args.gram_tokens or None,
                                      args.calib_stats, probe_samples=args.block_loss_samples)
    settings = QualitySettings(None, args.windows, args.window_len, calibration)
    run = QualityRun(model, settings)
    methods = ["float", "rtn", "awq", "awq+gptq"] + (["awq/block", "awq+gptq/block"] if args.block_loss else [])
    rows = []
    for domain in args.domains:
        for r in run.compare(methods,
                             [QuantScheme(group_size=g) for g in args.group_sizes], domain):
            bpw = None if r["quant"] == "–" else round(QuantScheme.parse(r["quant"]).bits_per_weight, 2)
            rows.append({"text": domain, "method": r["method"], "quant": r["quant"], "bpw": bpw,
                         **{k: v for k, v in r.items() if k not in ("method", "quant")},
                         "search s": None if r["search s"] is None else round(r["search s"])})
    if not args.no_llamacpp:
        rows += llamacpp_rows(run, args.model, args, rows)
    print(format_table(rows))
    tokens = len(run.windows) * args.window_len
    print(f"\n{args.model}: {len(run.windows)} evaluation windows x {args.window_len} tokens ({tokens} tokens) "
          f"per text (python-docs: the Python tutorial/FAQ/HOWTOs; jargon: the Jargon File); calibration {args.calib_samples} x {args.calib_seq_len} tokens "
          f"(half Python library reference, half fortunes' prose), Gram from {args.gram_tokens or args.calib_seq_len} tokens per sample; "
          f"search s = calibration ({run.calib_seconds:.0f} s, shared by all rows) + scale (+ clip) search"
          + (f"; /block rows: their own calibration forward + search, block loss on {args.block_loss_samples} samples."
             if args.block_loss else "."))
    if not args.no_llamacpp:
        print("llama.cpp rows: their gap is measured against awqc's RTN w4g64; llama-quantize falls back to other "
              "types for rows whose width its super-blocks (256) do not divide, so bpw is what the file holds.")
    print(f"load {t_load:.0f} s, total {time.perf_counter() - t0:.0f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

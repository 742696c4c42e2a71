"""llama.cpp's own tools as the benchmarks' baseline: the binaries (built from the source in the
llama-cpp-python sdist by scripts/build_llama_cpp.sh, cached under .cache/llama.cpp) and the
GGUFs they run, made from the same weights awqc compiles.

A float GGUF comes first: the default GGUF requantized to F32 (its Q4_1 weights dequantized, the
same floats awqc imports), a Hugging Face checkpoint through the same tree's convert_hf_to_gguf.py
(f16). Every quantized GGUF is made from it by llama-quantize.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def llama_bin() -> Path:
    """The directory of llama-bench, llama-quantize, llama-perplexity and llama-imatrix (built once)."""
    out = subprocess.run([str(ROOT / "scripts" / "build_llama_cpp.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")


def float_gguf(model: str, workdir: Path, bin_dir: Path) -> Path:
    """A float GGUF of the model's weights, made once."""
    if model == "default":
        from awqc.compiler.model_import import default_model_path

        out = workdir / "default.f32.gguf"
        if not out.is_file():
            _run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(default_model_path()), str(out), "F32"])
        return out
    out = workdir / f"{Path(model).name}.f16.gguf"
    if not out.is_file():
        convert = bin_dir.parents[1] / "convert_hf_to_gguf.py"
        _run([sys.executable, str(convert), model, "--outtype", "f16", "--outfile", str(out)])
    return out


def quantize(bin_dir: Path, source: Path, out: Path, qtype: str, *, pure: bool = False,
             imatrix: Path | None = None, float_embedding: bool = False) -> Path:
    """`source` quantized to `qtype` by llama-quantize, made once. `pure`: every tensor in qtype
    (else llama.cpp's own mix for the type); `float_embedding`: the token embedding and output
    tensors stay F32 (so only the decoder blocks' linears are quantized)."""
    if out.is_file():
        return out
    cmd = [str(bin_dir / "llama-quantize")]
    if pure:
        cmd.append("--pure")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if float_embedding:
        cmd += ["--token-embedding-type", "f32", "--output-tensor-type", "f32"]
    _run(cmd + [str(source), str(out), qtype])
    return out


def importance_matrix(bin_dir: Path, source: Path, text_file: Path, out: Path, chunks: int, ctx: int,
                      threads: int = 2) -> Path:
    """llama-imatrix's importance matrix of `source` on `chunks` windows of `ctx` tokens of the text."""
    if not out.is_file():
        _run([str(bin_dir / "llama-imatrix"), "-m", str(source), "-f", str(text_file), "-o", str(out),
              "--chunks", str(chunks), "-c", str(ctx), "-t", str(threads)])
    return out


def linear_bits_per_weight(gguf: Path) -> float:
    """Bits per weight of the decoder blocks' 2-D tensors (the linears), as stored in the file."""
    import gguf as gg

    tensors = [t for t in gg.GGUFReader(str(gguf)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)

"""llama.cpp's own tools as the benchmarks' baseline: the binaries (built from the source in the
llama-cpp-python sdist by scripts/build_llama_cpp.sh, cached under .cache/llama.cpp) and the
GGUFs they run, made from the same weights awqc compiles.

A float GGUF comes first: the default GGUF requantized to F32 (its Q4_1 weights dequantized, the
same floats awqc imports), a Hugging Face checkpoint through the same tree's convert_hf_to_gguf.py
(f16). Every quantized GGUF is made from it by llama-quantize.
"""
from __future__ import annotations

import hashlib
import json
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


def _identity(f: Path) -> str:
    """A small file's content hash (a calibration text is rewritten by every run); a large one's
    size and modification time (hashing a multi-GB GGUF per run would cost more than it saves)."""
    st = f.stat()
    if st.st_size <= 64 << 20:
        return hashlib.sha256(f.read_bytes()).hexdigest()
    return f"{f}:{st.st_size}:{st.st_mtime_ns}"


def _made(out: Path, cmd: list[str], inputs: list[Path]) -> Path:
    """`out` as `cmd` makes it from `inputs`: reused only when the same command made it from the
    same files (kept beside it in OUT.key), else remade, so a run with other settings or another
    calibration text never picks up a stale file."""
    key = hashlib.sha256(json.dumps([cmd, [_identity(f) for f in inputs]]).encode()).hexdigest()
    stamp = out.with_name(out.name + ".key")
    if out.is_file() and stamp.is_file() and stamp.read_text() == key:
        return out
    stamp.unlink(missing_ok=True)
    _run(cmd)
    stamp.write_text(key)
    return out


def float_gguf(model: str, workdir: Path, bin_dir: Path) -> Path:
    """A float GGUF of the model's weights, made once."""
    if model == "default":
        from awqc.compiler.model_import import default_model_path

        out, source = workdir / "default.f32.gguf", default_model_path()
        return _made(out, [str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(out), "F32"],
                     [Path(source)])
    out = workdir / f"{Path(model).name}.f16.gguf"
    convert = bin_dir.parents[1] / "convert_hf_to_gguf.py"
    return _made(out, [sys.executable, str(convert), model, "--outtype", "f16", "--outfile", str(out)],
                 sorted(Path(model).glob("*.safetensors")) + [Path(model) / "config.json"])


def quantize(bin_dir: Path, source: Path, out: Path, qtype: str, *, pure: bool = False,
             imatrix: Path | None = None, float_embedding: bool = False) -> Path:
    """`source` quantized to `qtype` by llama-quantize, made once. `pure`: every tensor in qtype
    (else llama.cpp's own mix for the type); `float_embedding`: the token embedding and output
    tensors stay F32 (so only the decoder blocks' linears are quantized)."""
    cmd = [str(bin_dir / "llama-quantize")]
    if pure:
        cmd.append("--pure")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if float_embedding:
        cmd += ["--token-embedding-type", "f32", "--output-tensor-type", "f32"]
    return _made(out, cmd + [str(source), str(out), qtype], [source] + ([imatrix] if imatrix else []))


def importance_matrix(bin_dir: Path, source: Path, text_file: Path, out: Path, chunks: int, ctx: int,
                      threads: int = 2) -> Path:
    """llama-imatrix's importance matrix of `source` on `chunks` windows of `ctx` tokens of the text."""
    return _made(out, [str(bin_dir / "llama-imatrix"), "-m", str(source), "-f", str(text_file), "-o", str(out),
                       "--chunks", str(chunks), "-c", str(ctx), "-t", str(threads)], [source, text_file])


def linear_bits_per_weight(gguf: Path) -> float:
    """Bits per weight of the decoder blocks' 2-D tensors (the linears), as stored in the file."""
    import gguf as gg

    tensors = [t for t in gg.GGUFReader(str(gguf)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)

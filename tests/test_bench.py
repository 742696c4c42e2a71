"""`awqc bench`: the output parsed as the format it claims, the tests and threads asked for, the
parameter count against transformers' model, and the refusals."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from awqc.compiler.cli import main
from awqc.runtime.bench import param_count


def test_param_count_equals_transformers(tiny_ckpt: Path, tiny_artifact: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt))
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert param_count(manifest["model"]) == sum(p.numel() for p in hf.parameters())


def test_json_rows(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(tiny_artifact), "-p", "16", "-n", "8", "-t", "1,2", "-r", "3", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["n_threads"], r["test"], r["n_prompt"], r["n_gen"]) for r in rows] == [
        (1, "pp16", 16, 0), (1, "tg8", 0, 8), (2, "pp16", 16, 0), (2, "tg8", 0, 8)]
    for r in rows:
        assert len(r["samples_ts"]) == 3 and all(x > 0 for x in r["samples_ts"])
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 3)
        assert r["model_size"] == (tiny_artifact / "weights.safetensors").stat().st_size


def test_markdown_and_csv(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(tiny_artifact), "-p", "8", "-n", "0", "-t", "1", "-r", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | size | params | target | threads | test | t/s |"
    assert len(lines) == 3 and lines[2].split("|")[6].strip() == "pp8"
    mean, sd = lines[2].split("|")[7].split("±")
    assert float(mean) > 0 and float(sd) >= 0
    assert main(["bench", str(tiny_artifact), "-p", "0", "-n", "4", "-t", "1", "-r", "2", "-o", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 1 and table[0]["test"] == "tg4" and float(table[0]["avg_ts"]) > 0


@pytest.mark.parametrize("argv, message", [(["-p", "100000"], "context window"), (["-r", "0"], "-r and -t"),
                                           (["-t", "x"], "comma-separated")])
def test_refusals(tiny_artifact: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    try:
        rc = main(["bench", str(tiny_artifact), *argv])
    except SystemExit as exit:  # argparse's own refusal of a malformed option
        rc = exit.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_llamacpp_files_are_remade_when_their_inputs_change(tmp_path: Path) -> None:
    """bench/llamacpp.py reuses a GGUF or imatrix only when the same command made it from the same
    inputs: another calibration text (or other flags) makes it again."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from llamacpp import _made

    text, out = tmp_path / "calib.txt", tmp_path / "imatrix.dat"
    text.write_text("first text")
    cmd = ["sh", "-c", f"cat {text} >> {out}"]  # appends: each run of the command shows
    _made(out, cmd, [text])
    _made(out, cmd, [text])
    assert out.read_text() == "first text"
    text.write_text("first text")  # rewritten with the same content (bench/quality.py does so every run)
    _made(out, cmd, [text])
    assert out.read_text() == "first text"
    text.write_text("other text")
    _made(out, cmd, [text])
    assert out.read_text() == "first textother text"
    _made(out, cmd + ["--flag"], [text])
    assert out.read_text().count("other text") == 2

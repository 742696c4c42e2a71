"""The runtime: dependency boundary, generation control, sampling, chat template, CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from awqc.compiler.cli import build_parser, main
from awqc.runtime.engine import Engine
from awqc.runtime.sampling import Sampler, SamplingParams


def test_runtime_imports_neither_torch_nor_transformers(tiny_artifact: Path) -> None:
    # tvm_ffi imports torch opportunistically when it is installed; a device has no torch, so the
    # subprocess makes torch and transformers unimportable, as on a device, and must still decode.
    code = f"""
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(name + " is not installed on this device")
        return None

sys.meta_path.insert(0, Absent())
from awqc.runtime.engine import Engine
e = Engine({str(tiny_artifact)!r})
toks = list(e.generate(e.encode("the quick brown fox"), 5))
e.encode_chat("hello")
assert len(toks) == 5, toks
bad = [m for m in ("torch", "transformers", "awqc.compiler", "awqc.passes") if m in sys.modules]
assert not bad, bad
print("clean")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "clean" in res.stdout


def test_generate_stops_at_max_new_tokens_and_eos(tiny_artifact: Path) -> None:
    engine = Engine(tiny_artifact)
    prompt = engine.encode("compilers turn programs")
    greedy = list(engine.generate(prompt, 6))
    assert len(greedy) == 6
    # The same greedy run with its third token declared EOS stops just before it.
    engine.eos_token_ids = {greedy[2]}
    cut = list(engine.generate(prompt, 6))
    assert cut == greedy[:greedy.index(greedy[2])]


def test_greedy_equals_stepwise_argmax(tiny_artifact: Path) -> None:
    engine = Engine(tiny_artifact)
    prompt = engine.encode("a haiku has three lines")
    tokens = list(engine.generate(prompt, 5))
    expected, ids = [], list(prompt)
    for _ in range(5):
        expected.append(int(engine.score(ids)[-1].argmax()))
        ids.append(expected[-1])
    assert tokens == [t for t in expected]


def test_seeded_sampling_is_reproducible(tiny_artifact: Path) -> None:
    engine = Engine(tiny_artifact)
    prompt = engine.encode("the lazy dog")
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=7)
    a = list(engine.generate(prompt, 12, params))
    b = list(engine.generate(prompt, 12, params))
    c = list(engine.generate(prompt, 12, SamplingParams(temperature=1.5, top_p=0.95, seed=8)))
    assert a == b and a != c


def test_sampler_matches_softmax_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.5, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    z = logits / 0.5
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.abs(counts - expected).max() < 0.01


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # probs at T=1: 0.64, 0.24, 0.09, 0.03 -> top_p 0.8 keeps the first two only.
    logits = np.log(np.array([0.64, 0.24, 0.09, 0.03]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=1))
    draws = np.bincount([sampler(logits) for _ in range(5000)], minlength=4) / 5000
    assert draws[2] == 0 and draws[3] == 0
    assert abs(draws[0] - 0.64 / 0.88) < 0.02


def test_chat_template_matches_transformers(tiny_artifact: Path, tiny_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    expected = tok.apply_chat_template([{"role": "user", "content": "hello fox"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert Engine(tiny_artifact).encode_chat("hello fox") == list(expected)


def test_cli_run_streams_text(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tiny_artifact), "--prompt", "the quick", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    engine = Engine(tiny_artifact)
    expected = engine.decode_text(list(engine.generate(engine.encode("the quick"), 8)))
    assert out.out.strip() == expected.strip()
    assert "new tokens" in out.err and "greedy" in out.err


def test_cli_run_samples_with_the_artifacts_defaults(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    """No sampling option: the defaults recorded in the manifest — here from the checkpoint's
    generation_config.json, which sets no sampling value, so transformers' own defaults —
    seeded the same way as the engine's own generate()."""
    engine = Engine(tiny_artifact)
    assert engine.manifest["generation"] == {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                                             "repeat_penalty": 1.0, "source": "generation_config.json"}
    assert main(["run", str(tiny_artifact), "--prompt", "the quick", "--max-new-tokens", "12", "--seed", "5"]) == 0
    out = capsys.readouterr()
    params = SamplingParams.with_defaults(engine.generation, seed=5)
    expected = engine.decode_text(list(engine.generate(engine.encode("the quick"), 12, params)))
    assert out.out.strip() == expected.strip()
    assert "temperature 1, top-k 50, top-p 1, min-p 0" in out.err and "generation_config.json" in out.err


def test_stop_string_ends_the_reply_before_it(tiny_artifact: Path) -> None:
    engine = Engine(tiny_artifact)
    ids = engine.encode("the quick")
    full = engine.decode_text(list(engine.generate(ids, 16)))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    written: list[str] = []
    tokens = engine.stream_text(ids, 16, SamplingParams(), written.append, stop=[stop, "never appears"])
    assert "".join(written) == full[:full.find(stop)]
    assert len(tokens) < 16
    written.clear()
    engine.stream_text(ids, 16, SamplingParams(), written.append)
    assert "".join(written) == full


def test_help_texts_have_examples(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    assert "awqc compile --model default" in parser.format_help()
    for cmd in ("compile", "run"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "example:" in capsys.readouterr().out


def test_compile_and_run_are_quiet(tiny_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """No TVM warnings or third-party progress bars on a normal compile and run: the compile says
    one line, the run its text and one line of statistics (capfd sees what C++ writes too)."""
    art = tmp_path / "art"
    assert main(["compile", "--model", str(tiny_ckpt), "-o", str(art), "--context-window", "64"]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wrote {art}"), err
    assert main(["run", str(art), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "new tokens" in err[0], err

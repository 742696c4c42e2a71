"""Bad input gets an error that names the problem, and nothing is written to the output path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from awqc.compiler.cli import main
from awqc.runtime.artifact import ArtifactError, write_manifest
from awqc.runtime.engine import Engine, PromptTooLongError


def compile_cli(model: str, out: Path, *extra: str) -> int:
    return main(["compile", "--model", model, "--target", "host", "-o", str(out), *extra])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary left behind"


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert compile_cli(str(tmp_path / "nope"), out) == 2
    assert "does not exist" in capsys.readouterr().err
    assert_nothing_written(out)


def test_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_ckpt: Path) -> None:
    ckpt = tmp_path / "gpt2"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert compile_cli(str(ckpt), out) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel is not supported" in err and "LlamaForCausalLM" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_ckpt: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    out = tmp_path / "out"
    assert compile_cli(str(ckpt), out) == 2
    assert "model.safetensors is corrupt or truncated" in capsys.readouterr().err
    assert_nothing_written(out)


def test_unknown_target(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_ckpt: Path) -> None:
    out = tmp_path / "out"
    assert main(["compile", "--model", str(tiny_ckpt), "--target", "riscv-magic", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'riscv-magic'" in err and "arm-neon" in err
    assert_nothing_written(out)


def test_failed_compile_leaves_nothing(tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import awqc.compiler.build as build

    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt  # an interrupt in the middle of writing files

    monkeypatch.setattr(build, "_write_weights", broken)
    out = tmp_path / "out"
    assert compile_cli(str(tiny_ckpt), out) == 130
    assert_nothing_written(out)


def test_prompt_longer_than_context(tiny_artifact: Path) -> None:
    engine = Engine(tiny_artifact)
    with pytest.raises(PromptTooLongError, match="context window is 128"):
        engine.prefill([5] * 129)
    assert engine.length == 0  # nothing half-prefilled


@pytest.mark.parametrize("bad", [320, 10**6, -1])  # the tiny model's vocabulary is 320
def test_token_outside_the_vocabulary(tiny_artifact: Path, bad: int) -> None:
    engine = Engine(tiny_artifact)
    with pytest.raises(ValueError, match=f"token id {bad} is outside this model's vocabulary of 320"):
        engine.prefill([5, bad])
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        engine.decode(bad)
    assert engine.length == 0
    engine.prefill([5, 319])  # the last id is fine


def test_cli_run_prompt_too_long(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tiny_artifact), "--prompt", "fox " * 200]) == 2
    assert "context window" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["tamper-weights", "tamper-library", "missing-tokenizer", "missing-manifest",
                                    "extra-file"])
def test_damaged_artifact(tmp_path: Path, tiny_artifact: Path, damage: str) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    if damage == "tamper-weights":
        with open(art / "weights.safetensors", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x00\x80\x7f")
        match = "weights.safetensors does not match its sha256"
    elif damage == "tamper-library":
        with open(art / "lib.so", "ab") as f:
            f.write(b"\x00")
        match = "lib.so does not match its sha256"
    elif damage == "missing-tokenizer":
        (art / "tokenizer" / "tokenizer.json").unlink()
        match = "tokenizer/tokenizer.json is missing"
    elif damage == "missing-manifest":
        (art / "manifest.json").unlink()
        match = "manifest.json is missing"
    else:
        (art / "evil.so").write_bytes(b"\x7fELF")
        match = "does not list: evil.so"
    with pytest.raises(ArtifactError, match=match):
        Engine(art)


def test_artifact_for_other_arch(tmp_path: Path, tiny_artifact: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["target"].update(arch="aarch64", name="arm-neon")
    write_manifest(art, manifest)  # re-sealed: as if built so, not edited
    with pytest.raises(ArtifactError, match="built for aarch64"):
        Engine(art)


def test_prompt_not_utf8(tiny_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tiny_artifact), "--prompt", "caf\udce9"]) == 2  # a Latin-1 byte, surrogate-escaped
    assert "not valid UTF-8" in capsys.readouterr().err


def test_garbage_library_is_an_artifact_error(tmp_path: Path, tiny_artifact: Path) -> None:
    from awqc.runtime.artifact import hash_tree

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    (art / "lib.so").write_bytes(b"\x7fELF" + b"\x00" * 200)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = hash_tree(art)
    write_manifest(art, manifest)  # a consistent artifact whose library is garbage
    with pytest.raises(ArtifactError, match="lib.so cannot be loaded"):
        Engine(art)


def test_unexpected_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                      tiny_artifact: Path) -> None:
    import awqc.runtime.engine as engine

    def bug(*_args, **_kwargs):
        raise RuntimeError("something awqc did not expect\nsecond line")

    monkeypatch.setattr(engine.Engine, "__init__", bug)
    assert main(["run", str(tiny_artifact), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: something awqc did not expect" in err and "-v" in err
    with pytest.raises(RuntimeError):
        main(["-v", "run", str(tiny_artifact), "--prompt", "hi"])


@pytest.mark.parametrize("argv, message", [(["tune", "--group", "0"], "group size 0"),
                                           (["eval", "--model", "default", "--windows", "-1"], "--windows"),
                                           (["serve", "nowhere", "--max-batch", "0"], "--max-batch must be"),
                                           (["chat", "nowhere", "--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("cuda", "no usable CUDA device"),  # this machine's torch is a CPU build
    ("cuda:1", "no usable CUDA device"),
    ("mps", "calibration runs on cpu or cuda"),
    ("not a device", "is not a device")])
def test_calibration_device_refused_before_any_work(tmp_path: Path, tiny_ckpt: Path, device: str, message: str,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    out = tmp_path / "art"
    assert main(["compile", "--model", str(tiny_ckpt), "--quant", "awq-w4g32", "--calib-device", device,
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["eval", "--model", str(tiny_ckpt), "--method", "awq", "--calib-device", device]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("generation, message", [
    ("greedy", "generation is not an object"),
    ({"source": "x", "temperature": -1.0, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0},
     "temperature must be >= 0"),
    ({"source": "x", "temperature": 0.7, "top_k": "40", "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0},
     "non-numeric"),
    ({"source": "x", "temperature": 0.7, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0}, "non-numeric")])
def test_bad_sampling_defaults_in_a_resealed_manifest(tmp_path: Path, tiny_artifact: Path, generation,
                                                      message: str) -> None:
    import json

    from awqc.runtime.artifact import write_manifest

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {**manifest, "generation": generation})
    with pytest.raises(ArtifactError, match=message):
        Engine(art)

"""End to end on the real default model (SmolLM2-135M-Instruct): compile, then compare with
transformers float32."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.compiler.cli import main
from awqc.compiler.model_import import default_model_path
from awqc.runtime.engine import Engine

from conftest import rel_err

PASSAGE = ("A compiler translates a program written in one language into another language, usually "
           "machine code that a processor can run directly. Modern compilers first parse the source into "
           "an intermediate representation, then apply many optimization passes, such as inlining, loop "
           "unrolling and vectorization, before they select instructions and allocate registers. The result is a program that runs much "
           "faster than an interpreter could run the same source.")


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / "smollm2-f32"
    assert main(["compile", "--model", "default", "--target", "host", "-o", str(out),
                 "--context-window", "512"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_logits_match_transformers_on_64_tokens(default_artifact: Path, hf_model) -> None:
    engine = Engine(default_artifact)
    ids = engine.encode(PASSAGE)[:64]
    assert len(ids) == 64
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    got = engine.score(ids)
    assert rel_err(got, ref) < 1e-3
    engine.reset()
    assert rel_err(engine.prefill(ids), ref[-1]) < 1e-3


def test_32_greedy_tokens_identical(default_artifact: Path, hf_model) -> None:
    engine = Engine(default_artifact)
    ids = engine.encode_chat("Write a haiku about compilers.")
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = ref[0, len(ids):].tolist()
    engine.eos_token_ids = set()  # compare all 32 tokens, as min_new_tokens does for transformers
    assert list(engine.generate(ids, 32)) == expected


def test_cli_run_on_default_model(default_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(default_artifact), "--prompt", "Write a haiku about compilers.", "--chat", "--seed", "0",
                 "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert len(out.split()) >= 5 and np.mean([c.isalpha() or c.isspace() for c in out]) > 0.7


def test_int4_default_model_matches_transformers_fake_quant(tmp_path: Path, hf_model) -> None:
    """The default model compiled to int4 (RTN w4g64, LM head quantized too) against transformers
    running the same quantized weights dequantized, and decoding through the int4 kernels."""
    import copy

    from awqc.compiler.awq import quantize_model
    from awqc.compiler.model_import import load_model
    from awqc.passes.quantizer import QuantScheme

    out = tmp_path / "smollm2-q4"
    assert main(["compile", "--model", "default", "--quant", "rtn-w4g64", "--quantize-head", "-o", str(out),
                 "--context-window", "512"]) == 0
    engine = Engine(out)
    assert engine.manifest["quantization"]["quantized"]  # the linears and the head run as int4 kernels
    model = load_model("default")
    fake = quantize_model(model, "rtn", QuantScheme(group_size=64), quantize_head=True).dequantized()
    ref_model = copy.deepcopy(hf_model)
    state = {}
    for i in range(model.config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        q, k, v = torch.split(fake[f"layers.{i}.self_attn.qkv_proj.weight"],
                              [ref_model.get_submodule(f"{a}.{p}_proj").out_features for p in "qkv"])
        gate, up = torch.chunk(fake[f"layers.{i}.mlp.gate_up_proj.weight"], 2)
        state.update({f"{a}.q_proj.weight": q, f"{a}.k_proj.weight": k, f"{a}.v_proj.weight": v,
                      f"{m}.gate_proj.weight": gate, f"{m}.up_proj.weight": up,
                      f"{a}.o_proj.weight": fake[f"layers.{i}.self_attn.o_proj.weight"],
                      f"{m}.down_proj.weight": fake[f"layers.{i}.mlp.down_proj.weight"]})
    ref_model.load_state_dict(state, strict=False)
    ref_model.lm_head.weight = torch.nn.Parameter(fake["lm_head.weight"].clone())  # untied: the int4 head
    ids = engine.encode(PASSAGE)[:64]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(engine.score(ids), ref) < 1e-3
    engine.reset()
    logits = engine.prefill(ids[:48])
    for t in ids[48:56]:  # decode steps (GEMV kernels) against the same reference rows
        logits = engine.decode(t)
    assert rel_err(logits, ref[55]) < 1e-3

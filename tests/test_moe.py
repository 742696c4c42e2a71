"""Mixtures of experts (Mixtral, Qwen3-MoE): configs read as transformers reads them, a step reads
only the chosen experts, the int4 expert kernel against numpy, the int4 artifact equals its
fake-quant reference, AWQ's fallback for an expert no calibration token chose, and what is not
supported yet is refused by name. (Float logits against
transformers: test_model.py.)"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from awqc.compiler.awq import quantize_model
from awqc.compiler.build import write_artifact
from awqc.compiler.cli import main
from awqc.compiler.config import UnsupportedModelError, config_from_hf
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.passes.quantizer import QuantScheme, dequantize, quantize
from awqc.runtime.engine import Engine
from awqc.schedules.layouts import K8
from awqc.schedules.w4_kernels import w4_expert_matmul

from conftest import make_checkpoint, rel_err

MIXTRAL = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
QWEN3_MOE = dict(model_type="qwen3_moe", num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32,
                 norm_topk_prob=True, head_dim=16, mlp_only_layers=[1])
HUB = {  # Qwen3-30B-A3B's config.json fields that matter here, at tiny sizes
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


@pytest.mark.parametrize("change,moe_layers", [({}, (0, 1, 2, 3)), ({"mlp_only_layers": [0, 2]}, (1, 3)),
                                               ({"decoder_sparse_step": 2}, (1, 3))])
def test_qwen3_moe_config_matches_transformers(change: dict, moe_layers: tuple, tmp_path: Path) -> None:
    """Experts, top-k, expert width, renormalization and which layers are sparse, as
    Qwen3MoeConfig resolves them from the hub's spelling (num_experts, not num_local_experts)."""
    import json

    from transformers import AutoConfig

    hf = {**HUB, **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ref = AutoConfig.from_pretrained(str(tmp_path))
    cfg = config_from_hf(hf)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (
        ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, ref.norm_topk_prob) == (8, 2, 32, True)
    sparse = tuple(i for i in range(4) if i not in ref.mlp_only_layers and (i + 1) % ref.decoder_sparse_step == 0)
    assert cfg.moe_layers == sparse == moe_layers


def test_mixtral_config_matches_transformers() -> None:
    from transformers import MixtralConfig

    ref = MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=3)
    cfg = config_from_hf({**ref.to_dict(), "architectures": ["MixtralForCausalLM"]})
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_layers) == (6, 3, 96, (0, 1))
    assert cfg.norm_topk_prob  # Mixtral always renormalizes over the chosen experts


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 9}, "'num_experts_per_tok' is 9; expected an integer from 1 to 8"),
    ({"num_experts": 0}, "'num_experts' is 0; expected an integer from 1 to"),
    ({"mlp_only_layers": [4]}, "'mlp_only_layers' is [4]; expected a list of layer indices from 0 to 3"),
])
def test_bad_expert_configs_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_hf({**HUB, **change})


def test_experts_not_chosen_are_not_read(tmp_path: Path) -> None:
    """A one-token step reads only the experts the router chose: with every other expert's
    weights set to NaN (in every layer), the logits are still transformers' (a kernel that read
    all experts and weighted the unchosen ones by 0 would give NaN)."""
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=5, **MIXTRAL)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    chosen: dict[int, set[int]] = {}
    for i, layer in enumerate(hf.model.layers):
        layer.mlp.gate.register_forward_hook(
            lambda _m, _in, out, i=i: chosen.setdefault(i, set()).update(out[2].flatten().tolist()))
    token = 7
    with torch.no_grad():
        ref = hf(torch.tensor([[token]])).logits[0, -1].numpy()
    model = load_model(str(ckpt))
    weights = {k: np.array(v) for k, v in model.weights.items()}
    for i, experts in chosen.items():
        assert len(experts) == 2
        for name in ("gate_up_proj", "down_proj"):
            weights[f"layers.{i}.mlp.experts.{name}.weight"][[e for e in range(4) if e not in experts]] = np.nan
    poisoned = dataclasses.replace(model, weights=weights)
    engine = Engine(write_artifact(tmp_path / "art", poisoned, get_target("host"), "float32", context_window=64))
    logits = engine.prefill([token])
    assert np.isfinite(logits).all() and rel_err(logits, ref) < 1e-4


@pytest.mark.parametrize("per_slot", [False, True])
def test_int4_expert_kernel_matches_numpy(per_slot: bool) -> None:
    """Each (token, slot) times its chosen expert's dequantized k8 weight: the shared input of
    gate/up, or the per-slot input of down."""
    e, n, k, g, tokens, slots = 5, 24, 64, 32, 3, 2
    rng = np.random.default_rng(int(per_slot))
    w = torch.from_numpy(rng.standard_normal((e, n, k)).astype(np.float32))
    q, scale, zero = quantize(w, QuantScheme(group_size=g))
    packed = [a.reshape(e, -1, a.shape[-1]) for a in K8.pack(*(t.reshape(-1, t.shape[-1]).numpy()
                                                                 for t in (q, scale, zero)))]
    deq = dequantize(q, scale, zero, g).numpy().astype(np.float64)
    x = rng.standard_normal((tokens, slots, k) if per_slot else (tokens, k)).astype(np.float32)
    chosen = rng.integers(0, e, (tokens, slots)).astype(np.int32)
    f = w4_expert_matmul(k, n, g, e, slots, "float32", per_slot)
    kernel = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                         target=get_target("host").target())["main"]
    y = tvm.runtime.tensor(np.zeros((tokens, slots, n), np.float32))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(chosen), *[tvm.runtime.tensor(a) for a in packed], y)
    ref = np.stack([[deq[chosen[t, j]] @ (x[t, j] if per_slot else x[t]) for j in range(slots)]
                    for t in range(tokens)])
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
def test_int4_artifact_is_its_fake_quant(kw: dict, tmp_path: Path) -> None:
    """Round to nearest quantizes every expert (the routers stay float): the int4 artifact's
    logits and tokens equal the float model with the dequantized weights."""
    model = load_model(str(make_checkpoint(tmp_path / "ckpt", seed=3, **kw)))
    quant = quantize_model(model, "rtn", QuantScheme(group_size=32))
    experts = [n for n in model.weights if ".experts." in n]
    assert experts and set(experts) <= set(quant.quantized)
    assert not any(".router." in n for n in quant.quantized)
    int4 = Engine(write_artifact(tmp_path / "int4", model, get_target("host"), "float32", 128, quant=quant,
                                 method="rtn"))
    fake = dataclasses.replace(model, weights={k: v.numpy() for k, v in quant.dequantized().items()})
    ref = Engine(write_artifact(tmp_path / "fake", fake, get_target("host"), "float32", 128))
    ids = list(np.random.RandomState(0).randint(3, 300, size=40))
    assert rel_err(int4.score(ids), ref.score(ids)) < 1e-5
    assert list(int4.generate(ids, 6)) == list(ref.generate(ids, 6))


def test_an_expert_no_token_chose_falls_back_to_round_to_nearest(tmp_path: Path) -> None:
    """AWQ's documented fallback: an expert the calibration tokens never routed to has no
    statistics, its up -> down group is not searched, its gate/up columns still take the norm's
    scale (the function is unchanged) and it is rounded to nearest without clipping. The router
    here sees one hidden channel (the MLP norm is 0 elsewhere) with weights (2, 1, -1, -2, 0):
    whatever the channel's sign, two experts score above expert 4."""
    from awqc.compiler.awq import awq_quantize
    from awqc.compiler.calibrate import calibrate
    from awqc.compiler.evaluate import FloatEngine

    model = load_model(str(make_checkpoint(tmp_path / "ckpt", seed=4, **{**MIXTRAL, "num_local_experts": 5})))
    weights = {k: np.array(v) for k, v in model.weights.items()}
    for i in range(model.config.num_hidden_layers):
        norm, router = weights[f"layers.{i}.post_attention_layernorm.weight"], weights[f"layers.{i}.mlp.router.weight"]
        norm[1:], router[:] = 0.0, 0.0
        router[:, 0] = [2.0, 1.0, -1.0, -2.0, 0.0]
    model = dataclasses.replace(model, weights=weights)
    rs = np.random.RandomState(0)
    stats = calibrate(model, [list(rs.randint(3, 300, size=32)) for _ in range(4)], progress=False)
    unused = [f"layers.{i}.mlp.experts.4.{w}.weight" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    assert not any(n in stats for n in unused)
    assert all(f"layers.{i}.mlp.experts.{e}.gate_up_proj.weight" in stats for i in range(2) for e in range(4))
    scheme = QuantScheme(group_size=32)
    res = awq_quantize(model, scheme, stats, progress=False)
    searched = {res.groups[g].producer for g in res.scales}
    assert not any(".experts.4." in p for p in searched) and "layers.0.mlp.experts.0.gate_up_proj.weight" in searched
    for i in range(2):
        name = f"layers.{i}.mlp.experts.gate_up_proj.weight"
        q, scale, zero = res.weights.quantized[name]
        q4, scale4, zero4 = quantize(res.scaled[name][4], scheme)  # to nearest, unclipped
        assert torch.equal(q[4], q4) and torch.equal(scale[4], scale4) and torch.equal(zero[4], zero4)
    fe = FloatEngine(model, context_window=64)
    ids = list(rs.randint(3, 300, size=24))
    assert rel_err(fe.use(res.scaled).score(ids), fe.use(None).score(ids)) < 2e-5


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mixtral") / "ckpt", seed=2, **MIXTRAL)


@pytest.mark.parametrize("args,message", [
    (["--quant", "awq-w4g32", "--calib-stats", "stats.safetensors"],
     "--calib-stats and --awq-loss block are not supported for mixture-of-experts models (mixtral) yet"),
    (["--quant", "rtn-w4a8g32"], "w4a8g32 (int8 activations) is not supported for mixture-of-experts models"),
    (["--target", "cuda-sm80", "--dtype", "float16"], "mixture-of-experts models (mixtral) compile for CPU targets only"),
])
def test_what_experts_do_not_support_yet_is_refused(mixtral_ckpt: Path, args: list[str], message: str,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "art"
    assert main(["compile", "--model", str(mixtral_ckpt), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("quant", ["rtn-w4g32", "awq+gptq-w4g32"])
def test_compile_through_the_cli(mixtral_ckpt: Path, quant: str, tmp_path: Path) -> None:
    """`awqc compile --quant …` of a Mixtral (AWQ + GPTQ calibrated on the default text) writes
    int4 experts (k8) and a float router, and runs."""
    out = tmp_path / "art"
    assert main(["compile", "--model", str(mixtral_ckpt), "--quant", quant, "-o", str(out), "--context-window", "64",
                 "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    from safetensors.numpy import load_file

    weights = load_file(str(out / "weights.safetensors"))
    assert weights["layers.0.mlp.experts.gate_up_proj.weight.qweight"].shape == (4, 192, 64 // 8)
    assert weights["layers.0.mlp.router.weight"].dtype == np.float32
    assert len(list(Engine(out).generate([5, 6, 7], 4))) == 4

"""Sampling against transformers' own logits processors (the independent reference), the defaults
read from generation_config.json, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from awqc.runtime.sampling import LLAMA_CPP_DEFAULTS, Sampler, SamplingParams, generation_defaults


def _hf_probs(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """transformers' distribution for the same settings: its processors in generate()'s order."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    chain = LogitsProcessorList()
    if p.repeat_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repeat_penalty))
    chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        chain.append(MinPLogitsWarper(p.min_p))
    ids = torch.tensor([history if history else [0]], dtype=torch.long)
    scores = chain(ids, torch.from_numpy(logits.astype(np.float64))[None])
    return torch.softmax(scores, -1)[0].numpy()


SETTINGS = [dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1),  # the llama.cpp-like defaults
            dict(temperature=1.0, top_k=5),
            dict(temperature=0.6, top_p=0.9),
            dict(temperature=1.3, min_p=0.1),
            dict(temperature=0.7, top_k=50, top_p=0.8, repeat_penalty=1.3, repeat_last_n=-1)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_distribution_equals_transformers(settings: dict) -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(500) * 3).astype(np.float32)
    history = [int(t) for t in rng.integers(0, 500, 30)]
    params = SamplingParams(**settings)
    ids, probs = Sampler(params).distribution(logits, history)
    full = np.zeros(500)
    full[ids] = probs
    np.testing.assert_allclose(full, _hf_probs(logits, history, params), atol=1e-9)


def test_draws_follow_the_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0, -3.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.9, top_k=3, seed=0))
    ids, probs = sampler.distribution(logits)
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=5) / 20000
    assert list(ids) == [0, 1, 2] and counts[3] == counts[4] == 0
    assert np.abs(counts[ids] - probs).max() < 0.01


def test_repeat_penalty_looks_back_repeat_last_n_tokens() -> None:
    logits = np.array([3.0, 2.9, -1.0], dtype=np.float32)
    history = [0, 2, 2, 2]  # token 0 is 4 tokens back
    assert Sampler(SamplingParams(repeat_penalty=1.5, repeat_last_n=3))(logits, history) == 0
    assert Sampler(SamplingParams(repeat_penalty=1.5, repeat_last_n=4))(logits, history) == 1
    assert Sampler(SamplingParams())(logits, history) == 0  # greedy without a penalty: the raw argmax


def test_defaults_from_generation_config(tmp_path: Path) -> None:
    assert generation_defaults(tmp_path) == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                                             "repeat_penalty": 1.1, "source": "llama.cpp defaults"}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "bos_token_id": 1}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_k": 50, "top_p": 0.9, "min_p": 0.0,
                                             "repeat_penalty": 1.1, "source": "generation_config.json"}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert generation_defaults(tmp_path)["temperature"] == 0.0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"top_p": 7.0}), json.dumps({"top_k": -3})])
def test_unusable_generation_config_falls_back(tmp_path: Path, content: str) -> None:
    (tmp_path / "generation_config.json").write_text(content)
    assert generation_defaults(tmp_path)["source"] == "llama.cpp defaults"


def test_with_defaults_takes_what_was_given() -> None:
    p = SamplingParams.with_defaults({**LLAMA_CPP_DEFAULTS, "source": "x"}, temperature=0.0, top_k=None, seed=4)
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (0.0, 40, 0.95, 4)


@pytest.mark.parametrize("bad, message", [(dict(temperature=-1), "temperature must be >= 0"),
                                          (dict(top_p=0), "top_p must be in"),
                                          (dict(top_k=-1), "top_k must be >= 0"),
                                          (dict(min_p=1.0), "min_p must be in"),
                                          (dict(repeat_penalty=0), "repeat_penalty must be > 0"),
                                          (dict(temperature=float("nan")), "temperature"),
                                          (dict(repeat_last_n=-2), "repeat_last_n")])
def test_bad_sampling_params(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)

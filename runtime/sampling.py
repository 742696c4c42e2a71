"""Choosing the next token: repetition penalty, then temperature, top-k, top-p and min-p in
transformers' order (the order the values of a checkpoint's generation_config.json were chosen
for), then one draw. Temperature 0 is exact greedy (argmax of the raw logits).

The defaults an artifact records (`generation_defaults`) come from the checkpoint's
generation_config.json when it has one, else llama.cpp's: temperature 0.8, top-k 40, top-p 0.95,
min-p 0.05, repetition penalty 1.1 over the last 64 tokens."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# llama.cpp's sampling defaults, with the repetition penalty it used until 2024 (1.1 over the last
# 64 tokens): without it the default int4 135M model loops ("a tool crafted by a mortal craftsman,
# a tool crafted by …") even at temperature 0.8.
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off
    repeat_penalty: float = 1.0  # 1: off; > 1 makes tokens of the last `repeat_last_n` less likely
    repeat_last_n: int = 64  # how far back the penalty looks (llama.cpp's default); -1: the whole sequence
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [(self.temperature >= 0, "temperature must be >= 0 (0 is greedy)", self.temperature),
                  (self.top_k >= 0, "top_k must be >= 0 (0 is off)", self.top_k),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)", self.min_p),
                  (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1 is off)", self.repeat_penalty),
                  (self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1: the whole sequence)",
                   self.repeat_last_n)]
        for ok, message, value in checks:
            if not (ok and math.isfinite(value)):
                raise ValueError(f"{message}, got {value}")

    @classmethod
    def with_defaults(cls, defaults: dict[str, Any], **given: Any) -> "SamplingParams":
        """The artifact's defaults, overridden by the options given (None: not given)."""
        chosen = {k: v for k, v in defaults.items() if k in LLAMA_CPP_DEFAULTS}
        chosen.update({k: v for k, v in given.items() if v is not None})
        return cls(**chosen)


def generation_defaults(checkpoint: Path | None) -> dict[str, Any]:
    """The sampling defaults to record in an artifact: the checkpoint directory's
    generation_config.json translated to these names (an unusable one is ignored whole), else
    llama.cpp's."""
    path = None if checkpoint is None else Path(checkpoint) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        cfg = None
    if not isinstance(cfg, dict):
        return {**LLAMA_CPP_DEFAULTS, "source": "llama.cpp defaults"}
    out = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}  # transformers'
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}
    for hf, ours in names.items():
        value = cfg.get(hf)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[ours] = int(value) if ours == "top_k" else float(value)
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except ValueError:
        return {**LLAMA_CPP_DEFAULTS, "source": "llama.cpp defaults"}
    return {**out, "source": "generation_config.json"}


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that may be drawn and their probabilities (sorted by token id)."""
        p = self.params
        z = self._penalized(logits, history) / p.temperature
        keep = np.ones(len(z), dtype=bool)
        if 0 < p.top_k < len(z):
            keep &= z >= np.partition(z, -p.top_k)[-p.top_k]  # ties with the k-th are kept
        probs = _softmax(np.where(keep, z, -np.inf))
        if p.top_p < 1:
            order = np.argsort(probs, kind="stable")  # ascending, as transformers sorts
            tail = np.cumsum(probs[order]) <= 1 - p.top_p
            tail[-1] = False  # the most likely token always stays
            keep[order[tail]] = False
            probs = _softmax(np.where(keep, z, -np.inf))
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs.max()
        ids = np.flatnonzero(keep)
        kept = probs[ids]
        return ids, kept / kept.sum()

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The logits with the repetition penalty applied to the recent tokens (transformers' rule:
        a positive logit divided by the penalty, a negative one multiplied)."""
        p = self.params
        z = logits.astype(np.float64)
        n = p.repeat_last_n
        recent = history if n == -1 else history[-n:] if n > 0 else ()
        if p.repeat_penalty != 1.0 and len(recent):
            seen = np.unique(np.asarray(recent))
            z[seen] = np.where(z[seen] < 0, z[seen] * p.repeat_penalty, z[seen] / p.repeat_penalty)
        return z

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        if self.params.temperature == 0:  # greedy: exact argmax (of the penalized logits with a penalty)
            return int(np.argmax(logits if self.params.repeat_penalty == 1.0 else self._penalized(logits, history)))
        ids, probs = self.distribution(logits, history)
        return int(ids[self.rng.choice(len(ids), p=probs)])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()

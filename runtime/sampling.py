"""Next-token choice from float32 logits: greedy, or temperature + top-p with a seeded generator."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = np.cumsum(probs[order]) - probs[order] < p.top_p
            kept = order[keep]
            probs = probs[kept] / probs[kept].sum()
            return int(kept[self.rng.choice(len(kept), p=probs)])
        return int(self.rng.choice(len(probs), p=probs))

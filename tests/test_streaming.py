"""The compile streams: at most one decoder block's weights are alive at any time, whatever the
depth of the model (an instrumented weight mapping counts the live arrays; nothing is timed)."""
from __future__ import annotations

import dataclasses
import re
import weakref
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pytest

from awqc.compiler.build import QuantConfig, compile_artifact
from awqc.compiler.calibrate import CalibrationSettings
from awqc.compiler.model_import import load_model
from awqc.compiler.targets import get_target
from awqc.passes.quantizer import QuantScheme
from awqc.runtime.engine import Engine

from conftest import make_checkpoint


class LiveWeights(Mapping[str, np.ndarray]):
    """The model's weights, recording which are alive (referenced by anyone) at every read."""

    def __init__(self, weights: Mapping[str, np.ndarray]):
        self._weights = weights
        self.alive: set[int] = set()  # ids of live arrays
        self._names: dict[int, str] = {}
        self.most_blocks_alive = 0
        self.reads = 0

    def __getitem__(self, name: str) -> np.ndarray:
        w = np.array(self._weights[name])  # a fresh array, owned by whoever holds it
        key = id(w)
        self.alive.add(key)
        self._names[key] = name
        weakref.finalize(w, self.alive.discard, key)
        blocks = {m.group(1) for k in self.alive if (m := re.match(r"layers\.(\d+)\.", self._names[k]))}
        self.most_blocks_alive = max(self.most_blocks_alive, len(blocks))
        self.reads += 1
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("deep") / "ckpt", num_hidden_layers=6, intermediate_size=128)


@pytest.mark.parametrize("method", ["none", "rtn", "awq"])
def test_one_block_alive_at_a_time(deep_ckpt: Path, tmp_path: Path, method: str) -> None:
    model = load_model(str(deep_ckpt))
    live = LiveWeights(model.weights)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and token{i % 13}." for i in range(800)))
    quant = None if method == "none" else QuantConfig(QuantScheme(group_size=32), method, True,
                                                    CalibrationSettings(text, n_samples=3, seq_len=32))
    out = compile_artifact(tmp_path / "art", dataclasses.replace(model, weights=live), get_target("host"),
                           "float32", 64, quant, progress=False)
    assert live.reads >= 6 * 6  # every block's parameters were read
    assert live.most_blocks_alive == 1
    Engine(out)  # and the artifact is whole

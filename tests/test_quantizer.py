"""The group quantizer against hand-computed values and numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from awqc.passes.quantizer import QuantizationError, QuantScheme, dequantize, fake_quantize, quantize


def test_asymmetric_group_by_hand() -> None:
    # One group of 32: values 0..31 scaled by 0.1 -> lo 0, hi 3.1, scale 3.1/15 rounded to the
    # float16 it is stored as (0.2066650390625 = 1693 * 2^-13), zero 0.
    w = (torch.arange(32, dtype=torch.float32) * 0.1)[None]
    q, scale, zero = quantize(w, QuantScheme(group_size=32))
    assert scale.item() == 1693 * 2.0 ** -13
    assert zero.item() == 0
    expected = np.clip(np.round(np.arange(32) * np.float32(0.1) / np.float32(1693 * 2.0 ** -13)), 0, 15)
    np.testing.assert_array_equal(q[0].numpy(), expected)


def test_error_bounded_by_half_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for scheme in (QuantScheme(group_size=64), QuantScheme(group_size=128, symmetric=True)):
        q, scale, zero = quantize(w, scheme)
        assert int(q.max()) <= 15
        err = (dequantize(q, scale, zero, scheme.group_size) - w).abs()
        step = scale.repeat_interleave(scheme.group_size, dim=1)
        assert bool((err <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("rows, cols", [(8, 128), (1100, 4096)])  # the second spans several row chunks
def test_numpy_reference_matches(rows: int, cols: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    g = w.reshape(rows, cols // 64, 64)
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    s = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    z = np.clip(np.round(-lo / s), 0, 15)
    ref = ((np.clip(np.round(g / s[..., None] + z[..., None]), 0, 15) - z[..., None]) * s[..., None]).reshape(rows, cols)
    np.testing.assert_allclose(fake_quantize(torch.from_numpy(w), QuantScheme(group_size=64)).numpy(), ref,
                               rtol=1e-6, atol=1e-7)


def test_scales_are_float16_values() -> None:
    """Scales are stored as float16: the quantizer rounds them first (so q and the zero point are
    derived from the stored scale), and an all-zero group gets the smallest normal float16, 2^-14,
    and dequantizes exactly."""
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    w[3, :64] = 0
    _, scale, _ = quantize(w, QuantScheme(group_size=64))
    np.testing.assert_array_equal(scale.numpy(), scale.numpy().astype(np.float16).astype(np.float32))
    assert scale[3, 0].item() == 2.0 ** -14
    assert bool((fake_quantize(w, QuantScheme(group_size=64))[3, :64] == 0).all())


def test_group_size_must_divide_layer() -> None:
    with pytest.raises(QuantizationError, match=r"layer layers\.0\.mlp\.down_proj has 576 .* group sizes that divide it: 64, 32"):
        QuantScheme(group_size=128).check_layer("layers.0.mlp.down_proj", 576)
    with pytest.raises(QuantizationError, match="choose one of"):
        QuantScheme(group_size=48)
    assert QuantScheme.parse("w4g128-sym") == QuantScheme(4, 128, True)

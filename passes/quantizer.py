"""Group-wise integer weight quantization: one scheme dataclass, quantize/dequantize written once.

Both asymmetric and symmetric schemes store q in [0, 2^bits) with a per-group scale and zero
point, so every kernel dequantizes the same way: w = (q - zero) * scale. Artifacts store scales
as float16 and zeros as 4-bit integers (schedules/layouts.py), so scales are rounded to float16
here, before the zero point and q are derived from them: the fake-quant reference, the AWQ
search and the kernels then see the same weights.
"""
from __future__ import annotations

import dataclasses
import re

import torch

GROUP_SIZES = (128, 64, 32)
# Smallest normal float16: a scale below it would lose precision (or flush to zero) in storage.
MIN_SCALE = 2.0 ** -14


class QuantizationError(ValueError):
    """A layer or setting the quantizer cannot handle; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    # 16: float activations (W4A16). 8: decode kernels round each activation group to int8
    # (scale max|x| / 127) and use integer dot products (x86 CPUs; schedules/w4a8_cpu.py).
    act_bits: int = 16

    def __post_init__(self) -> None:
        if self.act_bits not in (8, 16):
            raise QuantizationError(f"{self.act_bits}-bit activations are not supported; use a8 or none (float)")
        if self.bits != 4:
            raise QuantizationError(f"{self.bits}-bit weights are not supported; awqc packs 4-bit weights")
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(
                f"group size {self.group_size} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        act = "a8" if self.act_bits == 8 else ""
        return f"w{self.bits}{act}g{self.group_size}" + ("-sym" if self.symmetric else "")

    @property
    def bits_per_weight(self) -> float:
        """As artifacts store it (schedules/layouts.py): a float16 scale and a 4-bit zero per group."""
        return self.bits + (16 + self.bits) / self.group_size

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        """'w4g64', 'w4g128-sym', 'w4a8g64', ..."""
        m = re.fullmatch(r"w(\d+)(?:a(\d+))?g(\d+)(-sym)?", text)
        if not m:
            raise QuantizationError(
                f"cannot parse quantization {text!r}; expected e.g. w4g64, w4g128-sym or w4a8g64")
        return cls(int(m.group(1)), int(m.group(3)), bool(m.group(4)), int(m.group(2) or 16))

    def check_layer(self, name: str, in_features: int) -> None:
        """A group must not straddle rows: the input dimension must be a multiple of the group size."""
        if in_features % self.group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            hint = f"group sizes that divide it: {', '.join(map(str, fits))}" if fits else "no supported group size divides it"
            raise QuantizationError(
                f"layer {name} has {in_features} input features, not a multiple of group size "
                f"{self.group_size}; {hint}")


def group_params(w: torch.Tensor, scheme: QuantScheme,
                 clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point of w [N, K] as [N, K/G]; `clip` [N, K/G] shrinks each
    group's range (AWQ clipping searches it)."""
    n, k = w.shape
    g = w.reshape(n, k // scheme.group_size, scheme.group_size)
    if scheme.symmetric:
        amax = g.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        scale = _float16(amax / (scheme.qmax // 2))
        zero = torch.full_like(scale, (scheme.qmax + 1) // 2)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = _float16((hi - lo) / scheme.qmax)
        zero = torch.round(-lo / scale).clamp(0, scheme.qmax)
    return scale, zero


def _float16(scale: torch.Tensor) -> torch.Tensor:
    """The scale rounded to the float16 value it will be stored as (kept in its own dtype)."""
    return scale.clamp(min=MIN_SCALE).to(torch.float16).to(scale.dtype)


_CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many weights


def quantize(w: torch.Tensor, scheme: QuantScheme,
             clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] → (q uint8 [N, K] in [0, qmax], scale [N, K/G], zero [N, K/G]). Rows are
    independent, so a large weight (an LM head of 128k rows) is done a chunk of rows at a time:
    the float temporaries stay a few MB instead of several copies of the weight. Stacked experts
    [E, N, K] are E * N such rows, and keep their leading dimension."""
    if w.dim() > 2:
        flat = quantize(w.reshape(-1, w.shape[-1]), scheme, None if clip is None else clip.reshape(-1, clip.shape[-1]))
        return tuple(a.reshape(*w.shape[:-1], a.shape[-1]) for a in flat)  # type: ignore[return-value]
    n, k = w.shape
    rows = max(1, _CHUNK_ELEMENTS // k)
    q = torch.empty(n, k, dtype=torch.uint8)
    scale = torch.empty(n, k // scheme.group_size, dtype=w.dtype)
    zero = torch.empty_like(scale)
    for r in range(0, n, rows):
        part = slice(r, r + rows)
        s, z = group_params(w[part], scheme, None if clip is None else clip[part])
        g = w[part].reshape(-1, k // scheme.group_size, scheme.group_size)
        q[part] = torch.round(g / s[..., None] + z[..., None]).clamp(0, scheme.qmax).reshape(-1, k).to(torch.uint8)
        scale[part], zero[part] = s, z
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of quantize (up to rounding): q [..., N, K] → float [..., N, K]."""
    g = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size).to(scale.dtype)
    return ((g - zero[..., None]) * scale[..., None]).reshape(q.shape)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (the weights a quantized kernel effectively multiplies by)."""
    q, scale, zero = quantize(w, scheme, clip)
    return dequantize(q, scale, zero, scheme.group_size)


@dataclasses.dataclass
class QuantizedWeights:
    """A model's weights after quantization: the linear weights as (q, scale, zero), and every other
    parameter (norms AWQ rescaled, embeddings, biases) in float."""
    scheme: QuantScheme
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # name -> (q uint8 [(E,) N, K], scale, zero)
    floats: dict[str, torch.Tensor]

    def dequantized(self) -> dict[str, torch.Tensor]:
        """All parameters in float, quantized ones dequantized: the fake-quant reference weights."""
        out = dict(self.floats)
        for name, (q, scale, zero) in self.quantized.items():
            out[name] = dequantize(q, scale, zero, self.scheme.group_size)
        return out


def is_quantized_linear(name: str, shape: tuple[int, ...], quantize_head: bool = False) -> bool:
    """Which parameters are linear weights to quantize: 2-D weights of the decoder layers and
    stacked experts [E, N, K] (and the untied LM head if asked). The embedding stays float: it is a lookup, not a matmul; so does a
    mixture of experts' router (E outputs: a few KB that choose which experts run, which llama.cpp
    and AutoAWQ keep in float too)."""
    stacked_experts = len(shape) == 3 and ".experts." in name
    if not (len(shape) == 2 or stacked_experts) or not name.endswith(".weight") or name == "embed_tokens.weight" \
            or ".router." in name:
        return False
    return quantize_head or name != "lm_head.weight"


def rtn_quantize(weights: dict[str, torch.Tensor], scheme: QuantScheme,
                 quantize_head: bool = False) -> QuantizedWeights:
    """Round-to-nearest: every linear weight quantized as it is (the AWQ baseline)."""
    quantized, floats = {}, {}
    for name, w in weights.items():
        if is_quantized_linear(name, tuple(w.shape), quantize_head):
            scheme.check_layer(name, w.shape[-1])
            quantized[name] = quantize(w, scheme)
        else:
            floats[name] = w
    return QuantizedWeights(scheme, quantized, floats)

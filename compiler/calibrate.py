"""Calibration: text → token samples → per-input-channel statistics of every linear layer's input,
one decoder block at a time.

The samples' hidden states are carried through the float model block by block (`BlockCalibrator`):
block i runs on the outputs of block i-1 (with the original float weights, as AWQ's reference and
AutoAWQ do), its linears' inputs are reduced to statistics as they stream by, and the block's
outputs replace the hidden states. Memory is one block's weights and statistics plus the hidden
states (samples × tokens × hidden floats), never the whole model. A block runs as transformers'
own decoder layer of the model's family (the reference semantics, and fast CPU kernels).

Per linear input, over every calibration token:

* `abs_mean[k]` = mean |x_k| (AWQ's activation scale s_x);
* `gram` = mean x xᵀ, the input's second-moment matrix G/T. AWQ's loss for weights W' replacing W
  on inputs X is ||X (W' - W)ᵀ||² = T · sum((E @ gram) * E) with E = W' - W, so the scale and clip
  searches never need the activations themselves.

With `probe_samples`, a few whole batches of samples also keep the inputs and float outputs of
the block's submodules that the taps sit in (transformers' `self_attn`, `mlp`): a `BlockProbe`
replays a submodule with some linears replaced, so AWQ can measure a norm's scales on the
attention or MLP output, as the reference does (passes/awq_scale.py), not only on the linears' own
outputs. Memory: those samples' activations for one block.

The Gram costs T·K² per input, so by default it is estimated from `gram_tokens` tokens drawn at
random (seeded) from each sample; `abs_mean` always uses every token. `gram_tokens=None` uses all.
While fewer tokens than the input's width feed it (a 7B model at 16 samples), the Gram is kept as
those tokens' rows instead (`SecondMoment`): smaller, and the searches' losses cost less.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..passes.awq_scale import SecondMoment
from .config import ModelConfig
from .model_import import ImportedModel, block_params
from .models import family
from .text_data import default_calibration_texts, read_text, token_windows, tokenize

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_GRAM_TOKENS = 128  # per sample: 16k tokens for the Gram at the defaults
DEFAULT_PROBE_SAMPLES = 16  # samples a block probe replays per candidate (--awq-loss block)
_BATCH = 8  # samples per block forward
CACHE_FORMAT = "awqc-calibration/3"

HEAD = "lm_head.weight"


class CalibrationError(ValueError):
    """Calibration cannot run or produced unusable activations (the message names the layer)."""


@dataclasses.dataclass
class InputStats:
    """Statistics of one tensor that feeds the linears `consumers` (weight names)."""

    consumers: tuple[str, ...]
    abs_mean: torch.Tensor  # [K] float32, mean |x| per input channel
    moment: SecondMoment  # mean x xᵀ, as the Gram or as its token rows
    n_tokens: int
    n_gram_tokens: int

    @property
    def gram(self) -> torch.Tensor:
        """mean x xᵀ [K, K] (built from the rows when it is held as rows)."""
        return self.moment.dense()


@dataclasses.dataclass
class CalibrationStats:
    inputs: list[InputStats]
    n_samples: int
    seq_len: int
    seconds: dict[str, float]  # wall time of the phases: forward, stats
    probe: "BlockProbe | None" = None  # the block's submodules on a few samples, when asked for

    def __post_init__(self) -> None:
        self._by_weight = {w: s for s in self.inputs for w in s.consumers}

    def of(self, weight: str) -> InputStats:
        """The statistics of the input of linear layer `weight`."""
        if weight not in self._by_weight:
            raise KeyError(f"no calibration statistics for {weight}")
        return self._by_weight[weight]

    def __contains__(self, weight: str) -> bool:
        return weight in self._by_weight


# -- samples ---------------------------------------------------------------------------------------
def calibration_samples(encode: Callable[[str], list[int]], text: str | None = None,
                        n_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN) -> list[list[int]]:
    """`n_samples` windows of `seq_len` tokens spread over the text (default: half over the Python
    library reference, half over the fortunes' prose; text_data.default_calibration_texts). A text
    shorter than one sample is an error that names the minimum."""
    if n_samples < 1:
        raise CalibrationError(f"the number of calibration samples must be positive, got {n_samples}")
    texts = default_calibration_texts() if text is None else [text]
    windows = []
    for i, body in enumerate(texts):
        share = (n_samples + len(texts) - 1 - i) // len(texts)  # the first texts take any remainder
        if share:
            windows += token_windows(tokenize(encode, body), seq_len, share, what="calibration text",
                                     hint=" (--calib-text FILE, or a shorter --calib-seq-len)")
    if len(windows) < n_samples:
        print(f"calibrate: the text holds {len(windows)} samples of {seq_len} tokens, fewer than the "
              f"{n_samples} asked; using {len(windows)}", file=sys.stderr)
    return windows


def hf_encoder(tokenizer) -> Callable[[str], list[int]]:
    """Token ids of a text without special tokens, from a transformers tokenizer."""
    return lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]


def load_samples(model: ImportedModel, calib_text: str | Path | None = None, n_samples: int = DEFAULT_SAMPLES,
                 seq_len: int = DEFAULT_SEQ_LEN) -> list[list[int]]:
    text = None if calib_text is None else read_text(calib_text)
    return calibration_samples(hf_encoder(model.tokenizer), text, n_samples, seq_len)


# -- the block-by-block forward --------------------------------------------------------------------
def _family(cfg: ModelConfig):
    """transformers' config, decoder-layer, rotary-embedding and RMSNorm classes of the model's family."""
    import importlib

    import transformers
    from transformers import AutoConfig

    from .autoawq import hf_config

    hf = hf_config(cfg)
    if cfg.rope_scaling.get("long_context"):  # the artifact rotates by the long factors at every position
        hf["rope_scaling"] = {**hf["rope_scaling"], "short_factor": hf["rope_scaling"]["long_factor"]}
    config = AutoConfig.for_model(**hf)
    # sdpa is causal when no mask is given; it cannot soft-cap scores (Gemma 2), eager can, given masks
    config._attn_implementation = "sdpa" if cfg.attn_logit_softcapping is None else "eager"
    config._experts_implementation = "eager"  # the MoE block run standalone, as its own module
    arch = hf["architectures"][0]
    prefix = arch.removesuffix("ForCausalLM")
    module = importlib.import_module(getattr(transformers, arch).__module__)
    return (config, getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RotaryEmbedding"),
            getattr(module, f"{prefix}RMSNorm"))


class _Accumulator:
    """Running sums for one tapped input. The Gram's token rows are kept as they are while there
    are fewer of them than input features (a 7B model's layers at 16 samples), else summed into
    the Gram in float32 via addmm (per-batch sums of a few thousand tokens are exact enough, and
    float64 would double the time)."""

    def __init__(self, consumers: tuple[str, ...], features: int, device: torch.device = torch.device("cpu")):
        self.consumers = consumers
        self.features, self.device = features, device
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.rows: list[torch.Tensor] | None = []
        self.gram: torch.Tensor | None = None
        self.n = 0
        self.n_gram = 0

    def add(self, x: torch.Tensor, rows: torch.Tensor | None, first_sample: int) -> None:
        """x [samples, tokens, K]; rows: indices into its flattened tokens that feed the Gram."""
        flat = x.reshape(-1, x.shape[-1])
        abs_sum = torch.linalg.vector_norm(flat, ord=1, dim=0)  # NaN/inf in x show up in it
        if not bool(torch.isfinite(abs_sum).all()):
            raise CalibrationError(
                f"the input of {', '.join(self.consumers)} has NaN or inf on calibration samples "
                f"{first_sample}..{first_sample + x.shape[0] - 1}; the float model overflows on this text "
                "(check the weights, or calibrate on other text)")
        self.abs_sum += abs_sum
        self.n += flat.shape[0]
        xs = flat if rows is None else flat.index_select(0, rows)
        self.n_gram += xs.shape[0]
        if self.gram is None and self.n_gram <= self.features:
            self.rows.append(xs.clone())  # x is the block's buffer, overwritten by its output
            return
        if self.gram is None:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float32, device=self.device)
            for r in self.rows:
                torch.addmm(self.gram, r.T, r, out=self.gram)
            self.rows = None
        torch.addmm(self.gram, xs.T, xs, out=self.gram)

    def result(self) -> InputStats:
        n = max(self.n_gram, 1)
        if self.gram is not None:
            moment = SecondMoment(gram=(self.gram / n).cpu())
        else:
            moment = SecondMoment(rows=(torch.cat(self.rows) / math.sqrt(n)).cpu())
        return InputStats(self.consumers, (self.abs_sum / max(self.n, 1)).float().cpu(), moment, self.n, self.n_gram)


class BlockProbe:
    """A decoder block's submodules (transformers' `self_attn`, `mlp`) with their inputs and float
    outputs on a few calibration samples: `loss` replays one with some linears replaced."""

    def __init__(self, cfg: ModelConfig, layer: torch.nn.Module, prefix: str, modules: Mapping[str, str]):
        self.cfg, self.layer, self.prefix = cfg, layer, prefix
        self.module_of = dict(modules)  # awqc weight (with prefix) -> the submodule it sits in
        self.calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {m: [] for m in set(modules.values())}

    def record(self, module: str, args: tuple, kwargs: dict, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.calls[module].append((tuple(args), dict(kwargs), out))

    @property
    def n_tokens(self) -> int:
        calls = next(iter(self.calls.values()))
        return sum(out.shape[0] * out.shape[1] for *_, out in calls)

    def module(self, weights: Sequence[str]) -> str | None:
        """The one submodule all of `weights` sit in, else None."""
        modules = {self.module_of.get(w) for w in weights}
        return modules.pop() if len(modules) == 1 and None not in modules else None

    def loss(self, module: str, replaced: Mapping[str, torch.Tensor]) -> float:
        """Mean over the probe's tokens of ||y' - y||², y the submodule's float output and y' its
        output with the awqc weights `replaced` (names with the block prefix) swapped in."""
        from torch.func import functional_call

        local = family(self.cfg.model_type).hf_block_weights(self.cfg, replaced, self.prefix)
        sub = self.layer.get_submodule(module)
        device = next(sub.parameters()).device  # the calibration device (--calib-device)
        params = {k.removeprefix(module + "."): v.to(device) for k, v in local.items()}
        total = 0.0
        with torch.no_grad():
            for args, kwargs, ref in self.calls[module]:
                out = functional_call(sub, params, args=args, kwargs=kwargs)
                out = out[0] if isinstance(out, tuple) else out
                total += float(torch.sub(out, ref).square_().sum(dtype=torch.float64))
        return total / self.n_tokens


_LAYER_TYPES = ("sliding_attention", "full_attention")  # transformers' layer_types


def _attention_mask(t: int, window: int | None, eager: bool, device: torch.device) -> torch.Tensor | None:
    """[1, 1, t, t] mask of causal attention within `window` positions (None: unbounded): position
    q sees k when q - window < k <= q. sdpa takes it boolean, or None for plain causal attention
    (a window at least t long is that); eager attention adds it to the scores."""
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (k <= q) & (k > q - (window or t))
    if not eager:
        return None if window is None or t <= window else visible[None, None].to(device)
    return torch.zeros(t, t).masked_fill_(~visible, torch.finfo(torch.float32).min)[None, None].to(device)


class _ExpertTaps:
    """The inputs of every expert's gate/up and down in an MoE block, over the tokens routed to
    it: the router's choice recomputed from the block's input as transformers' router makes it
    (softmax in float32, top num_experts_per_tok), each expert's down input from its own gate/up.
    An expert that no calibration token chose gets no statistics; AWQ then rounds it to nearest
    and leaves its up → down group unscaled, while its gate/up columns still take the norm's
    scale (the norm is shared, and the model's function must not change)."""

    def __init__(self, cfg: ModelConfig, prefix: str, weights: Mapping[str, torch.Tensor], device: torch.device):
        self.top_k = cfg.num_experts_per_tok
        self.router = weights[prefix + "mlp.router.weight"].to(device)
        self.gate_up = weights[prefix + "mlp.experts.gate_up_proj.weight"].to(device)
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.accs = [(_Accumulator((f"{prefix}mlp.experts.{e}.gate_up_proj.weight",), h, device),
                      _Accumulator((f"{prefix}mlp.experts.{e}.down_proj.weight",), i, device))
                     for e in range(cfg.num_experts)]

    def add(self, x: torch.Tensor, first_sample: int) -> None:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(flat @ self.router.T, dim=-1, dtype=torch.float32)
        chosen = probs.topk(self.top_k, dim=-1).indices
        for e, (acc_gate_up, acc_down) in enumerate(self.accs):
            rows = (chosen == e).any(-1).nonzero().squeeze(-1)
            if len(rows) == 0:
                continue
            xe = flat.index_select(0, rows)
            gate, up = (xe @ self.gate_up[e].T).chunk(2, dim=-1)
            acc_gate_up.add(xe[None], None, first_sample)
            acc_down.add((torch.nn.functional.silu(gate) * up)[None], None, first_sample)

    def results(self) -> list[InputStats]:
        return [a.result() for pair in self.accs for a in pair if a.n]


class BlockCalibrator:
    """The calibration samples' hidden states, advanced through the model one decoder block at a
    time; each step returns the statistics of that block's linear inputs."""

    def __init__(self, model: ImportedModel, samples: Sequence[Sequence[int]],
                 gram_tokens: int | None = DEFAULT_GRAM_TOKENS, seed: int = 0, device: str = "cpu"):
        if not samples:
            raise CalibrationError("no calibration samples")
        if len({len(s) for s in samples}) != 1:
            raise CalibrationError("calibration samples must all have the same length")
        self.cfg = model.config
        self._weight_map = family(model.config.model_type)
        self._hf, self._layer_cls, rotary_cls, self._norm_cls = _family(model.config)
        ids = np.asarray(samples, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise CalibrationError(f"calibration token ids reach {ids.max()}, past the model's vocabulary of "
                                   f"{self.cfg.vocab_size}; the tokenizer does not belong to this model")
        self.hidden = torch.from_numpy(model.weights["embed_tokens.weight"][ids])  # [samples, tokens, hidden]
        self.hidden *= self._weight_map.embedding_scale(self.cfg)
        n, t = ids.shape
        # The hidden states stay in host memory; each batch visits the device (a 7B model's
        # 128 samples are 1 GiB of them).
        self.device = torch.device(device)
        rotary, positions = rotary_cls(self._hf), torch.arange(t)[None]
        with torch.no_grad():  # cos/sin per layer type where they differ (Gemma 3's RoPE bases)
            ropes = ({None: rotary(self.hidden[:1], positions)} if self.cfg.rope_local_theta is None else
                     {kind: rotary(self.hidden[:1], positions, kind) for kind in _LAYER_TYPES})
        self._rope = {kind: tuple(r.to(self.device) for r in rope) for kind, rope in ropes.items()}
        eager = self._hf._attn_implementation == "eager"
        self._masks = {sliding: _attention_mask(t, self.cfg.sliding_window if sliding else None, eager, self.device)
                       for sliding in (False, True)}
        gen = torch.Generator().manual_seed(seed)
        self._rows = None
        if gram_tokens is not None and gram_tokens < t:
            self._rows = [torch.randperm(t, generator=gen)[:gram_tokens].sort().values for _ in range(n)]
        self.seconds = {"forward": 0.0}

    @property
    def n_samples(self) -> int:
        return self.hidden.shape[0]

    def _batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(first sample, hidden states of a batch of samples, the batch's Gram rows as indices
        into its flattened tokens: one gather per input instead of one per sample)."""
        t = self.hidden.shape[1]
        for start in range(0, self.n_samples, _BATCH):
            rows = None
            if self._rows is not None:
                rows = torch.cat([r + b * t for b, r in enumerate(self._rows[start:start + _BATCH])])
            yield start, self.hidden[start:start + _BATCH], None if rows is None else rows.to(self.device)

    def probe_batches(self, probe_samples: int) -> set[int]:
        """First samples of the batches a probe keeps: `probe_samples` rounded up to whole
        batches, spread evenly over the samples (which run through the calibration texts in order)."""
        n_batches = math.ceil(self.n_samples / _BATCH)
        k = min(n_batches, math.ceil(probe_samples / _BATCH))
        return {(j * n_batches // k) * _BATCH for j in range(k)} if k else set()

    def block(self, i: int, weights: Mapping[str, torch.Tensor],
              probe_samples: int = 0) -> tuple[list[InputStats], BlockProbe | None]:
        """Run block i (its float weights, awqc names) on the hidden states, replacing them with
        its outputs; the statistics of its tapped linear inputs, and with `probe_samples` a probe
        of its submodules on that many samples (rounded up to whole batches)."""
        prefix = f"layers.{i}."
        with torch.device("meta"):
            layer = self._layer_cls(self._hf, i)
        layer.load_state_dict(self._weight_map.hf_block_weights(self.cfg, weights, prefix), assign=True, strict=True)
        layer.eval().to(self.device)
        accs, hooks, current = [], [], {}
        moe = i in self.cfg.moe_layers
        experts = _ExpertTaps(self.cfg, prefix, weights, self.device) if moe else None
        if experts is not None:  # the MoE block's input: each expert's tokens picked out of it
            hooks.append(layer.get_submodule("mlp").register_forward_pre_hook(
                lambda _m, args: experts.add(args[0], current["start"])))
        taps = {m: w for m, w in self._weight_map.HF_TAPS.items() if not (moe and m.startswith("mlp."))}
        for module, weight in taps.items():
            acc = _Accumulator((prefix + weight,), weights[prefix + weight].shape[1], self.device)
            accs.append(acc)
            hooks.append(layer.get_submodule(module).register_forward_pre_hook(
                lambda _m, args, acc=acc: acc.add(args[0], current["rows"], current["start"])))
        probe, kept = None, self.probe_batches(probe_samples)
        if kept:
            probe = BlockProbe(self.cfg, layer, prefix, {prefix + w: m.rsplit(".", 1)[0] for m, w in taps.items()})
            for name in probe.calls:
                hooks.append(layer.get_submodule(name).register_forward_hook(
                    lambda _m, args, kwargs, output, name=name: (
                        probe.record(name, args, kwargs, output) if current["start"] in kept else None),
                    with_kwargs=True))
        sliding = i in self.cfg.sliding_layers
        mask = self._masks[sliding]
        rope = self._rope[None if self.cfg.rope_local_theta is None else _LAYER_TYPES[not sliding]]
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for start, x, rows in self._batches():
                    current.update(start=start, rows=rows)
                    out = layer(x.to(self.device), attention_mask=mask, position_embeddings=rope)
                    x.copy_(out[0] if isinstance(out, tuple) else out)
        finally:
            for h in hooks:
                h.remove()
        self.seconds["forward"] += time.perf_counter() - t0
        return [a.result() for a in accs] + (experts.results() if experts else []), probe

    def head(self, norm_weight: torch.Tensor) -> list[InputStats]:
        """The statistics of the LM head's input: the final norm of the hidden states."""
        with torch.device("meta"):
            norm = self._norm_cls(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps)
        norm.load_state_dict({"weight": norm_weight}, assign=True)
        norm.to(self.device)
        acc = _Accumulator((HEAD,), self.cfg.hidden_size, self.device)
        with torch.no_grad():
            for start, x, rows in self._batches():
                acc.add(norm(x.to(self.device)), rows, start)
        return [acc.result()]


# -- calibration, computed or from a cache ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    text: str | Path | None = None  # calibration text file (None: text_data.default_calibration_texts)
    n_samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    gram_tokens: int | None = DEFAULT_GRAM_TOKENS
    cache: Path | None = None  # statistics cache: read if it exists, else written
    device: str = "cpu"  # where the block forward runs (torch device: cpu, cuda, cuda:1)
    probe_samples: int = 0  # samples each block's probe replays (0: no probe; BlockProbe)


def check_calib_device(device: str) -> None:
    """A device the calibration forward can run on here, else an error that says what to do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CalibrationError(f"--calib-device {device!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise CalibrationError(f"--calib-device {device}: calibration runs on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise CalibrationError(f"--calib-device {device}: this torch ({torch.__version__}) has no usable CUDA device; "
                               "install a CUDA build of torch on a machine with an NVIDIA GPU, or calibrate on the "
                               "CPU (drop --calib-device)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CalibrationError(f"--calib-device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def _tapped(cfg: ModelConfig, head: bool) -> list[tuple[str, int]]:
    """Every tapped input (its first consumer weight) and its width, in model order (of an MoE
    layer, the attention's: which experts get statistics depends on the calibration tokens)."""
    from .model_import import expected_shapes

    shapes, taps = expected_shapes(cfg), family(cfg.model_type).HF_TAPS.values()
    out = [(f"layers.{i}.{w}", shapes[f"layers.{i}.{w}"][1]) for i in range(cfg.num_hidden_layers) for w in taps
           if not (i in cfg.moe_layers and w.startswith("mlp."))]
    return out + ([(HEAD, cfg.hidden_size)] if head else [])


def _cache_key(model: ImportedModel, settings: CalibrationSettings, samples: Sequence[Sequence[int]],
               head: bool) -> str:
    """What the statistics depend on: the model (config and a fingerprint of its files), the
    sample tokens themselves, the Gram subsampling and whether the head is tapped."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(_files_fingerprint(Path(model.source)).encode())
    h.update(np.asarray(samples, dtype=np.int64).tobytes())
    h.update(json.dumps([settings.gram_tokens, head, 0]).encode())  # 0: the row-sampling seed
    return h.hexdigest()


def _files_fingerprint(source: Path) -> str:
    """Names, sizes and the first MiB (which holds the tensor index) of the checkpoint's files:
    cheap on a 16 GB checkpoint, and different for any other model."""
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors")) if source.is_dir() else []
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(f"{f.name}:{f.stat().st_size}:".encode() + fh.read(1 << 20))
    return h.hexdigest()


class Calibration:
    """The statistics of every block's linear inputs, one block at a time: computed by a
    BlockCalibrator (and written to the cache when one is named) or read from the cache."""

    def __init__(self, model: ImportedModel, settings: CalibrationSettings, head: bool = False):
        self.model, self.settings, self.head_tapped = model, settings, head
        if model.config.num_experts and (settings.cache is not None or settings.probe_samples):
            raise CalibrationError("--calib-stats and --awq-loss block are not supported for mixture-of-experts models "
                                   f"({model.config.model_type}) yet; calibrate without them")
        samples = load_samples(model, settings.text, settings.n_samples, settings.seq_len)
        self.key = _cache_key(model, settings, samples, head)
        self._taps = _tapped(model.config, head)
        self._reader = self._writer = self._calibrator = None
        cache = settings.cache
        if cache is not None and cache.is_file() and settings.probe_samples:
            print(f"calibrate: the block-output loss needs the calibration forward; {cache} is not read",
                  file=sys.stderr)
            cache = None
        if cache is not None and cache.is_file():
            self._reader = _open_cache(cache, self.key, self._taps)
        else:
            self._calibrator = BlockCalibrator(model, samples, settings.gram_tokens, device=settings.device)
            if cache is not None:
                self._start_cache(cache)
        self.n_samples, self.seq_len = len(samples), len(samples[0])

    def _start_cache(self, cache: Path) -> None:
        from .tensor_file import SafetensorsWriter

        self._cache_tmp = cache.with_name(f".{cache.name}.tmp")
        names = [f"{w}.{part}" for w, _ in self._taps for part in ("abs_mean", "moment", "counts")]
        self._writer = SafetensorsWriter(self._cache_tmp, names, {"format": CACHE_FORMAT, "key": self.key})

    def block(self, i: int, weights: Mapping[str, torch.Tensor]) -> CalibrationStats:
        """Block i's statistics (`weights`: its float weights, used only when computing)."""
        if self._reader is not None:
            return self._stats([self._reader(w) for w, _ in self._taps if w.startswith(f"layers.{i}.")])
        inputs, probe = self._calibrator.block(i, weights, self.settings.probe_samples)
        return self._stats(self._store(inputs), probe)

    def head(self, norm_weight: torch.Tensor) -> CalibrationStats:
        if self._reader is not None:
            return self._stats([self._reader(HEAD)])
        return self._stats(self._store(self._calibrator.head(norm_weight)))

    @property
    def seconds(self) -> dict[str, float]:
        """Wall time of the calibration forward so far ({} when read from the cache)."""
        return dict(self._calibrator.seconds) if self._calibrator else {}

    def _stats(self, inputs: list[InputStats], probe: BlockProbe | None = None) -> CalibrationStats:
        return CalibrationStats(inputs, self.n_samples, self.seq_len, self.seconds, probe)

    def _store(self, inputs: list[InputStats]) -> list[InputStats]:
        if self._writer is not None:
            for s in inputs:
                w = s.consumers[0]
                self._writer.write(f"{w}.abs_mean", s.abs_mean.numpy())
                m = s.moment
                self._writer.write(f"{w}.moment", (m.gram if m.gram is not None else m.rows).numpy())
                self._writer.write(f"{w}.counts", np.array([s.n_tokens, s.n_gram_tokens], dtype=np.int64))
        return inputs

    def finish(self) -> None:
        """Every block was calibrated: the cache (if computing one) is complete, move it into place."""
        if self._writer is not None:
            import os

            self._writer.close()
            os.replace(self._cache_tmp, self.settings.cache)
            self._writer = None

    def abandon(self) -> None:
        """Stopped early: an incomplete cache is never left behind."""
        if self._writer is not None:
            self._writer.abort()
            self._cache_tmp.unlink(missing_ok=True)
            self._writer = None


def _open_cache(path: Path, key: str, taps: list[tuple[str, int]]) -> Callable[[str], InputStats]:
    """A reader of the cache's statistics by tap, after checking that it belongs to this model and
    these settings and holds every tap, with the right sizes and finite values."""
    from safetensors import SafetensorError, safe_open

    fix = "delete it to recalibrate, or pass another --calib-stats path"
    try:
        handle = safe_open(str(path), framework="pt")
        meta = handle.metadata() or {}
        names = set(handle.keys())
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CalibrationError(f"calibration cache {path} is not readable ({err}); {fix}") from None
    if meta.get("format") != CACHE_FORMAT:
        raise CalibrationError(f"calibration cache {path} is not an awqc {CACHE_FORMAT} file; {fix}")
    if meta.get("key") != key:
        raise CalibrationError(f"calibration cache {path} was made for another model, calibration text or "
                               f"settings; {fix}")
    widths = dict(taps)
    missing = [w for w in widths if not {f"{w}.abs_mean", f"{w}.moment", f"{w}.counts"} <= names]
    if missing:
        raise CalibrationError(f"calibration cache {path} is incomplete (no statistics for {missing[0]}); {fix}")

    def read(weight: str) -> InputStats:
        k = widths[weight]
        abs_mean, moment = handle.get_tensor(f"{weight}.abs_mean"), handle.get_tensor(f"{weight}.moment")
        counts = handle.get_tensor(f"{weight}.counts")
        ok = abs_mean.shape == (k,) and counts.shape == (2,) and int(counts.min()) >= 1
        # the rows when fewer tokens than features fed the Gram (as _Accumulator keeps them)
        as_rows = ok and int(counts[1]) <= k
        ok = ok and moment.shape == ((int(counts[1]), k) if as_rows else (k, k))
        if not (ok and bool(torch.isfinite(abs_mean).all() and torch.isfinite(moment).all())):
            raise CalibrationError(f"calibration cache {path} holds damaged statistics for {weight}; {fix}")
        moment = SecondMoment(rows=moment.float()) if as_rows else SecondMoment(gram=moment.float())
        return InputStats((weight,), abs_mean.float(), moment, int(counts[0]), int(counts[1]))

    return read


def _every_block(model: ImportedModel, block: Callable[[int, dict[str, torch.Tensor]], list[InputStats]],
                 head: Callable[[torch.Tensor], list[InputStats]] | None, progress: bool) -> list[InputStats]:
    """The statistics of every block (and of the head's input when `head` is given), in model order."""
    from tqdm import tqdm

    inputs: list[InputStats] = []
    for i in tqdm(range(model.config.num_hidden_layers), desc="calibrate", unit="block", disable=not progress,
                  file=sys.stderr):
        inputs += block(i, {n: torch.from_numpy(model.weights[n]) for n in block_params(model.config, i)})
    if head is not None:
        inputs += head(torch.from_numpy(model.weights["norm.weight"]))
    return inputs


def calibration_stats(model: ImportedModel, settings: CalibrationSettings = CalibrationSettings(),
                      quantize_head: bool = False, progress: bool = True) -> CalibrationStats:
    """Every block's statistics at once (for evaluation and tests on small models; the compile
    driver takes them block by block instead)."""
    head = quantize_head and not model.config.tie_word_embeddings
    cal = Calibration(model, settings, head)
    try:
        inputs = _every_block(model, lambda i, w: cal.block(i, w).inputs,
                              (lambda norm: cal.head(norm).inputs) if head else None, progress)
        cal.finish()
    except BaseException:
        cal.abandon()
        raise
    return cal._stats(inputs)


def calibrate(model: ImportedModel, samples: Sequence[Sequence[int]], quantize_head: bool = False,
              gram_tokens: int | None = DEFAULT_GRAM_TOKENS, progress: bool = False) -> CalibrationStats:
    """The statistics of every quantized linear's input over the given token samples."""
    head = quantize_head and not model.config.tie_word_embeddings
    cal = BlockCalibrator(model, samples, gram_tokens)
    inputs = _every_block(model, lambda i, w: cal.block(i, w)[0], cal.head if head else None, progress)
    return CalibrationStats(inputs, len(samples), len(samples[0]), dict(cal.seconds))

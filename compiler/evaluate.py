"""Perplexity of a compiled model on a text, and float / RTN / AWQ side by side.

One code path scores everything: runtime.engine.Engine.score on non-overlapping windows, each from
an empty KV cache. A quantized weight set (before int4 kernels exist) is evaluated by compiling
the float model once and loading the dequantized weights into the same Engine: only the weights
differ between float, RTN and AWQ, not the library.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .calibrate import CalibrationSettings
from .text_data import eval_domain_text, faq_questions, read_text, token_windows, tokenize

DEFAULT_WINDOWS = 40
DEFAULT_WINDOW_LEN = 512
CHAT_PROMPTS = 32
CHAT_ANSWER_TOKENS = 96


@dataclasses.dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (window_len - 1 per window)
    windows: int
    seconds: float
    ppl_stderr: float = 0.0  # ppl × the standard error of the mean NLL (llama-perplexity's ±)


@dataclasses.dataclass
class Divergence:
    """How far an artifact's next-token distributions are from a base (float) artifact's, over
    the same windows, as llama-perplexity --kl-divergence reports it."""

    kld_mean: float  # nats
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top1: float  # share of tokens where both put the same token first
    tokens: int
    ppl: Perplexity  # of the artifact
    base_ppl: Perplexity


def eval_windows(engine: Any, text: str | Path | None = None, n_windows: int | None = DEFAULT_WINDOWS,
                 window_len: int = DEFAULT_WINDOW_LEN, domain: str = "python-docs") -> list[list[int]]:
    """Windows of the evaluation text: the file `text`, else the named domain's text
    (text_data.EVAL_DOMAINS: the Python tutorial/FAQ/HOWTOs, or the Jargon File; never the
    calibration text), tokenized by the artifact's own tokenizer."""
    body = eval_domain_text(domain) if text is None else read_text(text)

    def encode(s: str) -> list[int]:
        return engine.tokenizer.encode(s, add_special_tokens=False).ids

    return token_windows(tokenize(encode, body), window_len, n_windows, what="evaluation text",
                         hint=" (--text FILE, or a shorter --window-len)", unit="window")


def perplexity(engine: Any, windows: Sequence[Sequence[int]], progress: bool = True, desc: str = "eval") -> Perplexity:
    """exp(mean NLL) of every token after the first of each window, given the tokens before it in
    the same window."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    nlls = []
    for ids in tqdm(windows, desc=desc, unit="window", disable=not progress, file=sys.stderr):
        nlls.append(_token_nll(_log_probs(engine, ids), ids))
    engine.reset()
    return _perplexity(torch.cat(nlls) if nlls else torch.zeros(0), len(windows), time.perf_counter() - t0)


def _log_probs(engine: Any, ids: Sequence[int]) -> torch.Tensor:
    """log p(next token) at every position but the last, [len - 1, vocab] float64."""
    return torch.log_softmax(torch.from_numpy(engine.score(list(ids)))[:-1].double(), dim=-1)


def _token_nll(logp: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    return -logp.gather(1, torch.tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]


def _perplexity(nll: torch.Tensor, windows: int, seconds: float) -> Perplexity:
    n = len(nll)
    mean = float(nll.mean()) if n else 0.0
    stderr = float(nll.std() / math.sqrt(n)) if n > 1 else 0.0
    return Perplexity(math.exp(mean), mean, n, windows, seconds, math.exp(mean) * stderr)


def kl_divergence(engine: Any, base: Any, windows: Sequence[Sequence[int]], progress: bool = True,
                  starts: Sequence[int] | None = None) -> Divergence:
    """KL(base ‖ engine) of the next-token distributions at every predicted position (with
    `starts`: only of the tokens from starts[i] on in window i), the share of positions with the
    same top token, and both perplexities over the same positions."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    klds, same, nll, base_nll = [], 0, [], []
    for i, ids in enumerate(tqdm(windows, desc="kld", unit="window", disable=not progress, file=sys.stderr)):
        first = 0 if starts is None else starts[i] - 1  # row j predicts token j + 1
        logq, logp = _log_probs(engine, ids)[first:], _log_probs(base, ids)[first:]
        klds.append((logp.exp() * (logp - logq)).sum(-1).clamp(min=0))  # clamp: rounding below 0
        same += int((logq.argmax(-1) == logp.argmax(-1)).sum())
        nll.append(_token_nll(logq, ids[first:]))
        base_nll.append(_token_nll(logp, ids[first:]))
    engine.reset()
    base.reset()
    kld = torch.cat(klds)
    seconds = time.perf_counter() - t0
    n = len(kld)
    return Divergence(float(kld.mean()), float(kld.std() / math.sqrt(n)) if n > 1 else 0.0, float(kld.median()),
                      float(torch.quantile(kld, 0.99)), float(kld.max()), same / n, n,
                      _perplexity(torch.cat(nll), len(windows), seconds),
                      _perplexity(torch.cat(base_nll), len(windows), seconds))


def chat_windows(base: Any, n_prompts: int = CHAT_PROMPTS,
                 answer_tokens: int = CHAT_ANSWER_TOKENS) -> tuple[list[list[int]], list[int]]:
    """Chat-formatted windows for kl_divergence: `n_prompts` questions of the Python FAQ, spread
    over it, each rendered by the base artifact's chat template as a user turn, followed by the
    base's own greedy answer (up to `answer_tokens`). Returns the windows and where each answer
    starts, so the divergence is measured on what the base model says in a chat, the mode users
    run, and not on documentation text."""
    from awqc.runtime.sampling import SamplingParams

    questions = faq_questions()
    n = min(n_prompts, len(questions))
    windows, starts = [], []
    for q in (questions[i * len(questions) // n] for i in range(n)):
        prompt = base.encode_messages([{"role": "user", "content": q}])
        answer = list(base.generate(prompt, answer_tokens, SamplingParams()))
        if answer:
            windows.append(prompt + answer)
            starts.append(len(prompt))
    base.reset()
    return windows, starts


def set_weights(engine: Any, weights: dict[str, Any]) -> None:
    """Load another weight set (same names and shapes) into an engine's compiled model."""
    import tvm

    dtype = engine.manifest["dtype"]
    params = []
    for name in engine.manifest["params"]:
        w = weights[name]
        w = w.numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
        params.append(tvm.runtime.tensor(np.ascontiguousarray(w, dtype=dtype), engine.device))
    engine.params = params


class FloatEngine:
    """The model compiled once in float32 (in a temporary artifact), loaded as an Engine."""

    def __init__(self, model: Any, context_window: int = DEFAULT_WINDOW_LEN, target: str = "host"):
        from awqc.runtime.engine import Engine

        from .build import write_artifact
        from .targets import get_target

        tmp = Path(tempfile.mkdtemp(prefix="awqc-eval-"))
        try:
            art = write_artifact(tmp / "float", model, get_target(target), "float32", context_window)
            self.engine = Engine(art)  # the library and weights are loaded; the files can go
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.float_weights = model.weights

    def use(self, weights: dict[str, Any] | None) -> Any:
        """The engine with `weights` loaded (None: the model's float weights)."""
        set_weights(self.engine, self.float_weights if weights is None else weights)
        return self.engine


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table; columns in the order of the first row's keys."""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def gap_closed(float_ppl: float, rtn_ppl: float, method_ppl: float) -> float | None:
    """Share of the RTN → float perplexity gap a method closes (1.0: all of it)."""
    gap = rtn_ppl - float_ppl
    return None if gap <= 0 else (rtn_ppl - method_ppl) / gap


# ------------------------------------------------------------------------------- float / RTN / AWQ
@dataclasses.dataclass
class QualitySettings:
    text: str | Path | None = None  # evaluation text file (default: the Python tutorial/FAQ/HOWTOs)
    n_windows: int | None = DEFAULT_WINDOWS
    window_len: int = DEFAULT_WINDOW_LEN
    calibration: CalibrationSettings = CalibrationSettings()
    quantize_head: bool = False
    progress: bool = True


class QualityRun:
    """Perplexity of one model under several weight sets, sharing one compiled library, one set
    of evaluation windows and one calibration."""

    def __init__(self, model: Any, settings: QualitySettings):
        self.model, self.s = model, settings
        self.float_engine = FloatEngine(model, settings.window_len)
        self.windows = eval_windows(self.float_engine.engine, settings.text, settings.n_windows, settings.window_len)
        self._stats = None
        self.calib_seconds = 0.0
        self._awq: dict[Any, Any] = {}
        self._gptq: dict[Any, Any] = {}
        self._block: dict[Any, Any] = {}
        self._domains: dict[str, list[list[int]]] = {}

    def stats(self):
        from .calibrate import calibration_stats

        if self._stats is None:
            t0 = time.perf_counter()
            s = self.s
            # the whole model's statistics at once: no block probes (only the /block methods use them)
            calibration = dataclasses.replace(s.calibration, probe_samples=0)
            self._stats = calibration_stats(self.model, calibration, s.quantize_head, s.progress)
            self.calib_seconds = time.perf_counter() - t0
        return self._stats

    def weights(self, method: str, scheme: Any) -> tuple[dict[str, Any] | None, float | None]:
        """The (dequantized) weights of a method and the search time it took (None: no search)."""
        from .awq import awq_quantize, gptq_weights, rtn

        if method == "float":
            return None, None
        if method == "rtn":
            return rtn(self.model, scheme, self.s.quantize_head).dequantized(), None
        if method in ("awq/block", "awq+gptq/block"):
            return self._block_loss_weights(method.removesuffix("/block"), scheme)
        if method not in ("awq", "awq-scale", "awq+gptq"):
            raise ValueError(f"unknown method {method!r}; choose float, rtn, awq-scale, awq, awq+gptq, awq/block "
                             "or awq+gptq/block")
        stats = self.stats()
        if scheme not in self._awq:
            self._awq[scheme] = awq_quantize(self.model, scheme, stats, clip=True,
                                             quantize_head=self.s.quantize_head, progress=self.s.progress)
        res = self._awq[scheme]
        searched = self.calib_seconds + res.seconds["scale"]
        if method == "awq-scale":
            return res.scale_only().dequantized(), searched
        if method == "awq+gptq":
            if scheme not in self._gptq:  # rounded once per scheme, whichever text it is scored on
                t0 = time.perf_counter()
                qw = gptq_weights(res.scaled, list(res.weights.quantized), scheme, res.clip, stats, res.col_scales)
                self._gptq[scheme] = qw, time.perf_counter() - t0
            qw, rounding = self._gptq[scheme]
            return qw.dequantized(), searched + res.seconds["clip"] + rounding
        return res.weights.dequantized(), searched + res.seconds["clip"]

    def _block_loss_weights(self, method: str, scheme: Any) -> tuple[dict[str, Any], float]:
        """AWQ with the block-output loss (calibrate.BlockProbe), as the compile runs it: block by
        block, the calibration forward included in the time (it cannot come from a cache); the
        probe on the settings' probe_samples, or calibrate.DEFAULT_PROBE_SAMPLES when they say 0."""
        from ..passes.quantizer import QuantizedWeights
        from .awq import awq_graph, quantized_blocks
        from .build import QuantConfig
        from .calibrate import DEFAULT_PROBE_SAMPLES

        key = (method, scheme)
        if key not in self._block:
            calibration = dataclasses.replace(self.s.calibration, cache=None,
                                              probe_samples=self.s.calibration.probe_samples or DEFAULT_PROBE_SAMPLES)
            quant = QuantConfig(scheme, method, self.s.quantize_head, calibration)
            func, names = awq_graph(self.model)
            t0 = time.perf_counter()
            quantized, floats = {}, {}
            for part in quantized_blocks(self.model, quant, func, names, progress=self.s.progress):
                quantized.update(part.quantized)
                floats.update(part.floats)
            self._block[key] = QuantizedWeights(scheme, quantized, floats).dequantized(), time.perf_counter() - t0
        return self._block[key]

    def domain_windows(self, domain: str) -> list[list[int]]:
        """Windows of another evaluation domain (text_data.EVAL_DOMAINS), same count and length."""
        if domain not in self._domains:
            s = self.s
            self._domains[domain] = eval_windows(self.float_engine.engine, None, s.n_windows, s.window_len, domain)
        return self._domains[domain]

    def perplexity(self, method: str, scheme: Any, domain: str | None = None) -> tuple[Perplexity, float | None]:
        """On the settings' text, or on `domain`'s."""
        weights, search = self.weights(method, scheme)
        label = method if scheme is None or method == "float" else f"{method} {scheme.name}"
        windows = self.windows if domain is None else self.domain_windows(domain)
        return perplexity(self.float_engine.use(weights), windows, self.s.progress, desc=label), search

    def compare(self, methods: Sequence[str], schemes: Sequence[Any], domain: str | None = None) -> list[dict[str, Any]]:
        """One row per (method, scheme); float once. Columns: method, quant, ppl, Δ vs float,
        RTN gap closed, search s."""
        rows: list[dict[str, Any]] = []
        float_ppl = self.perplexity("float", None, domain)[0].ppl
        if "float" in methods:
            rows.append({"method": "float", "quant": "–", "perplexity": float_ppl, "Δ vs float": 0.0,
                         "RTN gap closed": None, "search s": None})
        for scheme in schemes:
            rtn_ppl = None
            for method in [m for m in methods if m != "float"]:
                ppl, search = self.perplexity(method, scheme, domain)
                if method == "rtn":
                    rtn_ppl = ppl.ppl
                closed = gap_closed(float_ppl, rtn_ppl, ppl.ppl) if rtn_ppl and method != "rtn" else None
                rows.append({"method": method, "quant": scheme.name, "perplexity": ppl.ppl,
                             "Δ vs float": ppl.ppl - float_ppl,
                             "RTN gap closed": None if closed is None else f"{100 * closed:.0f}%",
                             "search s": search})
        return rows

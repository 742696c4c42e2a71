"""Load an awqc artifact and decode text: KV cache, chunked prefill, token-by-token decode.

Imports only the TVM runtime, numpy and tokenizers (jinja2, sandboxed, for chat templates), so a device
gets this package and an artifact and nothing of the compiler.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from .artifact import (LIBRARY, MANIFEST, ArtifactError, TOKENIZER_DIR, WEIGHTS, check_compatible, check_device,
                       drop_pages, load_safetensors, read_manifest)
from .chat_template import render_chat
from .sampling import Sampler, SamplingParams, generation_defaults
from .text_stream import TextStream
from .verified import verify_artifact

_PAGE_SIZE = 16


class PromptTooLongError(ValueError):
    """The prompt does not fit the artifact's context window."""


class Engine:
    """One sequence of one artifact on one device."""

    def __init__(self, artifact: str | Path, device: str | None = None, verify: bool = False, max_batch: int = 1):
        """device: a TVM device string ("cpu", "cuda", "cuda:1"); None is the artifact's kind.
        verify: hash every file even if it was verified before and has not changed since.
        max_batch: sequences the KV cache holds at once, each up to the context window (a server's
        concurrent requests: add_sequence takes ids 1..max_batch); the single-sequence methods use
        sequence 0."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        root = Path(artifact)
        self.root = root
        self.manifest = read_manifest(root)
        verify_artifact(root, self.manifest, full=verify)
        check_compatible(self.manifest, tvm.__version__)
        kind = check_device(self.manifest, _device_exists, device)  # before loading CUDA code
        self.device = tvm.device(device or kind)
        check_fits(self.manifest, root, _available_bytes(self.device), max_batch)
        self.context_window = int(self.manifest["context_window"])
        self.prefill_chunk = int(self.manifest["prefill_chunk"])
        self.vocab_size = int(self.manifest["model"]["vocab_size"])
        self.eos_token_ids = set(self.manifest["tokenizer"]["eos_token_ids"])
        # sampling defaults recorded at compile time (older artifacts: llama.cpp's)
        self.generation = self.manifest.get("generation") or generation_defaults(None)
        try:
            self.vm = VirtualMachine(tvm.runtime.load_module(str(root / LIBRARY)), self.device)
        except Exception as err:  # noqa: BLE001  (TVM raises its own error types for a bad library)
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ArtifactError(f"{root / LIBRARY} cannot be loaded ({first}); recompile the artifact") from None
        weights = load_safetensors(root / WEIGHTS)
        missing = [n for n in self.manifest["params"] if n not in weights]
        if missing:
            raise ArtifactError(f"{root / WEIGHTS} lacks the parameters {', '.join(missing[:3])}; recompile the artifact")
        self.params = []
        for n in self.manifest["params"]:  # one tensor at a time: RSS is the weights once, not twice
            self.params.append(tvm.runtime.tensor(np.asarray(weights[n]), self.device))
            drop_pages(weights[n])
        self.tokenizer = _load_tokenizer(root / TOKENIZER_DIR)
        self._kv_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._kv_remove = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._kv_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._kv_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self.kv = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([max_batch + 1]), ShapeTuple([self.context_window * max_batch]), ShapeTuple([self.prefill_chunk]),
            ShapeTuple([_PAGE_SIZE]))
        self._kv_popn = tvm.get_global_func("vm.builtin.kv_state_popn")
        self._kv_add(self.kv, 0)
        self._lengths: dict[int, int] = {}  # tokens of the other sequences (add_sequence)
        self.tokens: list[int] = []  # the tokens in the cache, in order
        self.timing = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}  # last generate

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_chat(self, user_message: str) -> list[int]:
        """The prompt for one user turn, rendered with the tokenizer's chat template."""
        return self.encode_messages([{"role": "user", "content": user_message}])

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation rendered with the tokenizer's chat template, ready for the assistant's turn."""
        info = self.manifest["tokenizer"]
        template = info["chat_template"]
        if not template:
            raise ValueError("this model's tokenizer has no chat template; run without --chat")
        # The template is someone else's code: render_chat runs it in jinja2's sandbox
        text = render_chat(template, messages, f"{self.root}/{MANIFEST}", add_generation_prompt=True,
                           bos_token=info["bos_token"], eos_token=info["eos_token"])
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- model steps ---------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return len(self.tokens)

    def reset(self) -> None:
        """Forget the cached sequence."""
        self._kv_remove(self.kv, 0)
        self._kv_add(self.kv, 0)
        self.tokens = []

    def rewind(self, n: int) -> None:
        """Drop the last n tokens from the cache."""
        if n:
            self._kv_popn(self.kv, 0, n)
            del self.tokens[len(self.tokens) - n:]

    def prefill_reusing(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """prefill(ids) into a cache that may already hold a prefix of them (the earlier turns of a
        chat): only the tokens after the common prefix are computed. (Logits of the last one, the
        number of tokens computed.)"""
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last token runs again: its logits are needed
        self.rewind(self.length - common)
        return self.prefill(ids[common:]), len(ids) - common

    def _step(self, fn: str, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.context_window:
            raise PromptTooLongError(
                f"{self.length + len(ids)} tokens do not fit the context window of {self.context_window}; "
                "shorten the prompt or recompile with a larger --context-window")
        return self._forward(fn, [0], [len(ids)], ids)

    def _forward(self, fn: str, seqs: list[int], lengths: list[int], ids: list[int]) -> np.ndarray:
        """Run `fn` on the tokens `ids`: lengths[i] of them appended to sequence seqs[i], in order;
        each sequence's bookkeeping follows the cache (so an interrupt between calls leaves both
        in step)."""
        tokens = np.asarray([ids], dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id {int(tokens.max() if tokens.max() >= self.vocab_size else tokens.min())} "
                             f"is outside this model's vocabulary of {self.vocab_size}")
        self._kv_begin(self.kv, ShapeTuple(seqs), ShapeTuple(lengths))
        data = tvm.runtime.tensor(tokens.astype(np.int32), self.device)
        logits, self.kv = self.vm[fn](data, self.kv, self.params)
        self._kv_end(self.kv)
        start = 0
        for seq, n in zip(seqs, lengths):
            if seq == 0:
                self.tokens += ids[start:start + n]
            else:
                self._lengths[seq] += n
            start += n
        return logits.numpy()[0]

    def _prefill_chunks(self, seq: int, ids: list[int]) -> np.ndarray:
        """Append ids to sequence `seq`, prefill_chunk tokens per call; logits of the last one."""
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            logits = self._forward("prefill", [seq], [len(chunk)], chunk)
        return logits[-1]

    # -- several sequences (a server's requests) ---------------------------------------------------
    def add_sequence(self, seq: int) -> None:
        """Start sequence `seq` (1 .. max_batch; 0 is the single-sequence API's)."""
        self._kv_add(self.kv, seq)
        self._lengths[seq] = 0

    def remove_sequence(self, seq: int) -> None:
        self._kv_remove(self.kv, seq)
        del self._lengths[seq]

    def prefill_sequence(self, seq: int, ids: list[int]) -> np.ndarray:
        """Append a prompt to sequence `seq` (in chunks); logits of its last token."""
        if self._lengths[seq] + len(ids) > self.context_window:
            raise PromptTooLongError(f"{self._lengths[seq] + len(ids)} tokens do not fit the context window of "
                                     f"{self.context_window}")
        return self._prefill_chunks(seq, ids)

    def decode_batch(self, seqs: list[int], tokens: list[int]) -> np.ndarray:
        """Append one token to each sequence in one call; logits [len(seqs), vocab]. One sequence
        takes the decode kernels (GEMV); several the prefill ones (GEMM over their rows)."""
        if any(self._lengths[s] >= self.context_window for s in seqs):
            raise PromptTooLongError("a sequence is at the end of the context window")
        return self._forward("decode" if len(seqs) == 1 else "score", seqs, [1] * len(seqs), tokens)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Append the tokens (in chunks); logits of the last one, shape [vocab]."""
        if not ids:
            raise ValueError("the prompt is empty")
        self._check_fits(len(ids))
        return self._prefill_chunks(0, ids)

    def decode(self, token: int) -> np.ndarray:
        """Append one token; its logits, shape [vocab]."""
        return self._step("decode", [token])[-1]

    def score(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids` from an empty cache, shape [len(ids), vocab]."""
        self.reset()
        self._check_fits(len(ids))
        out = [self._step("score", ids[s:s + self.prefill_chunk]) for s in range(0, len(ids), self.prefill_chunk)]
        return np.concatenate(out, axis=0)

    def _check_fits(self, n: int) -> None:
        if self.length + n > self.context_window:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the context window is {self.context_window} "
                f"({self.length} already used); shorten it or recompile with a larger --context-window")

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 reuse_cache: bool = False) -> Iterator[int]:
        """Yield new tokens until EOS, max_new_tokens, or the context window is full. reuse_cache:
        keep the cached prefix the prompt shares (a chat's earlier turns) instead of starting over.
        Every yielded token is in the cache when the next one is drawn; `timing` covers this call."""
        if not reuse_cache:
            self.reset()
        sampler = Sampler(sampling)
        history = list(prompt_ids)  # what the repetition penalty looks back on
        t0 = time.perf_counter()
        logits, computed = self.prefill_reusing(prompt_ids) if reuse_cache else (self.prefill(prompt_ids), len(prompt_ids))
        self.timing = {"prefill_tokens": computed, "prefill_s": time.perf_counter() - t0, "decode_tokens": 0,
                       "decode_s": 0.0}
        for _ in range(max_new_tokens):
            token = sampler(logits, history)
            if token in self.eos_token_ids:
                return
            yield token
            history.append(token)
            if self.length >= self.context_window:
                return
            t = time.perf_counter()
            logits = self.decode(token)
            self.timing["decode_tokens"] += 1
            self.timing["decode_s"] += time.perf_counter() - t

    def stream_text(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                    write: Callable[[str], object], stop: Sequence[str] = (), reuse_cache: bool = False) -> list[int]:
        """Generate and write text as it forms (whole characters only), ending before the first
        stop string; the new token ids (through the one that completed a stop string)."""
        text = TextStream(self.decode_text, stop)
        for token in self.generate(prompt_ids, max_new_tokens, sampling, reuse_cache):
            piece = text.feed(token)
            if piece:
                write(piece)
            if text.stopped:
                return text.tokens
        tail = text.finish()
        if tail:
            write(tail)
        return text.tokens


def kv_cache_bytes(manifest: dict) -> int:
    """Keys and values of every layer for the whole context window."""
    m = manifest["model"]
    itemsize = 2 if manifest["dtype"] == "float16" else 4
    return 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * m["head_dim"] * manifest["context_window"] * itemsize


def check_fits(manifest: dict, root: Path, available: int | None, max_batch: int = 1) -> None:
    """Refuse, before loading anything, an artifact whose weights and KV cache exceed the memory
    available on its device (an OOM kill mid-load tells the user nothing)."""
    if available is None:
        return
    weights, kv = (root / WEIGHTS).stat().st_size, kv_cache_bytes(manifest) * max_batch
    need = weights + kv + (64 << 20)  # + the library and working buffers
    if need > available:
        gib = 1 << 30
        raise ArtifactError(
            f"the artifact needs about {need / gib:.1f} GiB (weights {weights / gib:.1f} GiB + KV cache "
            f"{kv / gib:.1f} GiB for {max_batch} sequence(s) of {manifest['context_window']} tokens) but only "
            f"{available / gib:.1f} GiB "
            "is available; close other programs, recompile with a smaller --context-window, or use a smaller model")


def _available_bytes(device) -> int | None:
    """Free memory of the device: MemAvailable for the CPU, total memory for a GPU."""
    if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        return int(device.available_global_memory or device.total_global_memory or 0) or None
    except Exception:  # noqa: BLE001  (a runtime without that device's API)
        return None


def _device_exists(kind: str) -> bool:
    try:  # a TVM runtime built without CUDA raises instead of answering False
        return bool(tvm.device(kind, 0).exist)
    except Exception:  # noqa: BLE001
        return False


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))

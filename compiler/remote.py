"""Deploy an artifact to a device over TVM RPC, and profile its decode step there.

`awqc deploy` uploads lib.so to an RPC server (directly, or through a tracker by device key),
copies the weights into the device's memory, and runs a short greedy decode; the tokenizer stays
here. `awqc profile` does the same and times every kernel of a decode step.

Profiling. TVM 0.27's Relax VM has no profiler (no `profile=True`, no `vm.profile`); what it has
is `set_instrument`, a callback around every call instruction. RPC cannot carry a callback to
the server, so the callback is C++ (PLUGIN_SOURCE below, tvm-ffi headers only): it is compiled
for the device's architecture, uploaded, and loaded there, where it registers
`awqc.profile_vm_call`. That function runs one VM function, synchronizes the device around
every call and returns the calls with their times and argument shapes as JSON. Instrumented
kernels pay one synchronization each, so the table also shows the plain (uninstrumented) step
time. Kernel bytes come from the argument shapes: for an int4 kernel its packed weights, scales
and zero points, for a float matmul its weight matrix — the bytes a decode step must stream, so
GB/s against the device's bandwidth says how far each kernel is from its roofline.

Without --rpc, `awqc profile` runs in this process (tvm.rpc.LocalSession) the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from awqc.runtime.artifact import (LIBRARY, TOKENIZER_DIR, WEIGHTS, ArtifactError, check_device, load_safetensors,
                                   read_manifest, verify_files)

_T = TypeVar("_T")
_PAGE_SIZE = 16  # runtime/engine.py
SESSION_TIMEOUT_S = 600  # the server ends a session idle or stuck this long


class RemoteError(RuntimeError):
    """The RPC server or tracker cannot be used; the message says what to check."""


# -- addresses and sessions -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str, option: str = "--rpc") -> Endpoint:
    """'HOST:PORT' → Endpoint, or a ValueError naming the option."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{option} expects HOST:PORT (e.g. 192.168.1.20:9090), got {text!r}")
    return Endpoint(host.strip("[]"), int(port))


def _probe(endpoint: Endpoint, timeout: float, what: str) -> None:
    """Fail fast (within `timeout`) when nothing listens at the endpoint."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise RemoteError(f"cannot reach the {what} at {endpoint} ({reason}); check the address and that "
                          f"the {what} is running (python -m tvm.exec.rpc_server / rpc_tracker)") from None


def _bounded(fn: Callable[[], _T], timeout: float, what: str) -> _T:
    """fn() in a daemon thread, given up after `timeout` seconds: TVM's RPC handshake blocks
    without a limit when the peer accepts the connection but never answers."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True, name=f"awqc-rpc {what}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RemoteError(f"{what} did not answer within {timeout:g} s (--timeout); is it a TVM RPC server?")
    if "error" in box:
        raise RemoteError(f"{what} failed: {box['error']}") from None
    return box["value"]


def open_session(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                 timeout: float = 30.0) -> Any:
    """An RPC session: to a server, to a device of `key` from a tracker, or (neither) in-process."""
    from tvm import rpc as tvm_rpc

    if timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {timeout:g}")
    if rpc and tracker:
        raise ValueError("give either --rpc or --tracker, not both")
    if tracker:
        if not key:
            raise ValueError("--tracker needs --key, the device key the RPC servers registered with")
        endpoint = parse_endpoint(tracker, "--tracker")
        _probe(endpoint, timeout, "RPC tracker")
        return _bounded(lambda: tvm_rpc.connect_tracker(endpoint.host, endpoint.port).request(
            key, priority=1, session_timeout=SESSION_TIMEOUT_S), timeout,
            f"a device with key {key!r} from the tracker at {endpoint}")
    if rpc:
        endpoint = parse_endpoint(rpc)
        _probe(endpoint, timeout, "RPC server")
        return _bounded(lambda: tvm_rpc.connect(endpoint.host, endpoint.port, session_timeout=SESSION_TIMEOUT_S),
                        timeout, f"the RPC server at {endpoint}")
    return tvm_rpc.LocalSession()


def _is_local(sess: Any) -> bool:
    from tvm import rpc as tvm_rpc

    return isinstance(sess, tvm_rpc.LocalSession)


# -- the model on the remote device ------------------------------------------------------------
class RemoteModel:
    """An artifact loaded in an RPC session: library, weights and KV cache live on the device;
    the tokenizer and sampling stay here. Lists and shapes that RPC cannot carry are built on
    the device with its own ffi.Array / ffi.Shape."""

    def __init__(self, sess: Any, artifact: Path, context_window: int | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.sess, self.root = sess, Path(artifact)
        self.manifest = read_manifest(self.root)
        verify_files(self.root, self.manifest)
        if self.manifest["tvm_version"] != tvm.__version__:
            raise ArtifactError(f"the artifact was built with TVM {self.manifest['tvm_version']}; this awqc has "
                                f"TVM {tvm.__version__}; recompile it")
        self.kind = self._device_kind()
        self.device = sess.device(self.kind, 0)
        self._shape = sess.get_function("ffi.Shape")
        self._get = sess.get_function("ffi.ArrayGetItem")
        self._kv_add = sess.get_function("vm.builtin.kv_state_add_sequence")
        self._kv_begin = sess.get_function("vm.builtin.kv_state_begin_forward")
        self._kv_end = sess.get_function("vm.builtin.kv_state_end_forward")
        self._kv_remove = sess.get_function("vm.builtin.kv_state_remove_sequence")
        self.lib = self._upload_library()
        self.vm = VirtualMachine(self.lib, self.device)
        self.params = self._upload_weights()
        self.context_window = min(context_window or 512, int(self.manifest["context_window"]))
        chunk = min(self.context_window, int(self.manifest["prefill_chunk"]))
        self.kv = self.vm["create_tir_paged_kv_cache"](self._shape(1), self._shape(self.context_window),
                                                       self._shape(chunk), self._shape(_PAGE_SIZE))
        self._kv_add(self.kv, 0)
        self.length = 0

    def _device_kind(self) -> str:
        """The device the kernels need; checked on the machine that will run them."""
        target = self.manifest["target"]
        kind = target.get("device", "cpu")
        if _is_local(self.sess):
            if target["arch"] != platform.machine():
                raise ArtifactError(f"the artifact was built for {target['arch']} (target {target['name']}) but "
                                    f"this machine is {platform.machine()}; profile it on the device with --rpc")
            return check_device(self.manifest, self._has_device, None)
        if not self._has_device(kind):
            raise ArtifactError(f"this artifact targets {target['name']} but the RPC server has no "
                                f"{kind.upper()} device")
        return kind

    def _has_device(self, kind: str) -> bool:
        try:  # a TVM runtime built without CUDA raises instead of answering False
            return bool(self.sess.device(kind, 0).exist)
        except Exception:  # noqa: BLE001 (any failure means: not usable here)
            return False

    def _upload_library(self) -> Any:
        digest = self.manifest["files"][LIBRARY][:16]  # names the upload by content: no stale copies
        name = f"awqc-{digest}-{LIBRARY}"
        self.sess.upload(str(self.root / LIBRARY), name)
        return self.sess.load_module(name)

    def _upload_weights(self) -> Any:
        """The parameter array, owned by the server. A tensor sent over RPC arrives as a borrowed
        DLTensor, valid during one call only, so each one goes through the server's tensor cache
        (which copies it into a tensor it owns) and the array is assembled there."""
        import tvm

        update = self.sess.get_function("vm.builtin.tensor_cache.update")
        remove = self.sess.get_function("vm.builtin.tensor_cache.remove")
        weights = load_safetensors(self.root / WEIGHTS)
        prefix = f"awqc-{self.manifest['files'][WEIGHTS][:16]}/"
        names = [prefix + n for n in self.manifest["params"]]
        for cached, name in zip(names, self.manifest["params"]):
            update(cached, tvm.runtime.tensor(np.ascontiguousarray(weights[name]), self.device), True)
        params = self.sess.get_function("vm.builtin.param_array_from_cache_by_name_unpacked")(*names)
        for cached in names:  # the array keeps its tensors; the cache entries are no longer needed
            remove(cached)
        return params

    def reset(self) -> None:
        self._kv_remove(self.kv, 0)
        self._kv_add(self.kv, 0)
        self.length = 0

    def _inputs(self, ids: list[int]) -> Any:
        import tvm

        if self.length + len(ids) > self.context_window:
            raise ValueError(f"{self.length + len(ids)} tokens exceed the context window {self.context_window}")
        self._kv_begin(self.kv, self._shape(0), self._shape(len(ids)))
        return tvm.runtime.tensor(np.asarray([ids], dtype=np.int32), self.device)

    def step(self, fn: str, ids: list[int]) -> np.ndarray:
        """Run prefill/decode on the device; logits of the last position."""
        out = self.vm[fn](self._inputs(ids), self.kv, self.params)
        logits = self._get(out, 0).numpy()
        self._finish(len(ids))
        return logits.reshape(-1, logits.shape[-1])[-1]

    def _finish(self, n: int) -> None:
        self._kv_end(self.kv)
        self.length += n

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens after the prompt, and the decode tokens per second."""
        self.reset()
        logits = self.step("prefill", ids)
        eos = set(self.manifest["tokenizer"]["eos_token_ids"])
        out: list[int] = []
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token in eos or self.length >= self.context_window:
                break
            out.append(token)
            logits = self.step("decode", [token])
        return out, len(out) / max(time.perf_counter() - t0, 1e-9)


def load_tokenizer(artifact: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(artifact) / TOKENIZER_DIR / "tokenizer.json"))


def deploy(artifact: Path, rpc: str | None, tracker: str | None = None, key: str | None = None,
           timeout: float = 30.0, prompt: str = "Hello", max_new_tokens: int = 8) -> dict[str, Any]:
    """Upload the artifact, decode a few tokens on the device; what happened."""
    sess = open_session(rpc, tracker, key, timeout)
    t0 = time.perf_counter()
    model = RemoteModel(sess, artifact)
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(artifact)
    ids = tok.encode(prompt).ids or [int(model.manifest["tokenizer"].get("bos_token_id") or 0)]
    tokens, tps = model.generate(ids, max_new_tokens)
    return {"target": model.manifest["target"]["name"], "device": str(model.device), "load_s": load_s,
            "prompt_tokens": len(ids), "tokens": tokens, "text": tok.decode(tokens), "tokens_per_s": tps}


# -- profiling ---------------------------------------------------------------------------------
PLUGIN_SOURCE = r"""
// awqc profiler plugin: registers awqc.profile_vm_call, which runs one Relax VM function with
// every call instruction timed between device synchronizations. Built per device architecture by
// awqc/compiler/remote.py against the tvm-ffi headers only; symbols resolve against the TVM
// runtime already loaded in the process that loads it (an RPC server, or awqc itself).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <chrono>
#include <sstream>
#include <string>

namespace ffi = tvm::ffi;

namespace {
double NowUs() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// [{"dtype": "float16", "shape": [1, 576]}, null, ...] for the call's arguments.
std::string ArgsJson(const ffi::AnyView* args, int n) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < n; ++i) {
    if (i) os << ",";
    auto t = args[i].try_cast<ffi::Tensor>();  // holds a null tensor for a None argument
    if (t.has_value() && t.value().defined()) {
      const DLTensor* d = t.value().GetDLTensorPtr();
      os << "{\"dtype\":\"" << std::string(ffi::DLDataTypeToString(d->dtype)) << "\",\"shape\":[";
      for (int j = 0; j < d->ndim; ++j) os << (j ? "," : "") << d->shape[j];
      os << "]}";
    } else {
      os << "null";
    }
  }
  os << "]";
  return os.str();
}
}  // namespace

// awqc.profile_vm_call(vm, name, device_type, device_id, instrument, *args) -> JSON
//   {"total_us": t, "calls": [{"name": kernel, "us": t, "args": [...]}, ...]}
TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def_packed("awqc.profile_vm_call", [](ffi::PackedArgs args, ffi::Any* rv) {
    ffi::Module vm = args[0].cast<ffi::Module>();
    std::string name = args[1].cast<ffi::String>();
    DLDevice dev{static_cast<DLDeviceType>(args[2].cast<int>()), args[3].cast<int>()};
    bool instrument = args[4].cast<bool>();
    static ffi::Function sync = ffi::Function::GetGlobalRequired("runtime.Device_StreamSync");
    auto device_sync = [&]() { sync(dev, static_cast<int64_t>(0)); };
    std::ostringstream calls;
    int ncalls = 0;
    double start = 0;
    ffi::Function set_instrument = vm->GetFunction("set_instrument").value();
    if (instrument) {
      // (func, symbol, before_run, ret_value, *call args) -> 0: run the call as usual
      set_instrument(ffi::Function::FromPacked([&](ffi::PackedArgs a, ffi::Any* r) {
        device_sync();
        if (a[2].cast<bool>()) {
          start = NowUs();
        } else {
          double us = NowUs() - start;
          calls << (ncalls++ ? "," : "") << "{\"name\":\"" << std::string(a[1].cast<ffi::String>())
                << "\",\"us\":" << us << ",\"args\":" << ArgsJson(a.data() + 4, a.size() - 4) << "}";
        }
        *r = 0;
      }));
    }
    // The VM keeps its instrument after this call returns (or throws); the one above refers to
    // this frame, so on the way out it is replaced by one that captures nothing (which costs the
    // VM only its four extra call arguments).
    struct Restore {
      ffi::Function set;
      bool active;
      ~Restore() {
        if (active) set(ffi::Function::FromPacked([](ffi::PackedArgs, ffi::Any* r) { *r = 0; }));
      }
    } restore{set_instrument, instrument};
    ffi::Function fn = vm->GetFunction(name).value();
    device_sync();
    double t0 = NowUs();
    ffi::Any out;
    fn.CallPacked(args.data() + 5, args.size() - 5, &out);
    device_sync();
    double total = NowUs() - t0;
    std::ostringstream os;
    os << "{\"total_us\":" << total << ",\"calls\":[" << calls.str() << "]}";
    *rv = ffi::String(os.str());
  });
}
"""

_CXX = {"x86_64": "x86_64-linux-gnu-g++", "aarch64": "aarch64-linux-gnu-g++"}


def build_plugin(arch: str, workdir: Path) -> Path:
    """The profiler plugin compiled for `arch` (x86_64 / aarch64) as a shared library."""
    import tvm_ffi

    cxx = "g++" if arch == platform.machine() else _CXX.get(arch)
    if cxx is None or shutil.which(cxx) is None:
        raise RemoteError(f"no C++ compiler for {arch} to build the profiler plugin (need {cxx or 'one'})")
    src = workdir / "awqc_profiler.cc"
    src.write_text(PLUGIN_SOURCE)
    out = workdir / f"awqc_profiler_{hashlib.sha256(PLUGIN_SOURCE.encode()).hexdigest()[:12]}.so"
    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{tvm_ffi.libinfo.find_include_path()}",
           f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}", str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RemoteError(f"{cxx} failed to build the profiler plugin:\n{proc.stderr[-3000:]}")
    return out


@dataclasses.dataclass
class KernelStat:
    name: str
    kind: str  # "int4" (dequant-fused linear), "matmul" (float linear), "other"
    calls: int = 0
    us: float = 0.0  # per decode step, averaged over the profiled steps
    weight_bytes: int = 0  # streamed per step
    flops: int = 0  # per step
    role: str = "other"  # what it is in the model: qkv, o, gate_up, down, lm_head, attention, rope, norm, ...

    @property
    def gbps(self) -> float | None:
        return self.weight_bytes / (self.us * 1e3) if self.weight_bytes and self.us > 0 else None

    @property
    def intensity(self) -> float | None:
        return self.flops / self.weight_bytes if self.weight_bytes else None


def _nbytes(arg: dict[str, Any] | None) -> int:
    if not arg:
        return 0
    bits = int("".join(c for c in arg["dtype"].split("x")[0] if c.isdigit()) or 8)
    return int(np.prod(arg["shape"], dtype=np.int64)) * bits // 8


def classify(name: str, args: list[dict[str, Any] | None]) -> tuple[str, int, int]:
    """(kind, weight bytes, flops) of one kernel call from its name and argument shapes.
    int4 kernels take (x, qweight, scales, zeros, y); float matmuls (x, weight, y)."""
    tensors = [a for a in args if a]
    if name.startswith("w4_") and len(tensors) >= 5:
        x, qweight = tensors[0], tensors[1]
        rows = int(np.prod(x["shape"][:-1], dtype=np.int64))
        k, n = x["shape"][-1], qweight["shape"][0]
        return "int4", sum(_nbytes(a) for a in tensors[1:4]), 2 * rows * n * k
    if "matmul" in name and len(tensors) >= 3:
        x, w, y = tensors[0], tensors[1], tensors[-1]
        return "matmul", _nbytes(w), 2 * int(np.prod(y["shape"], dtype=np.int64)) * int(x["shape"][-1])
    return "other", 0, 0


def linear_roles(model: dict[str, Any]) -> dict[tuple[int, int], str]:
    """(K, N) of each linear of the model → its role ("o/qkv" where two share a shape)."""
    h, inter = model["hidden_size"], model["intermediate_size"]
    q, kv = model["num_attention_heads"] * model["head_dim"], model["num_key_value_heads"] * model["head_dim"]
    roles: dict[tuple[int, int], list[str]] = {}
    for shape, role in (((h, q + 2 * kv), "qkv"), ((q, h), "o"), ((h, 2 * inter), "gate_up"), ((inter, h), "down"),
                        ((h, model["vocab_size"]), "lm_head")):
        roles.setdefault(shape, []).append(role)
    return {k: "/".join(v) for k, v in roles.items()}


# Non-linear kernels by what their TVM name says they do, first match wins.
_NAME_ROLES = (("attention", ("attention", "attn", "batch_decode", "batch_prefill", "merge_state")),
               ("rope", ("rope", "rotary")), ("norm", ("rms_norm", "layer_norm")),
               ("activation", ("silu", "gelu", "swiglu")), ("kv append", ("kv_cache_transpose_append", "append")),
               ("embedding", ("take",)))


def kernel_role(name: str, args: list[dict[str, Any] | None], roles: dict[tuple[int, int], str]) -> str:
    tensors = [a for a in args if a]
    if name.startswith("w4_") and len(tensors) >= 5:
        shape = (tensors[0]["shape"][-1], tensors[-1]["shape"][-1])  # (x's K, y's N): packing hides N
        return roles.get(shape, "linear")
    if "matmul" in name and len(tensors) >= 3:
        w = tensors[1]["shape"]
        for shape in ((w[-1], w[0]), (w[0], w[-1])):  # [N, K] weights (NT) or [K, N]
            if shape in roles:
                return roles[shape]
        return "linear"
    lowered = name.lower()
    return next((role for role, words in _NAME_ROLES if any(w in lowered for w in words)), "other")


def aggregate(steps: list[dict[str, Any]], model: dict[str, Any] | None = None) -> list[KernelStat]:
    """Per-kernel totals averaged over the profiled steps, slowest first; with the model's config,
    each kernel's role in the model."""
    roles = linear_roles(model) if model else {}
    stats: dict[str, KernelStat] = {}
    for step in steps:
        for call in step["calls"]:
            kind, nbytes, flops = classify(call["name"], call["args"])
            s = stats.setdefault(call["name"], KernelStat(call["name"], kind,
                                                          role=kernel_role(call["name"], call["args"], roles)))
            s.calls += 1
            s.us += call["us"]
            s.weight_bytes += nbytes
            s.flops += flops
    n = max(len(steps), 1)
    for s in stats.values():
        s.calls //= n
        s.us /= n
        s.weight_bytes //= n
        s.flops //= n
    return sorted(stats.values(), key=lambda s: -s.us)


# Peak DRAM bandwidth (GB/s) and dense fp16 tensor throughput (TFLOP/s) from the vendors' data
# sheets; an arch stands for its most common data-center / board part.
PEAKS: dict[str, tuple[float, float]] = {
    "a100-40gb": (1555.0, 312.0), "a100-80gb": (2039.0, 312.0), "rtx-3090": (936.0, 71.0),
    "rtx-4090": (1008.0, 165.2), "l40s": (864.0, 362.0), "h100-sxm": (3350.0, 989.4), "h100-pcie": (2000.0, 756.0),
    "orin-nano-8gb": (68.0, 20.0), "agx-orin-64gb": (204.8, 85.0),
}
ARCH_PEAKS = {"sm_80": "a100-80gb", "sm_86": "rtx-3090", "sm_87": "orin-nano-8gb", "sm_89": "rtx-4090",
              "sm_90": "h100-sxm", "sm_90a": "h100-sxm"}


def peak_for(arch: str) -> tuple[str, float, float]:
    """(device, GB/s, TFLOP/s) for a device name from PEAKS or an arch like 'sm_90'."""
    device = ARCH_PEAKS.get(arch, arch)
    if device not in PEAKS:
        raise ValueError(f"unknown --arch {arch!r}; known archs: {', '.join(ARCH_PEAKS)}; "
                         f"devices: {', '.join(PEAKS)}; or give --bandwidth GBPS")
    return (device, *PEAKS[device])


def measure_bandwidth(sess: Any, device: Any, nbytes: int = 64 << 20, repeat: int = 5) -> float:
    """Copy bandwidth of the device's memory in GB/s (read + write), best of `repeat` device-side
    copies of `nbytes`; over RPC each copy is one round trip, negligible at this size."""
    import tvm

    a = tvm.runtime.empty((nbytes // 4,), "float32", device)
    b = tvm.runtime.empty((nbytes // 4,), "float32", device)
    a.copyto(b)
    device.sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.copyto(b)
        device.sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


@dataclasses.dataclass
class Profile:
    target: str
    device: str
    steps: int
    step_us: float  # uninstrumented decode step on the device
    instrumented_us: float  # the same with a synchronization around every call
    kernels: list[KernelStat]
    bandwidth_gbps: float
    bandwidth_source: str
    peak_tflops: float | None
    peak_source: str = "data sheet"

    def roles(self) -> list[KernelStat]:
        """The kernels summed by role, slowest first, with the VM's own time between kernel calls
        (the instrumented step minus its kernels) as a role of its own."""
        by: dict[str, KernelStat] = {}
        for k in self.kernels:
            r = by.setdefault(k.role, KernelStat(k.role, k.kind if k.kind != "other" else "other", role=k.role))
            r.calls += k.calls
            r.us += k.us
            r.weight_bytes += k.weight_bytes
            r.flops += k.flops
        gap = self.instrumented_us - sum(k.us for k in self.kernels)
        if gap > 0:
            by["VM overhead"] = KernelStat("VM overhead", "other", 0, gap, role="VM overhead")
        return sorted(by.values(), key=lambda r: -r.us)

    def to_json(self) -> dict[str, Any]:
        def row(k: KernelStat) -> dict[str, Any]:
            return {"role": k.role, "name": k.name, "kind": k.kind, "calls": k.calls, "us_per_step": k.us,
                    "weight_bytes": k.weight_bytes, "flops": k.flops, "gbps": k.gbps}

        return {"target": self.target, "device": self.device, "steps": self.steps, "step_us": self.step_us,
                "instrumented_us": self.instrumented_us, "bandwidth_gbps": self.bandwidth_gbps,
                "bandwidth_source": self.bandwidth_source,
                "peak_gflops": None if self.peak_tflops is None else self.peak_tflops * 1e3,
                "peak_source": self.peak_source, "roles": [row(r) for r in self.roles()],
                "kernels": [row(k) for k in self.kernels]}


def measure_cpu_peak(threads: int, n: int = 2048, repeat: int = 3) -> float:
    """FLOP/s of this CPU in TFLOP/s: the best of `repeat` float32 n×n×n GEMMs in torch (oneDNN/MKL,
    which run near the FMA peak) on `threads` threads — a measured lower bound of the peak. In a
    child process: torch's OpenMP pool and TVM's thread pool in one process abort."""
    code = (f"import time, torch\ntorch.set_num_threads({threads})\na, b = torch.randn({n}, {n}), torch.randn({n}, {n})\n"
            f"torch.mm(a, b)\nbest = min((lambda t: (torch.mm(a, b), time.perf_counter() - t)[1])(time.perf_counter())"
            f" for _ in range({repeat}))\nprint(2 * {n} ** 3 / best / 1e12)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def profile_decode(artifact: Path, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                   timeout: float = 30.0, steps: int = 8, prompt_len: int = 16, bandwidth: float | None = None,
                   arch: str | None = None) -> Profile:
    """Per-kernel times of `steps` decode steps after a prompt of `prompt_len` tokens."""
    if steps < 1 or prompt_len < 1:
        raise ValueError("--steps and --prompt-len must be positive")
    peak = peak_for(arch) if arch else None  # bad --arch fails before any connection
    sess = open_session(rpc, tracker, key, timeout)
    model = RemoteModel(sess, artifact, context_window=prompt_len + 2 * steps + 4)
    try:  # a server (or this process) that ran a profile before has the function already
        call = sess.get_function("awqc.profile_vm_call")
    except Exception:  # noqa: BLE001  (TVM's error for a missing global function)
        with tempfile.TemporaryDirectory(prefix="awqc-profiler-") as tmp:
            plugin = build_plugin(model.manifest["target"]["arch"], Path(tmp))
            sess.upload(str(plugin), plugin.name)
            sess.load_module(plugin.name)  # registers awqc.profile_vm_call in the server process (twice aborts)
        call = sess.get_function("awqc.profile_vm_call")
    dev_type, dev_id = _device_ids(model.device)
    rng = np.random.default_rng(0)
    vocab = int(model.manifest["model"]["vocab_size"])
    model.reset()
    model.step("prefill", [int(t) for t in rng.integers(3, vocab, prompt_len)])

    def run(instrument: bool) -> dict[str, Any]:
        data = model._inputs([int(rng.integers(3, vocab))])
        result = json.loads(call(model.vm.module, "decode", dev_type, dev_id, instrument, data, model.kv,
                                 model.params))
        model._finish(1)
        return result

    run(False)  # warm-up: first launches load kernels and fill caches
    plain = [run(False)["total_us"] for _ in range(steps)]
    traced = [run(True) for _ in range(steps)]
    if bandwidth:
        bw, source, tflops = bandwidth, "--bandwidth", None
    elif peak:
        bw, source, tflops = peak[1], f"peak of {peak[0]} (data sheet)", peak[2]
    else:
        bw, source, tflops = measure_bandwidth(sess, model.device), "measured (device-side copy)", None
    peak_source = "data sheet"
    if tflops is None and not (rpc or tracker) and model.kind == "cpu":
        threads = int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)
        tflops, peak_source = measure_cpu_peak(threads), f"measured (torch float32 GEMM, {threads} threads)"
    where = f"{model.kind}:0 at {rpc or f'tracker {tracker} key {key}' if rpc or tracker else 'this machine'}"
    return Profile(model.manifest["target"]["name"], where, steps, float(np.median(plain)),
                   float(np.median([t["total_us"] for t in traced])), aggregate(traced, model.manifest["model"]), bw,
                   source, tflops, peak_source)


def _device_ids(device: Any) -> tuple[int, int]:
    """(DLPack device type, index) as seen by the server (strips the RPC session bits)."""
    from tvm.rpc.base import RPC_SESS_MASK

    return device.dlpack_device_type() % RPC_SESS_MASK, device.index


def format_profile(p: Profile, top: int = 25) -> str:
    """Time per step by role in the model, then per kernel: share of the instrumented step, GB/s,
    % of the bandwidth roof."""
    lines = [f"decode step on {p.device} (target {p.target}), {p.steps} steps: "
             f"{p.step_us:.1f} us plain, {p.instrumented_us:.1f} us with a sync around every call",
             f"roofline bandwidth: {p.bandwidth_gbps:.1f} GB/s, {p.bandwidth_source}"
             + (f"; compute peak {p.peak_tflops * 1e3:.0f} GFLOP/s, {p.peak_source}" if p.peak_tflops else ""), ""]
    total = p.instrumented_us or 1.0

    def cells(k: KernelStat) -> str:
        mb = f"{k.weight_bytes / 1e6:8.2f}" if k.weight_bytes else f"{'':>8}"
        gbps = f"{k.gbps:8.1f}" if k.gbps else f"{'':>8}"
        roof = f"{100 * k.gbps / p.bandwidth_gbps:5.1f}%" if k.gbps else f"{'':>6}"
        return f"{k.calls:>5} {k.us:9.1f} {100 * k.us / total:5.1f}% {mb} {gbps} {roof}"

    lines.append(f"{'role':<14} {'kernels':<40} {'calls':>5} {'us/step':>9} {'share':>6} {'MB':>8} {'GB/s':>8} {'roof':>6}")
    for r in p.roles():
        names = ", ".join(sorted({k.name for k in p.kernels if k.role == r.role})) or "(between kernel calls)"
        lines.append(f"{r.role:<14} {names[:40]:<40} {cells(r)}")
    lines += ["", f"{'kernel':<44} {'kind':<6} {'calls':>5} {'us/step':>9} {'share':>6} {'MB':>8} {'GB/s':>8} "
                  f"{'roof':>6} role"]
    for k in p.kernels[:top]:
        lines.append(f"{k.name[:44]:<44} {k.kind:<6} {cells(k)} {k.role}")
    if len(p.kernels) > top:
        rest = p.kernels[top:]
        lines.append(f"{f'({len(rest)} more)':<44} {'':<6} {sum(k.calls for k in rest):>5} "
                     f"{sum(k.us for k in rest):9.1f} {100 * sum(k.us for k in rest) / total:5.1f}%")
    weights = [k for k in p.kernels if k.weight_bytes]
    wb, wus = sum(k.weight_bytes for k in weights), sum(k.us for k in weights)
    if wus:
        lines += ["", f"linear kernels: {wb / 1e6:.2f} MB of weights in {wus:.1f} us = {wb / wus / 1e3:.1f} GB/s "
                      f"({100 * wb / wus / 1e3 / p.bandwidth_gbps:.1f}% of the roof); bandwidth bound for the "
                      f"step: {wb / p.bandwidth_gbps / 1e3:.1f} us"]
    return "\n".join(lines)


def roofline_figure(p: Profile) -> Any:
    """Roofline: one point per linear role (qkv, o, gate_up, down, lm_head) at (FLOP per weight
    byte, attained GFLOP/s), under the bandwidth roof and the compute roof where one is known."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    pts = [r for r in p.roles() if r.intensity and r.us > 0]
    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.add_subplot()
    xs = np.logspace(-1, 3, 200)
    ax.plot(xs, p.bandwidth_gbps * xs, color="black", lw=1.5,
            label=f"memory roof: {p.bandwidth_gbps:.0f} GB/s ({p.bandwidth_source})")
    if p.peak_tflops:
        ax.axhline(p.peak_tflops * 1e3, color="tab:red", lw=1.5, ls="--",
                   label=f"compute roof: {p.peak_tflops * 1e3:.0f} GFLOP/s ({p.peak_source})")
    markers = {"int4": ("o", "tab:blue"), "matmul": ("s", "tab:orange")}
    for kind, (marker, color) in markers.items():
        sel = [k for k in pts if k.kind == kind]
        if sel:
            ax.scatter([k.intensity for k in sel], [k.flops / (k.us * 1e3) for k in sel], marker=marker,
                       color=color, label=f"{kind} linears", zorder=3)
    for i, k in enumerate(sorted(pts, key=lambda k: k.flops / (k.us * 1e3))):
        # labels fan out vertically: points of one model sit at nearly the same intensity
        ax.annotate(f"{k.role} ({k.us:.0f} us)", (k.intensity, k.flops / (k.us * 1e3)), fontsize=7,
                    xytext=(8, -14 + 11 * i), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of weights)")
    ax.set_ylabel("attained performance (GFLOP/s)")
    ax.set_title(f"decode-step roofline: {p.target} on {p.device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_roofline(p: Profile, out: Path) -> Path:
    """The roofline as a PNG file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    roofline_figure(p).savefig(out, format="png")
    return out

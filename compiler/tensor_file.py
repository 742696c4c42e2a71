"""A safetensors file written one tensor at a time, so a model's packed weights (or calibration
statistics) stream to disk block by block instead of being gathered in memory first.

safetensors puts its JSON header before the data, and the header holds every tensor's offsets.
So the writer reserves room for the header from the tensor names (an entry's size is bounded by
its name), writes the data after it as the tensors come, and writes the header last, padded
with spaces, which the format allows. Tensors are stored back to back in the order written, as
the format requires (no gaps), and the same tensors in the same order give the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
           np.dtype(np.uint32): "U32", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int64): "I64"}
# Beyond the JSON-quoted name: {"dtype":"F32","shape":[...],"data_offsets":[a,b]} with up to 8 dims
# of 19 digits and two 20-digit offsets, plus the comma.
_ENTRY_BOUND = 40 + 8 * 20 + 2 * 21 + 2


class SafetensorsWriter:
    """Create `path` holding exactly the tensors `names`, each passed once to `write`, in any order;
    `close` writes the header (and refuses if a name was never written)."""

    def __init__(self, path: Path, names: Sequence[str], metadata: dict[str, str] | None = None):
        self._names = set(names)
        if len(self._names) != len(names):
            raise ValueError("tensor names repeat")
        self._metadata = dict(metadata or {})
        bound = 2 + sum(len(json.dumps(n)) + 1 + _ENTRY_BOUND for n in names)
        bound += len(json.dumps({"__metadata__": self._metadata})) + 1
        self._reserved = (bound + 7) // 8 * 8  # data starts 8-byte aligned
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._file = open(path, "wb")
        self._file.seek(8 + self._reserved)

    def write(self, name: str, array: np.ndarray) -> None:
        if name not in self._names or name in self._entries:
            raise ValueError(f"tensor {name} is not expected here or was written already")
        a = np.ascontiguousarray(array)
        if a.dtype not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {a.dtype}, which safetensors files here do not hold")
        self._file.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
        self._entries[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                               "data_offsets": [self._offset, self._offset + a.nbytes]}
        self._offset += a.nbytes

    def close(self) -> None:
        try:
            missing = self._names - set(self._entries)
            if missing:
                raise ValueError(f"tensors never written: {', '.join(sorted(missing)[:3])}")
            header = {"__metadata__": self._metadata} if self._metadata else {}
            header.update(self._entries)
            text = json.dumps(header, separators=(",", ":")).encode()
            assert len(text) <= self._reserved, "header bound too small"  # _ENTRY_BOUND covers every entry
            self._file.seek(0)
            self._file.write(self._reserved.to_bytes(8, "little"))
            self._file.write(text + b" " * (self._reserved - len(text)))
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without a header (the caller removes the file)."""
        self._file.close()

"""Opt-in input cache (``data.cache=DIR``): decoded, resized inputs in memory-mapped numpy arrays.

Layout: ``DIR/<dataset>-<key>/`` with ``manifest.json`` and, per cached field ``f``,
``f.npy`` (the data) and ``f.filled.npy`` (one byte per clip: 1 once the clip's rows are written).
``key`` is a hash of the dataset name, the preprocessing parameters and the list of input files, so
changing a parameter (image size, spectrogram settings, ...) or the file list uses a fresh cache;
the old folder is left in place (delete it by hand to reclaim disk).

Two kinds of field:
  * ``ragged``: a variable number of rows per clip (all frames of a clip), ``counts[i]`` rows of
    shape ``row_shape`` stored back to back (uint8 frames);
  * ``fixed``: one ``row_shape`` array per clip (spectrograms, float32).

The cache fills lazily: the first time a clip is read its inputs are decoded and written, later
reads (next epochs, other DataLoader workers) come from the memory map. Rows of different clips are
disjoint, so concurrent workers writing different clips do not conflict; the flag byte is set
after the data is written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

CACHE_VERSION = 1


@dataclass
class FieldSpec:
    kind: str  # "ragged" | "fixed"
    row_shape: Tuple[int, ...]
    dtype: str
    counts: Optional[Sequence[int]] = None  # ragged only


def cache_key(dataset: str, params: Dict[str, Any], files: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "dataset": dataset, "params": params}, sort_keys=True,
                        default=str).encode())
    for f in files:
        h.update(f.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class InputCache:
    def __init__(self, root: str | Path, dataset: str, params: Dict[str, Any], files: Sequence[str],
                 fields: Dict[str, FieldSpec], n_clips: int):
        self.key = cache_key(dataset, params, files)
        self.dir = Path(root) / f"{dataset}-{self.key}"
        self.n = int(n_clips)
        self.fields = fields
        self.offsets: Dict[str, np.ndarray] = {}
        for name, spec in fields.items():
            if spec.kind == "ragged":
                counts = np.asarray(spec.counts, dtype=np.int64)
                self.offsets[name] = np.concatenate([[0], np.cumsum(counts)])
        self._maps: Dict[str, np.ndarray] = {}
        self._flags: Dict[str, np.ndarray] = {}
        self._create(dataset, params, len(files))

    # -- files
    def _rows(self, name: str) -> int:
        return int(self.offsets[name][-1]) if name in self.offsets else self.n

    def _create(self, dataset: str, params: Dict[str, Any], n_files: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        want = {"version": CACHE_VERSION, "dataset": dataset, "key": self.key, "params": params, "clips": self.n,
                "files": n_files,
                "fields": {k: {"kind": s.kind, "row_shape": list(s.row_shape), "dtype": s.dtype,
                               "rows": self._rows(k)} for k, s in self.fields.items()}}
        want = json.loads(json.dumps(want, default=str))
        ok = False
        if manifest.exists():
            try:
                ok = json.loads(manifest.read_text()) == want
            except Exception:
                ok = False
        for name, spec in self.fields.items():
            data, flags = self.dir / f"{name}.npy", self.dir / f"{name}.filled.npy"
            if ok and data.exists() and flags.exists():
                continue
            np.lib.format.open_memmap(data, mode="w+", dtype=np.dtype(spec.dtype),
                                      shape=(self._rows(name), *spec.row_shape)).flush()
            np.save(flags, np.zeros(self.n, dtype=np.uint8))
        if not ok:
            manifest.write_text(json.dumps(want, indent=1))

    def _open(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        if name not in self._maps:
            self._maps[name] = np.load(self.dir / f"{name}.npy", mmap_mode="r+")
            self._flags[name] = np.load(self.dir / f"{name}.filled.npy", mmap_mode="r+")
        return self._maps[name], self._flags[name]

    def __getstate__(self):  # memory maps are reopened in each DataLoader worker
        d = dict(self.__dict__)
        d["_maps"], d["_flags"] = {}, {}
        return d

    # -- access
    def has(self, name: str, i: int) -> bool:
        return bool(self._open(name)[1][i])

    def get(self, name: str, i: int) -> np.ndarray:
        """The rows of clip ``i`` (a view into the memory map; copy before modifying)."""
        data, _ = self._open(name)
        if name in self.offsets:
            o = self.offsets[name]
            return data[o[i]:o[i + 1]]
        return data[i]

    def put(self, name: str, i: int, value: np.ndarray) -> None:
        data, flags = self._open(name)
        if name in self.offsets:
            o = self.offsets[name]
            data[o[i]:o[i + 1]] = value
        else:
            data[i] = value
        flags[i] = 1

    def filled(self, name: str) -> int:
        return int(self._open(name)[1].sum())

    def flush(self) -> None:
        for m in list(self._maps.values()) + list(self._flags.values()):
            m.flush()


__all__ = ["CACHE_VERSION", "FieldSpec", "InputCache", "cache_key"]

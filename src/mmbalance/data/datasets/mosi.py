"""CMU-MOSI and CMU-MOSEI from the MulT / MultiBench feature pickles.

Files: ``data.root`` is the pickle itself or a folder holding it (``data.file`` names it inside the
root). Default names tried: MOSI ``mosi_data.pkl``, ``mosi_data_noalign.pkl``, ``mosi.pkl``;
MOSEI ``mosei_senti_data.pkl``, ``mosei_senti_data_noalign.pkl``, ``mosei_data.pkl``, ``mosei.pkl``.
The pickle is a dict with splits ``train``, ``valid`` (or ``val``/``dev``), ``test``, each a dict
of arrays: ``text`` (N, T, 300 GloVe), ``audio`` (N, T, 5 MOSI / 74 MOSEI COVAREP), ``vision``
(N, T, 20 MOSI / 35 MOSEI Facet), ``labels`` (N, 1, 1) sentiment in [-3, 3], optional ``id``.
(Pickles run code when loaded: only load files you trust.)

Modalities: ``text``, ``audio``, ``vision`` as float sequences [T, D] (transformer encoders by
default); ``data.modalities=[text,vision]`` keeps a subset (order = text, audio, vision).

Non-finite values: as BalanceBenchmark, ``-inf``/``nan`` in the modalities listed in
``data.fix_nonfinite`` (default ``[audio]``) are replaced by 0; the counts are in
``bundle.nonfinite_replaced`` (and ``dataset.nonfinite_replaced`` per split). Non-finite values
elsewhere are an error (or, with ``data.on_error=skip``, the sample is skipped and listed).

Targets (``data.target``):

* ``binary`` (default, C-BB): ``y < 0`` -> 0 (negative), else 1 (zero counts as positive).
* ``binary_nonzero``: as above but samples with ``y == 0`` are dropped; every dropped sample is
  listed in ``bundle.skipped`` (split, index, id, reason).
* ``7class``: ``round(clip(y, -3, 3)) + 3`` -> 0..6 (classes "-3" .. "3").
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from ...errors import ConfigError, DataError
from ..base import DataBundle, TensorMultimodalDataset, register_dataset

MODALITIES = ("text", "audio", "vision")
TARGETS = ("binary", "binary_nonzero", "7class")
SPLIT_KEYS = {"train": ("train",), "val": ("valid", "val", "dev"), "test": ("test",)}
DEFAULT_FILES = {"mosi": ("mosi_data.pkl", "mosi_data_noalign.pkl", "mosi.pkl"),
                 "mosei": ("mosei_senti_data.pkl", "mosei_senti_data_noalign.pkl", "mosei_data.pkl", "mosei.pkl")}
EXPECTED_DIMS = {"mosi": {"text": 300, "audio": 5, "vision": 20}, "mosei": {"text": 300, "audio": 74, "vision": 35}}


@dataclass
class MosiOptions:
    file: str = ""  # pickle file name inside data.root ("" = the default names)
    target: str = "binary"  # binary | binary_nonzero | 7class
    modalities: List[str] = field(default_factory=lambda: list(MODALITIES))
    fix_nonfinite: List[str] = field(default_factory=lambda: ["audio"])


def find_pickle(name: str, root: Optional[str], file: str = "") -> Path:
    if not root:
        raise DataError(f"{name}: set data.root (or --data-root) to the {name} pickle or the folder holding it")
    r = Path(root).expanduser()
    if r.is_file():
        return r
    if not r.is_dir():
        raise DataError(f"{name}: data.root '{r}' does not exist")
    if file:
        p = r / file
        if not p.is_file():
            raise DataError(f"{name}: '{p}' does not exist")
        return p
    for n in DEFAULT_FILES[name]:
        if (r / n).is_file():
            return r / n
    raise DataError(f"{name}: no pickle in '{r}'; looked for {', '.join(DEFAULT_FILES[name])} (or set data.file=NAME)")


def load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:
        raise DataError(f"'{path}' is not a readable pickle ({type(exc).__name__}: {exc})") from None


def _ids(split_dict: Mapping[str, Any], n: int) -> List[str]:
    ids = split_dict.get("id")
    if ids is None:
        return [str(i) for i in range(n)]
    try:
        arr = np.asarray(ids)
        if len(arr) != n:
            return [str(i) for i in range(n)]
        out = []
        for row in arr:
            row = np.asarray(row).reshape(-1)
            out.append("_".join(x.decode() if isinstance(x, bytes) else str(x) for x in row))
        return out
    except Exception:
        return [str(i) for i in range(n)]


def make_targets(y: np.ndarray, target: str) -> np.ndarray:
    if target in ("binary", "binary_nonzero"):
        return (y >= 0).astype(np.int64)
    return (np.round(np.clip(y, -3.0, 3.0)) + 3).astype(np.int64)


def load_mosi(name: str, path: Path, o: MosiOptions, on_error: str = "raise") -> DataBundle:
    if o.target not in TARGETS:
        raise ConfigError(f"{name}: data.target must be one of {', '.join(TARGETS)}, got '{o.target}'")
    mods = list(o.modalities)
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ConfigError(f"{name}: data.modalities must be a non-empty subset of {list(MODALITIES)}, got {mods}")
    mods = [m for m in MODALITIES if m in mods]
    bad_fix = [m for m in o.fix_nonfinite if m not in MODALITIES]
    if bad_fix:
        raise ConfigError(f"{name}: data.fix_nonfinite names unknown modalities {bad_fix}; choose from {list(MODALITIES)}")
    data = load_pickle(path)
    if not isinstance(data, Mapping):
        raise DataError(f"{name}: '{path}' must hold a dict of splits (train, valid, test), got {type(data).__name__}")
    skipped: List[Dict[str, Any]] = []
    replaced: Dict[str, Dict[str, int]] = {}
    splits: Dict[str, TensorMultimodalDataset] = {}
    dims: Dict[str, tuple] = {}
    for split, keys in SPLIT_KEYS.items():
        key = next((k for k in keys if k in data), None)
        if key is None:
            raise DataError(f"{name}: '{path}' has no split {' / '.join(repr(k) for k in keys)}; keys present: {sorted(map(str, data))}")
        sd = data[key]
        if not isinstance(sd, Mapping):
            raise DataError(f"{name}: '{path}' split '{key}' must be a dict of arrays, got {type(sd).__name__}")
        missing = [k for k in ["labels"] + mods if k not in sd]
        if missing:
            raise DataError(f"{name}: '{path}' split '{key}' lacks key(s) {missing}; keys present: {sorted(map(str, sd))}")
        try:
            y = np.asarray(sd["labels"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{name}: '{path}' split '{key}' field 'labels' is not numeric ({exc})") from None
        if y.ndim == 0 or y.size != y.shape[0]:
            raise DataError(f"{name}: '{path}' split '{key}' field 'labels' must have one value per sample "
                            f"((N,), (N,1) or (N,1,1)), got shape {list(y.shape)}")
        y = y.reshape(-1)
        n = len(y)
        ids = _ids(sd, n)
        ok = np.ones(n, dtype=bool)
        for i in np.flatnonzero(~np.isfinite(y)):
            if on_error != "skip":
                raise DataError(f"{name}: '{path}' split '{key}' sample {i} (id {ids[i]}) field 'labels' is {y[i]}")
            skipped.append({"split": split, "index": int(i), "id": ids[i], "field": "labels", "reason": f"label is {y[i]}"})
            ok[i] = False
        arrays = {}
        replaced[split] = {}
        for m in mods:
            try:
                x = np.array(sd[m], dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise DataError(f"{name}: '{path}' split '{key}' field '{m}' is not a numeric array ({exc})") from None
            if x.ndim != 3 or x.shape[0] != n:
                raise DataError(f"{name}: '{path}' split '{key}' field '{m}' must have shape (N={n}, T, D), got {list(x.shape)}")
            if m in dims and x.shape[1:] != dims[m]:
                raise DataError(f"{name}: '{path}' split '{key}' field '{m}' has per-sample shape {list(x.shape[1:])} "
                                f"but the train split has {list(dims[m])}")
            dims.setdefault(m, x.shape[1:])
            bad = ~np.isfinite(x)
            if m in o.fix_nonfinite:
                replaced[split][m] = int(bad.sum())
                x[bad] = 0.0
            else:
                rows = np.flatnonzero(bad.reshape(n, -1).any(axis=1))
                for i in rows:
                    if on_error != "skip":
                        raise DataError(f"{name}: '{path}' split '{key}' sample {i} (id {ids[i]}) field '{m}' has NaN/inf "
                                        f"values (data.fix_nonfinite=[..., {m}] replaces them by 0)")
                    if ok[i]:
                        skipped.append({"split": split, "index": int(i), "id": ids[i], "field": m, "reason": "NaN/inf values"})
                    ok[i] = False
            arrays[m] = x
        if o.target == "binary_nonzero":
            for i in np.flatnonzero(ok & (y == 0)):
                skipped.append({"split": split, "index": int(i), "id": ids[i], "field": "labels",
                                "reason": "label 0 (neutral) dropped by data.target=binary_nonzero"})
                ok[i] = False
        keep = np.flatnonzero(ok)
        if len(keep) == 0:
            raise DataError(f"{name}: split '{key}' of '{path}' has no usable samples")
        labels = make_targets(y[keep], o.target)
        ds = TensorMultimodalDataset({m: torch.from_numpy(arrays[m][keep]) for m in mods}, labels,
                                     7 if o.target == "7class" else 2)
        ds.ids = [ids[i] for i in keep]
        ds.nonfinite_replaced = dict(replaced[split])
        splits[split] = ds
    k = 7 if o.target == "7class" else 2
    names = [str(c) for c in range(-3, 4)] if k == 7 else ["negative", "positive" if o.target == "binary_nonzero" else "non-negative"]
    bundle = DataBundle(name, tuple(mods), k, splits, class_names=names,
                        input_shapes={m: tuple(int(s) for s in dims[m]) for m in mods}, skipped=skipped)
    bundle.nonfinite_replaced = replaced
    bundle.source = str(path)
    return bundle


_PRESETS = {"train": {"epochs": 70}, "optim": {"lr": 0.01}, "data": {"batch_size": 64},
            "schedule": {"name": "step", "step_size": 50, "gamma": 0.1}}


def _register(name: str, description: str) -> None:
    @register_dataset(name, options=MosiOptions, modalities=MODALITIES, needs_root=True, presets=_PRESETS,
                      description=description)
    def build(options: MosiOptions, data_cfg=None, seed: int = 0) -> DataBundle:
        o = options or MosiOptions()
        path = find_pickle(name, getattr(data_cfg, "root", None), o.file)
        return load_mosi(name, path, o, getattr(data_cfg, "on_error", "raise"))


_register("mosi", "CMU-MOSI text/audio/vision features (MulT/MultiBench mosi_data.pkl), binary sentiment")
_register("mosei", "CMU-MOSEI text/audio/vision features (MulT/MultiBench mosei_senti_data.pkl), binary sentiment")

"""Pure statistics for reports (no matplotlib): mean ± std per method and the paired comparison of
every method against a reference method (``joint``) over the seeds both ran.

The paired comparison takes, for each seed run by both methods, ``method - reference`` and reports
the mean difference with a two-sided t-interval (``n - 1`` degrees of freedom, ``n`` = number of
common seeds). With fewer than two common seeds only the difference is given (no interval)."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import MMBalanceError

NON_NUMERIC = ("dataset", "method")


def _num(v: Any) -> Any:
    """A csv cell as int / float / bool / None (empty), else the string unchanged."""
    if v is None:
        return None
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s == "" or s.lower() in ("none", "nan"):
        return None
    if s in ("True", "False"):
        return s == "True"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def read_results_csv(path: str | Path) -> List[Dict[str, Any]]:
    """The rows of a bench ``results.csv``, numbers parsed (empty cells -> None)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise MMBalanceError(f"cannot read bench results {path}: {exc}") from exc
    if not rows:
        raise MMBalanceError(f"{path} has no rows")
    for col in ("dataset", "method", "seed", "accuracy"):
        if col not in rows[0]:
            raise MMBalanceError(f"{path} has no column {col!r}: is it an mmbalance bench results.csv?")
    return [{k: (v if k in NON_NUMERIC else _num(v)) for k, v in r.items()} for r in rows]


def _finite(vals: Sequence[Any]) -> List[float]:
    out = []
    for v in vals:
        if isinstance(v, bool) or v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def mean_std(vals: Sequence[Any]) -> Dict[str, Optional[float]]:
    """``{"mean", "std", "n"}`` over the finite numbers in ``vals`` (sample std, None for n < 2;
    mean None for n = 0)."""
    xs = _finite(vals)
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def t_interval(diffs: Sequence[float], level: float = 0.95) -> Dict[str, Optional[float]]:
    """Mean of ``diffs`` with a two-sided ``level`` t-interval (n - 1 dof).

    Returns ``{"n", "mean", "std", "half_width", "low", "high"}``; with n < 2 the interval fields
    are None (only the difference is known), with n = 0 the mean is None too."""
    from scipy import stats as st
    xs = _finite(diffs)
    n = len(xs)
    out: Dict[str, Optional[float]] = {"n": n, "mean": statistics.fmean(xs) if xs else None, "std": None,
                                       "half_width": None, "low": None, "high": None}
    if n >= 2:
        sd = statistics.stdev(xs)
        hw = float(st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(std=sd, half_width=hw, low=out["mean"] - hw, high=out["mean"] + hw)
    return out


def datasets_of(rows: Sequence[Dict[str, Any]]) -> List[str]:
    return list(dict.fromkeys(r["dataset"] for r in rows))


def methods_of(rows: Sequence[Dict[str, Any]], dataset: Optional[str] = None) -> List[str]:
    return list(dict.fromkeys(r["method"] for r in rows if dataset is None or r["dataset"] == dataset))


def modalities_of(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Modalities named by the ``zero_out_<m>`` columns, in column order."""
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return [c[len("zero_out_"):] for c in cols if c.startswith("zero_out_")]


def summary(rows: Sequence[Dict[str, Any]], dataset: str, columns: Sequence[str]) -> Dict[str, Dict[str, Dict]]:
    """``{method: {column: mean_std(...)}}`` for one dataset."""
    sub = [r for r in rows if r["dataset"] == dataset]
    return {m: {c: mean_std([r.get(c) for r in sub if r["method"] == m]) for c in columns}
            for m in methods_of(sub)}


def weak_modality(rows: Sequence[Dict[str, Any]], dataset: str, reference: str = "joint") -> Optional[str]:
    """The modality with the lowest mean zero-out accuracy under ``reference`` (None if the reference
    method or the zero-out columns are missing)."""
    sub = [r for r in rows if r["dataset"] == dataset and r["method"] == reference]
    best = None
    for m in modalities_of(rows):
        ms = mean_std([r.get(f"zero_out_{m}") for r in sub])
        if ms["mean"] is not None and (best is None or ms["mean"] < best[1]):
            best = (m, ms["mean"])
    return best[0] if best else None


def paired_differences(rows: Sequence[Dict[str, Any]], dataset: str, method: str, column: str,
                       reference: str = "joint") -> Dict[int, float]:
    """``{seed: method - reference}`` of ``column`` over the seeds both ran (finite values only)."""
    def by_seed(name):
        return {r["seed"]: r.get(column) for r in rows if r["dataset"] == dataset and r["method"] == name}
    a, b = by_seed(method), by_seed(reference)
    out = {}
    for seed in a:
        if seed in b and _finite([a[seed]]) and _finite([b[seed]]):
            out[seed] = float(a[seed]) - float(b[seed])
    return out


def paired_comparison(rows: Sequence[Dict[str, Any]], dataset: str, column: str, reference: str = "joint",
                      level: float = 0.95) -> Dict[str, Dict[str, Any]]:
    """For every method other than ``reference``: the t-interval of its paired differences
    against ``reference`` in ``column`` plus the list of common ``seeds``. Empty if the reference
    did not run on ``dataset``."""
    if reference not in methods_of(rows, dataset):
        return {}
    out = {}
    for m in methods_of(rows, dataset):
        if m == reference:
            continue
        d = paired_differences(rows, dataset, m, column, reference)
        out[m] = dict(t_interval(list(d.values()), level), seeds=sorted(d))
    return out

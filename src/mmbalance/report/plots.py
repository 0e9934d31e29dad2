"""Matplotlib figures for run and bench reports (Agg backend, PNG files).

matplotlib is an optional dependency: it is imported only when a figure is drawn, and a missing
install raises :class:`~mmbalance.errors.MMBalanceError` with the ``pip install`` line."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import MMBalanceError

DPI = 110


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MMBalanceError("reports need matplotlib for their figures: pip install matplotlib "
                             "(or pip install 'mmbalance[dev]')") from exc
    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _series(rows: Sequence[Dict[str, Any]], key: str):
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("epoch", i))
            ys.append(v)
    return xs, ys


# keys of a metrics.jsonl row that are not method statistics
_BOOK_KEYS = {"epoch", "train_loss", "train_accuracy", "train_samples", "lr", "time", "seconds",
              "train_seconds", "samples_seen", "step"}


def method_stat_keys(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Numeric per-epoch keys written by the method (coeff_*, ratio_*, rho_*, alpha_*, lambda...)."""
    keys: List[str] = []
    for r in rows:
        for k, v in r.items():
            if (k in keys or k in _BOOK_KEYS or k.startswith("val_") or k.startswith("test_")
                    or isinstance(v, bool) or not isinstance(v, (int, float))):
                continue
            keys.append(k)
    return keys


def training_curves(rows: Sequence[Dict[str, Any]], modalities: Sequence[str], path: str | Path,
                    warmup_epochs: Optional[int] = None, title: str = "") -> Path:
    """Panel 1: train / fused val accuracy and per-modality val zero-out / head accuracies over
    epochs; panel 2 (when the method logs any): method statistics. A dashed vertical line marks
    the end of warm-up (between epoch ``warmup_epochs - 1`` and ``warmup_epochs``)."""
    plt = _plt()
    stats = method_stat_keys(rows)
    n = 2 if stats else 1
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.2), squeeze=False)
    ax = axes[0][0]
    for key, label, style in [("train_accuracy", "train (fused)", ":"), ("val_accuracy", "val (fused)", "-")]:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, marker="o", ms=3, lw=2, label=label, color="black" if style == "-" else "grey")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(modalities):
        c = colors[i % len(colors)]
        for key, label, style in [(f"val_{m}_zero_out_accuracy", f"val {m} zero-out", "-"),
                                  (f"val_{m}_head_accuracy", f"val {m} head", "--")]:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, style, marker=".", color=c, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracies over epochs")
    panels = [ax]
    if stats:
        ax2 = axes[0][1]
        for k in stats:
            xs, ys = _series(rows, k)
            if xs:
                ax2.plot(xs, ys, marker=".", label=k)
        ax2.set_xlabel("epoch")
        ax2.set_title("method statistics")
        panels.append(ax2)
    from matplotlib.ticker import MaxNLocator
    for a in panels:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if warmup_epochs:
            a.axvline(warmup_epochs - 0.5, color="red", ls="--", lw=1, label=f"end of warm-up ({warmup_epochs})")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def grouped_bars(values: Dict[str, Dict[str, Optional[float]]], path: str | Path, title: str = "",
                 ylabel: str = "accuracy") -> Path:
    """``values[group][series]`` as grouped bars (groups on x, one colour per series); None skipped."""
    plt = _plt()
    groups = list(values)
    series: List[str] = []
    for g in groups:
        series += [s for s, v in values[g].items() if v is not None and s not in series]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) * max(1, len(series)) / 2 + 2), 4.0))
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, g in enumerate(groups) if values[g].get(s) is not None]
        ys = [values[g][s] for g in groups if values[g].get(s) is not None]
        bars = ax.bar(xs, ys, width, label=s)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom" if y >= 0 else "top", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def gap_histograms(pairs: Dict[str, Dict[str, Any]], path: str | Path) -> Path:
    """One panel per modality pair: histogram of the per-sample modality gap and, when given, the
    fitted 2-component GMM density (scaled to counts)."""
    import numpy as np
    plt = _plt()
    names = list(pairs)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.2 * max(1, len(names)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        p = pairs[name] or {}
        h = p.get("histogram") or {}
        edges, counts = h.get("edges"), h.get("counts")
        if edges and counts and len(edges) == len(counts) + 1:
            edges = np.asarray(edges, dtype=float)
            counts = np.asarray(counts, dtype=float)
            ax.bar(edges[:-1], counts, np.diff(edges), align="edge", alpha=0.6, edgecolor="white", label="samples")
            g = p.get("gmm") or {}
            if g.get("weights") and g.get("means") and g.get("variances"):
                xs = np.linspace(edges[0], edges[-1], 400)
                scale = counts.sum() * float(np.mean(np.diff(edges)))
                total = np.zeros_like(xs)
                for w, mu, var in zip(g["weights"], g["means"], g["variances"]):
                    var = max(float(var), 1e-12)
                    comp = w * np.exp(-(xs - mu) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var) * scale
                    total += comp
                    ax.plot(xs, comp, "--", lw=1)
                ax.plot(xs, total, color="black", lw=1.5, label="2-component GMM")
        sub = f"mean {p['mean']:.3f}" if isinstance(p.get("mean"), (int, float)) else ""
        share = (p.get("gmm") or {}).get("balanced_share")
        if isinstance(share, (int, float)):
            sub += f", balanced share {share:.2f}"
        ax.set_title(f"modality gap {name}\n{sub}", fontsize=9)
        ax.set_xlabel("true-class probability gap")
        ax.set_ylabel("samples")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def method_errorbars(stats: Dict[str, Dict[str, Optional[float]]], path: str | Path, title: str,
                     ylabel: str = "accuracy", reference: Optional[float] = None,
                     reference_label: str = "") -> Path:
    """``stats[method] = {"mean", "std", "n"}`` as bars with ±std error bars."""
    plt = _plt()
    methods = [m for m, s in stats.items() if s.get("mean") is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(methods) + 2), 4.0))
    means = [stats[m]["mean"] for m in methods]
    errs = [stats[m]["std"] or 0.0 for m in methods]
    colors = ["tab:grey" if m == "joint" else "tab:blue" for m in methods]
    ax.bar(range(len(methods)), means, yerr=errs, capsize=4, color=colors)
    for i, (y, e) in enumerate(zip(means, errs)):
        ax.annotate(f"{y:.3f}", (i, y + e), ha="center", va="bottom", fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="red", ls="--", lw=1, label=reference_label)
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    lo = min([m - e for m, e in zip(means, errs)] or [0])
    hi = max([m + e for m, e in zip(means, errs)] or [1])
    pad = 0.15 * (hi - lo or 1)
    ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def cost_scatter(points: Dict[str, Dict[str, Dict[str, Optional[float]]]], path: str | Path, title: str = "") -> Path:
    """Two panels: mean accuracy against mean samples seen and against mean train seconds, one
    point per method (``points[method][column] = {"mean", "std"}`` for accuracy, samples_seen,
    train_seconds)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, col, label in [(axes[0][0], "samples_seen", "samples seen per run"),
                           (axes[0][1], "train_seconds", "train seconds per run")]:
        for m, p in points.items():
            x, y = p.get(col, {}).get("mean"), p.get("accuracy", {}).get("mean")
            if x is None or y is None:
                continue
            ax.errorbar([x], [y], xerr=[p[col].get("std") or 0], yerr=[p["accuracy"].get("std") or 0],
                        fmt="o", capsize=3, color="tab:grey" if m == "joint" else None)
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)

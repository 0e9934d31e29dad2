"""MCR's synthetic experiment (Kontras et al., Fig. 1 right): accuracy as the unique information
of modality 1 (U1) grows and the shared information (S) shrinks, with U2 fixed.

    .venv/bin/python benchmarks/synthetic_sweep.py --out runs/sweep [--seeds 0,1,2] [--epochs 20]

Writes ``runs/sweep/sweep.csv``, ``docs/synthetic_sweep.md`` (mean ± std per point and method)
and ``docs/synthetic_sweep.png``. Every run uses the synthetic preset's model, optimiser and
budget; only ``data.shared`` / ``data.unique`` change along the sweep.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from mmbalance.bench.runner import run_bench

METHODS = ["joint", "ensemble", "multiloss", "ogm_ge", "mm", "bmm", "midas", "gmm_adaptive", "arm", "mcr", "mla"]
U2 = 0.1
POINTS = [(0.8, 0.1), (0.6, 0.3), (0.4, 0.5), (0.2, 0.7)]  # (S, U1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--from-csv", action="store_true", help="re-make the report and plot from OUT/sweep.csv")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    rows = []
    if args.from_csv:
        rows = _read_csv(Path(args.out) / "sweep.csv")
        points = []
    else:
        points = POINTS
    for s, u1 in points:
        over = [f"data.shared={s}", f"data.unique=[{u1},{U2}]"]
        point_rows = run_bench(["synthetic"], methods, seeds, Path(args.out) / f"S{s}_U{u1}", epochs=args.epochs,
                               overrides=over, log=lambda m: print(m, file=sys.stderr, flush=True))
        for r in point_rows:
            r.update(shared=s, unique1=u1, unique2=U2)
        rows += point_rows
    out = Path(args.out)
    if args.from_csv:
        return _write_docs(rows, methods, seeds, Path(args.docs))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return _write_docs(rows, methods, seeds, Path(args.docs))


def _write_docs(rows, methods, seeds, docs: Path) -> int:
    docs.mkdir(exist_ok=True)
    (docs / "synthetic_sweep.md").write_text(report(rows, methods, seeds))
    plot(rows, methods, docs / "synthetic_sweep.png")
    print((docs / "synthetic_sweep.md").read_text())
    return 0


def _read_csv(path: Path):
    rows = []
    for r in csv.DictReader(open(path)):
        for k, v in r.items():
            if k not in ("dataset", "method", "best_epoch_in_warmup") and v not in ("", None):
                r[k] = float(v)
        rows.append(r)
    return rows


def _ms(vals):
    m = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, sd


def _table(rows, methods, metric: str):
    lines = ["| method | " + " | ".join(f"S={s}, U1={u}" for s, u in POINTS) + " |", "|---|" + "---|" * len(POINTS)]
    for m in methods:
        cells = []
        for s, u in POINTS:
            mean, sd = _ms([r[metric] for r in rows if r["method"] == m and r["shared"] == s and r["unique1"] == u])
            cells.append(f"{100 * mean:.2f} ± {100 * sd:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def report(rows, methods, seeds) -> str:
    lines = ["# Synthetic sweep (MCR Fig. 1 right)", "",
             f"Test accuracy in %, mean ± std over seeds {', '.join(map(str, seeds))}. U2 = {U2} fixed; "
             "S = fraction of samples where both modalities carry the label, U1 = fraction where only x1 does.",
             "Reproduce: `.venv/bin/python benchmarks/synthetic_sweep.py --out runs/sweep`.", "",
             "## Fused accuracy", ""]
    lines += _table(rows, methods, "accuracy")
    lines += ["", "## Zero-out accuracy of the weak modality x2", "",
              "x2 carries the label on S + U2 of the samples, so its ceiling falls along the sweep.", ""]
    lines += _table(rows, methods, "zero_out_x2")
    if any("late_zero_out_x2" in r for r in rows):
        lines += ["", "## Val zero-out accuracy of x2, mean of the last 5 epochs", "",
                  "The best checkpoint can sit on a warm-up epoch; this is what the method leaves x2 with "
                  "at the end of training.", ""]
        lines += _table(rows, methods, "late_zero_out_x2")
        lines += ["", "## Seeds whose best checkpoint lies inside the method's warm-up", "",
                  "| method | " + " | ".join(f"S={s}, U1={u}" for s, u in POINTS) + " |", "|---|" + "---|" * len(POINTS)]
        for m in methods:
            cells = []
            for s, u in POINTS:
                w = [r.get("best_epoch_in_warmup") for r in rows if r["method"] == m and r["shared"] == s
                     and r["unique1"] == u]
                known = [x for x in w if x not in (None, "")]
                cells.append("-" if not known else f"{sum(x in (True, 1.0, 'True') for x in known)}/{len(w)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, methods, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = list(range(len(POINTS)))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        means, sds = zip(*[_ms([r["accuracy"] for r in rows if r["method"] == m and r["shared"] == s and r["unique1"] == u])
                           for s, u in POINTS])
        ax.errorbar([x + 0.012 * (i - len(methods) / 2) for x in xs], [100 * v for v in means],
                    yerr=[100 * v for v in sds], marker="os^vD"[i % 5], capsize=2, label=m,
                    color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                    linestyle="-" if i < 6 else "--")
    ax.set_xticks(xs, [f"S={s}\nU1={u}" for s, u in POINTS])
    ax.set_xlabel("shared information S falls, unique information of x1 (U1) grows")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Synthetic sweep, U2 = {U2}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

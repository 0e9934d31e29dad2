"""The benchmark runner: a dataset x method x seed grid, all on the same model, data, seeds and
budget; one row per run in ``results.csv`` and mean +- std per dataset x method in ``results.md``."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import resolve_config
from ..errors import ConfigError
from ..methods import METHODS
from ..training.trainer import LAST_K as LATE_K, Trainer

QUICK_DATASETS = ("synthetic",)


def flatten_result(res: Dict[str, Any]) -> Dict[str, Any]:
    row = {"dataset": res["dataset"], "method": res["method"], "seed": res["seed"], "epochs": res["epochs"],
           "best_epoch": res["best_epoch"], "accuracy": res["test"]["accuracy"], "macro_f1": res["test"]["macro_f1"],
           "val_accuracy": res["val"]["accuracy"], "train_seconds": res["train_seconds"],
           "samples_seen": res.get("samples_seen"), "best_epoch_in_warmup": res.get("best_epoch_in_warmup")}
    for m, d in res["test"]["modalities"].items():
        row[f"zero_out_{m}"] = d.get("zero_out_accuracy")
        if "head_accuracy" in d:
            row[f"head_{m}"] = d["head_accuracy"]
    for m, v in (res.get("val_zero_out_last_k") or {}).items():
        if m != "k":
            row[f"late_zero_out_{m}"] = v
    return row


def _mean_std(vals: List[float]) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def summarize(rows: List[Dict[str, Any]]) -> str:
    """Markdown table: mean ± std (in %) per dataset x method; train time in seconds."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == ds]
        mod_cols = [k for k in sub[0] if k.startswith("zero_out_")]
        late_cols = [f"late_{c}" for c in mod_cols]
        header = (["method", "n", "accuracy", "macro-F1"] + [f"zero-out {c[9:]}" for c in mod_cols]
                  + [f"val zero-out {c[9:]}, last {LATE_K}" for c in mod_cols]
                  + ["samples/run", "best in warm-up", "train s"])
        out.append(f"### {ds}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for method in dict.fromkeys(r["method"] for r in sub):
            rs = [r for r in sub if r["method"] == method]
            cells = [method, str(len(rs)), _mean_std([r["accuracy"] for r in rs]), _mean_std([r["macro_f1"] for r in rs])]
            cells += [_mean_std([r.get(c) for r in rs]) for c in mod_cols]
            cells += [_mean_std([r.get(c) for r in rs]) for c in late_cols]
            samples = [r.get("samples_seen") for r in rs if r.get("samples_seen") is not None]
            cells.append(f"{statistics.fmean(samples):.0f}" if samples else "-")
            warm = [r.get("best_epoch_in_warmup") for r in rs]
            cells.append("-" if all(w is None for w in warm) else f"{sum(bool(w) for w in warm)}/{len(rs)}")
            secs = [r["train_seconds"] for r in rs]
            cells.append(f"{statistics.fmean(secs):.1f}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def run_bench(datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
              epochs: Optional[int] = None, overrides: Sequence[str] = (), config_file: Optional[str] = None,
              quiet: bool = True, log=print) -> List[Dict[str, Any]]:
    if epochs is not None and epochs < 1:
        raise ConfigError(f"bench epochs must be >= 1, got {epochs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if list(methods) in (["all"], []):
        methods = METHODS.names()
    # resolve every configuration first: all errors before any training
    plan = []
    for ds in datasets:
        for method in methods:
            for seed in seeds:
                ov = list(overrides) + [f"train.seed={seed}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
                plan.append((ds, method, seed, resolve_config(ds, method, config_file, ov)))
    rows: List[Dict[str, Any]] = []
    csv_path = out / "results.csv"
    for i, (ds, method, seed, cfg) in enumerate(plan):
        run_dir = out / Path(ds).stem / method / f"seed{seed}"
        res = _finished(run_dir, cfg)
        note = " (finished earlier, reused)" if res is not None else ""
        if res is None:  # a bench owns its run folders: an unfinished or different run is replaced
            res = Trainer(cfg, run_dir, quiet=quiet, overwrite=True).fit()
        rows.append(flatten_result(res))
        log(f"[{i + 1}/{len(plan)}] {Path(ds).stem} {method} seed {seed}: acc {res['test']['accuracy']:.4f} "
            f"({res['train_seconds']:.1f}s){note}")
        _write_csv(csv_path, rows)
    table = summarize(rows)
    (out / "results.md").write_text(f"# mmbalance bench\n\nTest-set metrics in %, mean ± std over seeds "
                                    f"{', '.join(map(str, seeds))}.\n\n{table}\n")
    log(table)
    try:
        from ..report import write_bench_report
        log(f"report: {write_bench_report(out)}")
    except Exception as exc:  # matplotlib is optional: the bench never fails over its pictures
        log(f"(no report.html: {exc})")
    return rows


def _finished(run_dir: Path, cfg) -> Optional[Dict[str, Any]]:
    """The result of a finished run in ``run_dir`` with exactly this config, else None."""
    import json

    import yaml
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        res = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return res if saved == cfg.to_dict() else None


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

"""The benchmark runner: a dataset x method x seed grid, all on the same model, data, seeds and
budget; one row per run in ``results.csv`` and mean +- std per dataset x method in ``results.md``.

Each run's folder (``OUT/<dataset>/<method>/seed<k>``) is its unit of work, so a bench is
resumable and can grow:

* a **finished** run (a valid ``result.json`` and the same resolved config, :data:`BENCH_NEUTRAL_KEYS`
  aside; compared with ``bench_config.yaml``, the config the bench asked for, or for a run trained
  otherwise with its ``config.yaml``) is reused, not trained again;
* a **half-finished** run (same config, ``checkpoints/last.pt``, no result) is resumed with the
  trainer's exact resume;
* anything else (no folder, another config, stopped before its first checkpoint) is trained from
  scratch, replacing the folder.

``results.csv`` accumulates: rows of runs not in this grid are kept, the row of a dataset / method /
seed in this grid is replaced by its new result (in place; new rows are appended in grid order), and
``results.md`` / ``report.html`` cover every row. Runs execute in this process, in ``jobs`` local
processes or as Ray tasks (:mod:`mmbalance.bench.executors`); the rows do not depend on which.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..config import Config, load_yaml, resolve_config
from ..errors import ConfigError, MMBalanceError
from ..methods import METHODS
from ..training.trainer import LAST_K as LATE_K, config_differences
from . import executors as X

QUICK_DATASETS = ("synthetic",)
#: config keys that change no trained value: a finished run saved with other values is still reused
BENCH_NEUTRAL_KEYS = ("train.threads", "train.progress", "train.tensorboard", "data.num_workers")
#: columns that measure the machine, not the method (they differ between two runs of one config)
TIMING_COLUMNS = ("train_seconds",)
ACTIONS = ("run", "reuse", "resume")
_ACTION_WORDS = {"run": "to do", "reuse": "reuse", "resume": "resume"}


class BenchError(MMBalanceError):
    """Some runs of a bench failed (the others' results were written)."""


@dataclass
class PlannedRun:
    """One run of the grid and what the bench will do with it (``run``, ``reuse`` or ``resume``)."""
    dataset: str
    method: str
    seed: int
    cfg: Config
    run_dir: Path
    action: str
    reason: str
    result: Optional[Dict[str, Any]] = None

    @property
    def label(self) -> str:
        return f"{Path(self.dataset).stem}/{self.method}/seed{self.seed}"


def flatten_result(res: Dict[str, Any]) -> Dict[str, Any]:
    row = {"dataset": res["dataset"], "method": res["method"], "seed": res["seed"], "epochs": res["epochs"],
           "best_epoch": res["best_epoch"], "accuracy": res["test"]["accuracy"], "macro_f1": res["test"]["macro_f1"],
           "val_accuracy": res["val"]["accuracy"], "train_seconds": res["train_seconds"],
           "samples_seen": res.get("samples_seen"), "best_epoch_in_warmup": res.get("best_epoch_in_warmup")}
    for m, d in res["test"]["modalities"].items():
        row[f"zero_out_{m}"] = d.get("zero_out_accuracy")
        if "head_accuracy" in d:
            row[f"head_{m}"] = d["head_accuracy"]
        if "probe_accuracy" in d:
            row[f"probe_{m}"] = d["probe_accuracy"]
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
        mod_cols = list(dict.fromkeys(k for r in sub for k in r if k.startswith("zero_out_")))
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
            secs = [r["train_seconds"] for r in rs if r.get("train_seconds") is not None]
            cells.append(f"{statistics.fmean(secs):.1f}" if secs else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------- plan
def run_folder(out: Path, dataset: str, method: str, seed: int) -> Path:
    return out / Path(dataset).stem / method / f"seed{seed}"


def tuned_tree(tuned_dir: Optional[str | Path], dataset: str, method: str) -> Optional[Dict[str, Any]]:
    """The tuned values ``mmbalance tune`` wrote for this dataset and method
    (``TUNED/<dataset>/<method>/best.yaml``), or None."""
    if not tuned_dir:
        return None
    path = Path(tuned_dir) / Path(dataset).stem / method / "best.yaml"
    return load_yaml(path) if path.is_file() else None


def run_state(run_dir: Path, cfg: Config) -> Tuple[str, str, Optional[Dict[str, Any]]]:
    """What a bench does with ``run_dir`` for ``cfg``: ``(action, reason, result or None)``."""
    if not (run_dir / "config.yaml").is_file():
        return "run", "new", None
    # the config the last bench asked for; else (a run trained otherwise) the trainer's own
    cfg_path = run_dir / X.BENCH_CONFIG
    if not cfg_path.is_file():
        cfg_path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(cfg_path.read_text())
        diff = config_differences(saved, cfg.to_dict(), ignore=BENCH_NEUTRAL_KEYS) if isinstance(saved, dict) else ["?"]
    except (OSError, yaml.YAMLError):
        diff = ["?"]
    if diff:
        shown = ", ".join(diff[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else "")
        return "run", f"config changed ({shown}): replaced", None
    res = _valid_result(run_dir / "result.json", cfg)
    if res is not None:
        return "reuse", "finished", res
    if (run_dir / "checkpoints" / "last.pt").is_file():
        done = _epochs_logged(run_dir / "metrics.jsonl")
        return "resume", f"stopped after {done} of {cfg.train.epochs} epochs", None
    return "run", "started, no checkpoint: replaced", None


def _valid_result(path: Path, cfg: Config) -> Optional[Dict[str, Any]]:
    try:
        res = json.loads(path.read_text())
        flatten_result(res)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if res.get("method") != cfg.method.name or res.get("seed") != cfg.train.seed or res.get("epochs") != cfg.train.epochs:
        return None
    return res


def _epochs_logged(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def plan_bench(datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
               epochs: Optional[int] = None, overrides: Sequence[str] = (), config_file: Optional[str] = None,
               tuned: Optional[str | Path] = None) -> List[PlannedRun]:
    """Resolve every configuration of the grid (all errors before any training) and decide, run
    folder by run folder, what to do: run, reuse or resume. Touches nothing."""
    if epochs is not None and epochs < 1:
        raise ConfigError(f"bench epochs must be >= 1, got {epochs}")
    if tuned and not Path(tuned).is_dir():
        raise ConfigError(f"--tuned {tuned}: no such folder (expected the --out of mmbalance tune)")
    out = Path(out_dir).resolve()  # absolute: Ray workers may start elsewhere
    if list(methods) in (["all"], []):
        methods = METHODS.names()
    plan: List[PlannedRun] = []
    for ds in datasets:
        for method in methods:
            tree = tuned_tree(tuned, ds, method)
            for seed in seeds:
                ov = list(overrides) + [f"train.seed={seed}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
                cfg = resolve_config(ds, method, config_file, ov, tree=tree)
                run_dir = run_folder(out, ds, method, seed)
                action, reason, res = run_state(run_dir, cfg)
                if tuned:
                    reason += ", tuned" if tree is not None else ", NOT tuned (no best.yaml)"
                plan.append(PlannedRun(ds, method, int(seed), cfg, run_dir, action, reason, res))
    return plan


def format_plan(plan: Sequence[PlannedRun], out_dir: str | Path, full: bool = True) -> str:
    """The plan's counts and one line per run (``full=False``: only the runs resumed or replaced;
    the reused and new ones show in the progress lines)."""
    counts = {a: sum(p.action == a for p in plan) for a in ACTIONS}
    lines = [f"plan: {len(plan)} runs in {out_dir}: {counts['run']} to do, {counts['resume']} to resume, "
             f"{counts['reuse']} to reuse"]
    shown = [p for p in plan if full or p.action == "resume" or (p.action == "run" and p.reason != "new")]
    w = max((len(p.label) for p in shown), default=0)
    lines += [f"  {_ACTION_WORDS[p.action]:<6}  {p.label:<{w}}  ({p.reason})" for p in shown]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- run
def run_bench(datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
              epochs: Optional[int] = None, overrides: Sequence[str] = (), config_file: Optional[str] = None,
              quiet: bool = True, log=print, jobs: Optional[int] = 1, executor: str = "local",
              address: Optional[str] = None, dry_run: bool = False,
              tuned: Optional[str | Path] = None) -> List[Dict[str, Any]]:
    """Run the grid; returns the rows of this grid in grid order (``dry_run``: prints the plan and
    returns ``[]``). ``jobs``: parallel local processes (None = :func:`executors.default_jobs`);
    ``executor``: ``local`` or ``ray`` (``address`` of the cluster, None = a local Ray instance).
    Failed runs are reported by their folder after the other results are written
    (:class:`BenchError`). ``quiet`` is kept for compatibility: runs never print their epochs here."""
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be 'local' or 'ray', got '{executor}'")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"-j/--jobs must be >= 1, got {jobs}")
    plan = plan_bench(datasets, methods, seeds, out_dir, epochs, overrides, config_file, tuned)
    out = Path(out_dir)
    todo = [p for p in plan if p.action != "reuse"]
    if executor == "ray":
        how = f"Ray ({address or 'local instance'})"
    else:
        devices = {p.cfg.train.device for p in todo}
        jobs = jobs or default_jobs_for(todo, devices)
        how = "this process" if jobs <= 1 else f"{jobs} processes x {X.threads_per_job(jobs)} threads"
    log(format_plan(plan, out, full=dry_run) + ("" if dry_run or not todo else f"\nrunning {len(todo)} in {how}"))
    if dry_run:
        return []
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    old_rows = read_rows(csv_path)
    rows: List[Optional[Dict[str, Any]]] = [None] * len(plan)
    failures: List[str] = []
    t0 = time.perf_counter()
    finished = 0

    def record(i: int, res: Dict[str, Any], note: str) -> None:
        nonlocal finished
        finished += 1
        rows[i] = flatten_result(res)
        p = plan[i]
        log(f"[{finished}/{len(plan)}] {p.label}: acc {res['test']['accuracy']:.4f} "
            f"({res['train_seconds']:.1f}s){note}")
        _write_csv(csv_path, merge_rows(old_rows, [r for r in rows if r is not None]))

    for i, p in enumerate(plan):
        if p.action == "reuse":
            record(i, p.result, " (finished earlier, reused)")

    def done(task: Dict[str, Any], outcome: Dict[str, Any]) -> None:
        nonlocal finished
        i = task["index"]
        if outcome["ok"]:
            note = " (resumed)" if task["action"] == "resume" else ""
            if outcome.get("warnings"):
                note += f" ({outcome['warnings']} distinct warnings: {plan[i].run_dir / X.WARNINGS_LOG})"
            record(i, outcome["result"], note)
        else:
            finished += 1
            where = outcome.get("log") or plan[i].run_dir
            failures.append(f"{plan[i].label}: {outcome['error']} (run folder {plan[i].run_dir}; details: {where})")
            log(f"[{finished}/{len(plan)}] {plan[i].label}: FAILED: {outcome['error']} (see {where})")

    tasks = [_task(i, p) for i, p in enumerate(plan) if p.action != "reuse"]
    if tasks:
        if executor == "ray":
            X.run_ray(tasks, done, address=address)
        else:
            X.run_local(tasks, jobs, done)
    new_rows = [r for r in rows if r is not None]
    all_rows = merge_rows(old_rows, new_rows)
    if all_rows:
        _write_csv(csv_path, all_rows)
        seeds_all = sorted({str(r["seed"]) for r in all_rows}, key=lambda s: (len(s), s))
        table = summarize(all_rows)
        (out / "results.md").write_text(f"# mmbalance bench\n\nTest-set metrics in %, mean ± std over seeds "
                                        f"{', '.join(seeds_all)}.\n\n{table}\n")
        log(table)
        try:
            from ..report import write_bench_report
            log(f"report: {write_bench_report(out)}")
        except Exception as exc:  # matplotlib is optional: the bench never fails over its pictures
            log(f"(no report.html: {exc})")
    if tasks:
        log(f"bench: {len(tasks)} runs in {time.perf_counter() - t0:.1f}s wall time ({how})")
    if failures:
        raise BenchError(f"{len(failures)} of {len(plan)} runs failed (the other results are in {csv_path}):\n  "
                         + "\n  ".join(failures))
    return new_rows


def default_jobs_for(todo: Sequence[PlannedRun], devices) -> int:
    return X.default_jobs(len(todo), "cuda" if any(str(d).startswith("cuda") for d in devices) else "cpu")


def _task(i: int, p: PlannedRun) -> Dict[str, Any]:
    t = p.cfg.train
    return {"index": i, "label": p.label, "config": p.cfg.to_dict(), "run_dir": str(p.run_dir), "action": p.action,
            "cpus": t.threads if t.threads > 0 else 1, "gpus": 1 if str(t.device).startswith("cuda") else 0}


# ----------------------------------------------------------------------------------- results.csv
def _key(row: Dict[str, Any]) -> Tuple[str, str, str]:
    return str(row["dataset"]), str(row["method"]), str(row["seed"])


def merge_rows(old: Sequence[Dict[str, Any]], new: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``old`` rows with those of the same dataset / method / seed replaced by ``new`` ones (in
    place), then the other ``new`` rows in their order."""
    fresh = {_key(r): r for r in new}
    merged = [fresh.pop(_key(r), r) for r in old]
    return merged + [r for r in new if _key(r) in fresh]


def _cell(v: str) -> Any:
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return v


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of an earlier ``results.csv`` (values parsed back), or [] when there is none."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as exc:
        raise MMBalanceError(f"cannot read the earlier results {path}: {exc}; move it away to start afresh") from None
    if rows and not {"dataset", "method", "seed", "accuracy"} <= set(rows[0]):
        raise MMBalanceError(f"{path} is not a bench results.csv (no dataset/method/seed/accuracy columns); "
                             f"move it away or use another --out")
    return [{k: _cell(v) for k, v in r.items() if k is not None} for r in rows]


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)

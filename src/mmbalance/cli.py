"""Command line: ``mmbalance train | bench | tune | prepare | methods | datasets | diagnose | report``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .errors import MMBalanceError


def _parse_list(s: Optional[str]) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def cmd_train(args) -> int:
    from .config import resolve_config
    from .training.trainer import Trainer, run_from_dir
    from . import distributed as D
    D.init_from_env()
    try:
        if args.resume:
            if args.out and Path(args.out) != Path(args.resume):
                raise MMBalanceError("--resume DIR continues the run in DIR; do not pass another --out")
            if args.dataset or args.method or args.config:
                raise MMBalanceError("--resume takes its dataset, method and config from the run folder; "
                                     "drop --dataset/--method/--config")
            res = run_from_dir(args.resume, quiet=args.quiet, overrides=args.overrides)
        else:
            if not args.out:
                raise MMBalanceError("--out DIR is required (or --resume DIR)")
            overrides = list(args.overrides)
            if args.data_root:
                overrides.append(f"data.root={args.data_root}")
            cfg = resolve_config(args.dataset, args.method, args.config, overrides)
            res = Trainer(cfg, args.out, quiet=args.quiet, overwrite=args.overwrite).fit()
        if D.rank() == 0:
            print(json.dumps({"test_accuracy": res["test"]["accuracy"], "test_macro_f1": res["test"]["macro_f1"],
                              "best_epoch": res["best_epoch"]}))
    finally:
        D.shutdown()
    return 0


def cmd_bench(args) -> int:
    from .bench.runner import QUICK_DATASETS, run_bench
    if args.epochs is not None and args.epochs < 1:
        raise MMBalanceError(f"--epochs must be >= 1, got {args.epochs}")
    datasets = _parse_list(args.datasets) or list(QUICK_DATASETS)
    methods = _parse_list(args.methods) or ["all"]
    seeds = [int(s) for s in _parse_list(args.seeds)] or [0, 1, 2]
    if args.address and args.executor != "ray":
        raise MMBalanceError("--address is the Ray cluster's address; pass it with --executor ray")
    run_bench(datasets, methods, seeds, args.out, epochs=args.epochs, overrides=args.overrides,
              config_file=args.config, quiet=True, jobs=args.jobs, executor=args.executor, address=args.address,
              dry_run=args.dry_run, tuned=args.tuned)
    if not args.dry_run:
        print(f"\nresults: {Path(args.out) / 'results.csv'}, {Path(args.out) / 'results.md'} and {Path(args.out) / 'report.html'}")
    return 0


def cmd_tune(args) -> int:
    from .bench.tune import tune
    datasets, methods = _parse_list(args.dataset), _parse_list(args.method)
    if not datasets or not methods:
        raise MMBalanceError("tune needs --dataset and --method (comma-separated lists allowed)")
    for ds in datasets:
        for method in methods:
            tune(ds, method, trials=args.trials, out_dir=args.out, metric=args.metric, epochs=args.epochs,
                 overrides=args.overrides, config_file=args.config, seed=args.seed)
    return 0


def _options_lines(cls) -> List[str]:
    """``name = default  # comment`` for every field of an options dataclass (comments read from
    its source, where the project keeps each option's one-line doc)."""
    import dataclasses
    import inspect
    import re
    if cls is None or not dataclasses.is_dataclass(cls):
        return ["  (no options)"]
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        src = ""
    notes = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, re.M)}
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        note = f"  # {notes[f.name]}" if f.name in notes else ""
        out.append(f"  {f.name} = {default!r}{note}")
    return out or ["  (no options)"]


def _doc(obj) -> str:
    import inspect
    return inspect.cleandoc(inspect.getmodule(obj).__doc__ or obj.__doc__ or "")


def cmd_methods(args) -> int:
    from .methods import METHODS
    if args.name:
        e = METHODS.entry(args.name)
        cls = e.obj
        print(f"{e.name}: {e.description}\npaper: {e.meta['paper']}\nkind: {e.meta['kind']}, "
              f"modalities {e.meta['modalities']}")
        presets = getattr(cls, "presets", {}) or {}
        if presets:
            print("presets: " + "; ".join(f"{ds}: {p.get('method', p)}" for ds, p in presets.items()))
        print("options (method.<name>=value):")
        print("\n".join(_options_lines(cls.Options)))
        space = getattr(cls.Options, "tune_space", None) or {}
        print("tune ranges (mmbalance tune; plus optim.lr): " + (", ".join(f"{k} {v}" for k, v in space.items())
                                                               if space else "none declared"))
        print("\n" + _doc(cls))
        return 0
    w = max(len(n) for n in METHODS.names())
    for name, e in METHODS:
        print(f"{name:<{w}}  [{e.meta['kind']}, modalities {e.meta['modalities']}] {e.description} ({e.meta['paper']})")
    return 0


def cmd_datasets(args) -> int:
    from .data import DATASETS
    from .data import datasets  # noqa: F401
    if args.name:
        e = DATASETS.entry(args.name)
        print(f"{e.name}: {e.description}")
        if e.meta.get("modalities"):
            print(f"modalities: {', '.join(e.meta['modalities'])}")
        if e.meta.get("presets"):
            print(f"presets: {e.meta['presets']}")
        print("options (data.<name>=value):")
        print("\n".join(_options_lines(e.meta.get("options"))))
        print("\n" + _doc(e.obj))
        return 0
    w = max(len(n) for n in DATASETS.names())
    for name, e in DATASETS:
        print(f"{name:<{w}}  {e.description}")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import PrepareOptions, prepare
    rep = prepare(PrepareOptions(
        dataset=args.dataset, src=args.src, dst=args.dst, workers=args.workers, fps=args.fps,
        sample_rate=args.sample_rate, labels=args.labels, splits=args.splits, test_fraction=args.test_fraction,
        seed=args.seed, backend=args.backend, audio=not args.no_audio, short_side=args.short_side,
        jpeg_quality=args.jpeg_quality, progress=not args.quiet))
    print(json.dumps({"done": rep["done"], "processed": rep["processed"],
                      "skipped_already_done": rep["skipped_already_done"], "failed": len(rep["failed"]),
                      "no_audio": len(rep["no_audio"]), "splits": rep["splits"],
                      "report": str(Path(args.dst) / "report.json")}))
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    print(f"report: {write_report(args.dir)}")
    return 0


def cmd_diagnose(args) -> int:
    from .diagnostics import diagnose_run
    res = diagnose_run(args.run_dir, split=args.split, references=args.reference or (), level=args.level)
    for m in res["modalities"]:
        print(res["verdicts"][m])
    print(f"diagnostics: {Path(args.run_dir) / 'diagnostics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmbalance", description="Balanced multimodal learning: methods, trainer, benchmark.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one method on one dataset")
    t.add_argument("--dataset", help="registered dataset name or path/to/file.npz")
    t.add_argument("--method", help="registered method name (see `mmbalance methods`)")
    t.add_argument("--config", help="YAML file with config sections (data, model, optim, schedule, train, method)")
    t.add_argument("--data-root", help="shortcut for data.root=DIR")
    t.add_argument("--out", help="output folder")
    t.add_argument("--resume", metavar="DIR", help="continue the stopped run in DIR (overrides: only epochs, "
                   "early_stopping and logging keys may change)")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("overrides", nargs="*", help="dotted overrides: method.alpha=0.5 optim.lr=1e-3 epochs=5 seed=1")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("bench", help="run a dataset x method x seed grid (no arguments: the quick preset)")
    b.add_argument("--datasets", help="comma-separated datasets (default: synthetic)")
    b.add_argument("--methods", help="comma-separated methods or 'all' (default: all)")
    b.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2)")
    b.add_argument("--epochs", type=int, help="epochs for every run (default: each dataset's preset)")
    b.add_argument("--config", help="YAML applied to every run")
    b.add_argument("--out", default="runs/bench", help="output folder (default runs/bench); a second bench into "
                   "it reuses finished runs, resumes stopped ones and adds its rows to results.csv")
    b.add_argument("-j", "--jobs", type=int, help="runs at once in separate processes, torch threads split "
                   "between them (default: one per core, at most 8 and at most the runs to do; 1 on CUDA)")
    b.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="local processes (default) or one Ray task per run (pip install 'mmbalance[ray]')")
    b.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001; default: a local Ray)")
    b.add_argument("--tuned", metavar="DIR", help="take each method's tuned values from DIR/<dataset>/<method>/"
                   "best.yaml (the --out of mmbalance tune)")
    b.add_argument("--dry-run", action="store_true", help="print the plan (to do / resume / reuse); train nothing")
    b.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    b.set_defaults(func=cmd_bench)
    tu = sub.add_parser("tune", help="search a method's declared hyper-parameter ranges on the val split "
                        "(Optuna TPE; pip install 'mmbalance[tune]')")
    tu.add_argument("--dataset", required=True, help="dataset (comma-separated: each in turn)")
    tu.add_argument("--method", required=True, help="method (comma-separated: each gets the same --trials)")
    tu.add_argument("--trials", type=int, default=20, help="trials per dataset x method (default 20)")
    tu.add_argument("--metric", default="val_accuracy", choices=("val_accuracy", "val_macro_f1"))
    tu.add_argument("--epochs", type=int, help="epochs per trial (default: the dataset's preset)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    tu.add_argument("--config", help="YAML applied to every trial")
    tu.add_argument("--out", default="runs/tune", help="writes OUT/<dataset>/<method>/best.yaml and trials.csv "
                    "(default runs/tune)")
    tu.add_argument("overrides", nargs="*", help="dotted overrides applied to every trial (keys set here are "
                    "not tuned)")
    tu.set_defaults(func=cmd_tune)
    r = sub.add_parser("prepare", help="raw videos -> 1 fps JPEG frames + mono WAV + split files",
                       description="Extract frames and audio from raw videos into the layout the loaders read "
                                   "(see mmbalance.data.prepare). Resumable; failed clips go to DST/failed.txt.")
    r.add_argument("dataset", help="cremad | kinetics_sounds | ave | vggsound | ucf101 | generic")
    r.add_argument("--src", required=True, help="folder of raw videos (CREMA-D: the dataset root with VideoFlash/, AudioWAV/)")
    r.add_argument("--dst", required=True, help="output folder")
    r.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    r.add_argument("--fps", type=float, default=1.0, help="frames per second kept (default 1)")
    r.add_argument("--sample-rate", type=int, default=16000, help="WAV sample rate (default 16000)")
    r.add_argument("--labels", help="csv clip,label[,split] (default: the folder holding each video)")
    r.add_argument("--splits", help="CREMA-D: folder with train.csv/test.csv to keep (default: seeded split)")
    r.add_argument("--test-fraction", type=float, default=0.1, help="test share of the seeded split (default 0.1)")
    r.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    r.add_argument("--backend", default="auto", choices=("auto", "pyav", "ffmpeg"))
    r.add_argument("--no-audio", action="store_true", help="frames only")
    r.add_argument("--short-side", type=int, default=0, help="resize frames to this short side (0 = keep)")
    r.add_argument("--jpeg-quality", type=int, default=95)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_prepare)
    m = sub.add_parser("methods", help="list registered methods; with a NAME: its paper, options and notes")
    m.add_argument("name", nargs="?")
    m.set_defaults(func=cmd_methods)
    d = sub.add_parser("datasets", help="list registered datasets; with a NAME: its options and notes")
    d.add_argument("name", nargs="?")
    d.set_defaults(func=cmd_datasets)
    g = sub.add_parser("diagnose", help="is each modality used? probes, Shapley values, CUR, modality gap of a "
                       "run's best checkpoint -> RUN_DIR/diagnostics.json")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    g.add_argument("--split", default="test", choices=("test", "val"))
    g.add_argument("--reference", action="append", metavar="DIR",
                   help="a unimodal run of one modality on the same dataset (repeatable); its accuracy is the "
                        "modality's standalone reference, and with one per modality their averaged "
                        "probabilities are the ensemble the fused model is compared with")
    g.add_argument("--level", default="feature", choices=("feature", "input"),
                   help="remove modalities at their features (default) or their inputs")
    g.set_defaults(func=cmd_diagnose)
    rp = sub.add_parser("report", help="report.html (+ PNGs) for a run folder or a bench folder")
    rp.add_argument("dir", help="run folder (result.json + metrics.jsonl) or bench folder (results.csv)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere among the options (argparse only takes one run of them)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except MMBalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mmbalance methods | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mmbalance tune``: an equal hyper-parameter search budget for every method (the ``tune`` extra,
Optuna).

Each trial trains one run on the train split and is scored on the **val** split (the result's val
metric, i.e. at the run's best-val checkpoint; test metrics are never read). The sampler is
Optuna's TPE, seeded (``--seed``), so a search is reproducible on CPU. Every method gets the same
number of trials and epochs per trial.

The search space of a method is what its ``Options`` dataclass declares in ``tune_space`` (see
:mod:`mmbalance.methods.base`), each key an option name and each value one of

* ``("log", low, high)`` -- a float, log-uniform in [low, high];
* ``("float", low, high)`` -- a float, uniform;
* ``("int", low, high)`` -- an integer, uniform, both ends included;
* ``("choice", [a, b, ...])`` -- one of the listed values;

plus ``optim.lr`` for every method, log-uniform over [lr / 10, 10 lr] around the resolved
dataset / method preset. Keys fixed by the user (``--config`` or ``key=value``) are not searched.

Output in ``OUT/<dataset>/<method>/``: ``trials.csv`` (one row per trial: the metric, the sampled
values, best epoch, train seconds, state), ``best.yaml`` (the best trial's values as config
sections: ``bench --tuned OUT`` or ``train --config best.yaml`` takes them) and ``trials/trial_<k>``
(each trial's run folder without its checkpoints).

**Resumable.** ``search.yaml`` records what defines the search (dataset, method, metric, seed,
epochs, overrides, config file, space) and ``trials.jsonl`` every finished trial. Run the same
command again, with the same or a larger ``--trials``, and the finished trials are replayed
through the seeded sampler (each replayed suggestion must equal the recorded one) before the
search goes on: a search stopped after k trials and resumed is the same search as an
uninterrupted one. A different search into the same folder is refused, naming what differs.
Trials run one after another (a parallel TPE search would not be reproducible).
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..config import Config, flatten_tree, load_yaml, overrides_to_dict, resolve_config, set_dotted
from ..errors import ConfigError, MMBalanceError

#: optim.lr is searched log-uniformly over [lr * LR_FACTORS[0], lr * LR_FACTORS[1]] for every method
LR_FACTORS = (0.1, 10.0)
METRICS = {"val_accuracy": "accuracy", "val_macro_f1": "macro_f1"}
KINDS = ("log", "float", "int", "choice")


def declared_space(method_cls) -> Dict[str, Tuple]:
    """``Options.tune_space`` of a method class (``{}`` when it declares none)."""
    space = getattr(getattr(method_cls, "Options", None), "tune_space", None) or {}
    return dict(space() if callable(space) else space)


def space_errors(method_cls) -> List[str]:
    """What is wrong with a method's declared ``tune_space`` (empty when it is usable)."""
    import dataclasses
    opts = method_cls.Options
    fields = {f.name for f in dataclasses.fields(opts)} if dataclasses.is_dataclass(opts) else set()
    errs = []
    for key, spec in declared_space(method_cls).items():
        if key not in fields:
            errs.append(f"tune_space key '{key}' is not an option of {opts.__name__}")
            continue
        if not isinstance(spec, (tuple, list)) or not spec or spec[0] not in KINDS:
            errs.append(f"tune_space['{key}'] = {spec!r}: expected (kind, ...) with kind in {KINDS}")
            continue
        kind = spec[0]
        if kind == "choice":
            if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or len(spec[1]) < 2:
                errs.append(f"tune_space['{key}'] = {spec!r}: expected ('choice', [a, b, ...])")
            continue
        if len(spec) != 3 or not all(isinstance(x, (int, float)) for x in spec[1:]) or not spec[1] < spec[2]:
            errs.append(f"tune_space['{key}'] = {spec!r}: expected ('{kind}', low, high) with low < high")
        elif kind == "log" and spec[1] <= 0:
            errs.append(f"tune_space['{key}'] = {spec!r}: a log range needs low > 0")
        elif kind == "int" and not all(isinstance(x, int) for x in spec[1:]):
            errs.append(f"tune_space['{key}'] = {spec!r}: an int range needs integer ends")
    return errs


def search_space(cfg: Config, fixed: Sequence[str] = ()) -> Dict[str, Tuple]:
    """Dotted config key -> range for this config's method: its declared options and optim.lr,
    minus the ``fixed`` keys."""
    from ..methods import METHODS
    cls = METHODS.get(cfg.method.name)
    errs = space_errors(cls)
    if errs:
        raise ConfigError(f"method '{cfg.method.name}' declares an unusable tune_space: " + "; ".join(errs))
    space = {f"method.{k}": tuple(v) for k, v in declared_space(cls).items()}
    lr = float(cfg.optim.lr)
    space["optim.lr"] = ("log", lr * LR_FACTORS[0], lr * LR_FACTORS[1])
    return {k: v for k, v in space.items() if k not in set(fixed)}


def _suggest(trial, key: str, spec: Tuple) -> Any:
    kind = spec[0]
    if kind == "log":
        return trial.suggest_float(key, float(spec[1]), float(spec[2]), log=True)
    if kind == "float":
        return trial.suggest_float(key, float(spec[1]), float(spec[2]))
    if kind == "int":
        return trial.suggest_int(key, int(spec[1]), int(spec[2]))
    return trial.suggest_categorical(key, list(spec[1]))


def tune(dataset: str, method: str, trials: int, out_dir: str | Path = "runs/tune", metric: str = "val_accuracy",
         epochs: Optional[int] = None, overrides: Sequence[str] = (), config_file: Optional[str] = None,
         seed: int = 0, log=print) -> Dict[str, Any]:
    """Run ``trials`` trials; returns ``{"best": values, "value": metric, "dir": folder}``."""
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
    try:
        import optuna
    except ImportError:
        raise MMBalanceError("mmbalance tune needs Optuna: pip install 'mmbalance[tune]' (or pip install optuna)") from None
    from ..training.trainer import Trainer

    ov = list(overrides) + ([f"train.epochs={epochs}"] if epochs is not None else [])
    base = resolve_config(dataset, method, config_file, ov)  # every config error before any training
    fixed = set(flatten_tree(overrides_to_dict(ov)))
    if config_file:
        fixed |= set(flatten_tree(load_yaml(config_file)))
    space = search_space(base, fixed)
    out = Path(out_dir) / Path(dataset).stem / method
    out.mkdir(parents=True, exist_ok=True)
    search = {"dataset": str(dataset), "method": method, "metric": metric, "seed": int(seed),
              "epochs": int(base.train.epochs), "overrides": list(overrides), "config": config_file,
              "space": {k: list(v) for k, v in space.items()}}
    done_before = _finished_trials(out, search)
    if len(done_before) > trials:
        raise ConfigError(f"'{out}' already holds {len(done_before)} trials of this search; --trials {trials} "
                          f"is fewer (ask for at least {len(done_before)})")
    (out / "search.yaml").write_text(yaml.safe_dump(search, sort_keys=False))
    log(f"tune {Path(dataset).stem}/{method}: {trials} trials x {base.train.epochs} epochs, {metric} on val, "
        f"TPE seed {seed}; space: " + ", ".join(f"{k} {v}" for k, v in space.items()))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rows: List[Dict[str, Any]] = []
    if done_before:
        log(f"  resuming: {len(done_before)} finished trial(s) replayed from {out / 'trials.jsonl'}")
    for k in range(trials):
        trial = study.ask()
        values = {key: _suggest(trial, key, spec) for key, spec in space.items()}
        if k < len(done_before):  # replay: same suggestion, the recorded outcome
            row = done_before[k]
            if {key: row.get(key) for key in values} != values:
                raise MMBalanceError(f"'{out}': replaying trial {k} suggested {values}, but trials.jsonl "
                                     f"recorded {({key: row.get(key) for key in values})}; the search cannot "
                                     f"be resumed (optuna version changed?): use a new --out")
            if row["state"] == "complete":
                study.tell(trial, float(row[metric]))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append(row)
            continue
        run_dir = out / "trials" / f"trial_{k:03d}"
        row: Dict[str, Any] = {"trial": k, metric: None, **values}
        try:
            cfg = resolve_config(dataset, method, config_file, ov, tree=set_dotted({}, values))
            res = Trainer(cfg, run_dir, quiet=True, overwrite=True).fit()
            value = float(res["val"][METRICS[metric]])
            if not math.isfinite(value):
                raise MMBalanceError(f"{metric} is {value}")
            study.tell(trial, value)
            row.update({metric: value, "best_epoch": res["best_epoch"], "train_seconds": res["train_seconds"],
                        "state": "complete", "error": ""})
            log(f"  trial {k + 1}/{trials}: {metric} {value:.4f}  " + ", ".join(f"{a}={_fmt(b)}" for a, b in values.items()))
        except Exception as exc:  # a diverging or invalid trial is a failed trial, not a failed search
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            row.update({"state": "failed", "error": f"{type(exc).__name__}: {exc}"})
            log(f"  trial {k + 1}/{trials}: FAILED ({type(exc).__name__}: {exc})")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        rows.append(row)
        _write_trials(out / "trials.csv", rows)
        with open(out / "trials.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise MMBalanceError(f"tune {dataset}/{method}: all {trials} trials failed (see {out / 'trials.csv'})")
    best = study.best_trial
    header = (f"# mmbalance tune: dataset {dataset}, method {method}, {len(done)}/{trials} trials, "
              f"{base.train.epochs} epochs each, TPE seed {seed}\n# best {metric} {best.value:.6f} (trial {best.number})\n")
    (out / "best.yaml").write_text(header + yaml.safe_dump(set_dotted({}, best.params), sort_keys=False))
    log(f"best {metric} {best.value:.4f}: " + ", ".join(f"{a}={_fmt(b)}" for a, b in best.params.items())
        + f" -> {out / 'best.yaml'}")
    return {"best": dict(best.params), "value": best.value, "dir": out}


def _finished_trials(out: Path, search: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The recorded trials of the same search in ``out`` (``[]`` for a new folder); a different
    search there is a ConfigError naming the differing keys."""
    spath, tpath = out / "search.yaml", out / "trials.jsonl"
    if not spath.is_file():
        if tpath.exists():
            raise ConfigError(f"'{out}' holds trials.jsonl but no search.yaml; use a new --out")
        return []
    saved = yaml.safe_load(spath.read_text()) or {}
    diff = sorted(k for k in set(saved) | set(search) if saved.get(k) != search.get(k))
    if diff:
        raise ConfigError(f"'{out}' holds another search (different {', '.join(diff)}); use a new --out or "
                          f"the same settings to resume it")
    if not tpath.is_file():
        return []
    rows = [json.loads(line) for line in tpath.read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if r.get("trial") != i:
            raise ConfigError(f"'{tpath}' line {i + 1} is trial {r.get('trial')}, expected {i}")
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_trials(path: Path, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


__all__ = ["KINDS", "LR_FACTORS", "declared_space", "search_space", "space_errors", "tune"]

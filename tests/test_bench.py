"""The bench at scale: run folders as units (reuse, resume, changed config), results.csv that
grows, --dry-run, parallel processes (-j), failures reported by run folder, the Ray executor and
``mmbalance tune``. Tiny synthetic runs throughout (a second each)."""
import csv
import json

import pytest
import yaml

from mmbalance.bench.runner import BenchError, merge_rows, plan_bench, run_bench
from mmbalance.cli import main
from mmbalance.errors import ConfigError

TINY = ["data.n_train=120", "data.n_val=40", "data.n_test=40", "train.threads=1", "train.progress=off"]
#: columns that measure the machine (they differ between two runs of the same config)
TIMING = ("train_seconds",)


def bench(out, methods=("joint",), seeds=(0,), epochs=1, extra=(), **kw):
    lines = []
    kw.setdefault("jobs", 1)
    rows = run_bench(["synthetic"], list(methods), list(seeds), out, epochs=epochs, overrides=TINY + list(extra),
                     log=lines.append, **kw)
    return rows, "\n".join(str(x) for x in lines)


def csv_rows(path, drop=TIMING):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def test_second_bench_reuses_finished_runs(tmp_path):
    out = tmp_path / "b"
    rows1, _ = bench(out, seeds=(0, 1))
    res = out / "synthetic" / "joint" / "seed0" / "result.json"
    stamp = res.stat().st_mtime_ns
    rows2, log = bench(out, seeds=(0, 1))
    assert "2 to do" not in log and "0 to do, 0 to resume, 2 to reuse" in log
    assert log.count("(finished earlier, reused)") == 2
    assert res.stat().st_mtime_ns == stamp  # not trained again
    assert rows2 == rows1
    assert len(csv_rows(out / "results.csv")) == 2


def test_changed_config_is_a_new_run_and_replaces_its_row(tmp_path):
    out = tmp_path / "b"
    bench(out, methods=("joint", "multiloss"))
    (out / "synthetic" / "joint" / "seed0" / "diagnostics.json").write_text("{}")  # stale derived file
    before = csv_rows(out / "results.csv")
    rows, log = bench(out, methods=("joint",), extra=["optim.lr=0.02"])
    assert "to do   synthetic/joint/seed0  (config changed (optim.lr): replaced)" in log
    run = out / "synthetic" / "joint" / "seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.02
    assert not (run / "diagnostics.json").exists()  # the folder was replaced, not patched
    after = csv_rows(out / "results.csv")
    assert [(r["method"], r["seed"]) for r in after] == [("joint", "0"), ("multiloss", "0")]  # replaced in place
    assert after[1] == before[1]  # the other run's row is kept as it was
    assert float(after[0]["accuracy"]) == pytest.approx(rows[0]["accuracy"])


def test_rows_are_added_and_results_md_covers_all(tmp_path):
    out = tmp_path / "b"
    bench(out, methods=("joint",), seeds=(0,))
    bench(out, methods=("multiloss",), seeds=(1,))
    bench(out, methods=("joint",), seeds=(1,))
    rows = csv_rows(out / "results.csv")
    assert [(r["method"], r["seed"]) for r in rows] == [("joint", "0"), ("multiloss", "1"), ("joint", "1")]
    md = (out / "results.md").read_text()
    assert "| joint | 2 |" in md and "| multiloss | 1 |" in md and "seeds 0, 1." in md


def test_merge_rows_replaces_in_place_and_appends_in_order():
    old = [{"dataset": "d", "method": "a", "seed": 0, "accuracy": 0.1},
           {"dataset": "d", "method": "b", "seed": 0, "accuracy": 0.2}]
    new = [{"dataset": "d", "method": "c", "seed": 0, "accuracy": 0.5},
           {"dataset": "d", "method": "a", "seed": 0, "accuracy": 0.9}]
    assert [(r["method"], r["accuracy"]) for r in merge_rows(old, new)] == [("a", 0.9), ("b", 0.2), ("c", 0.5)]


def test_half_finished_run_is_resumed_exactly_and_dry_run_plans(tmp_path, monkeypatch, capsys):
    from mmbalance.training.trainer import Trainer
    out, ref = tmp_path / "b", tmp_path / "ref"
    bench(ref, methods=("multiloss",), epochs=2)  # uninterrupted reference
    bench(out, methods=("joint",), epochs=2)  # a finished run to reuse
    real = Trainer.train_epoch

    def killed_in_epoch_1(self, epoch):
        if epoch == 1:
            raise RuntimeError("killed")
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", killed_in_epoch_1)
    with pytest.raises(BenchError, match="multiloss/seed0: RuntimeError: killed"):
        bench(out, methods=("multiloss",), epochs=2)
    monkeypatch.setattr(Trainer, "train_epoch", real)
    run = out / "synthetic" / "multiloss" / "seed0"
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "result.json").exists()
    assert "RuntimeError: killed" in (run / "error.log").read_text()

    # --dry-run: the plan, nothing trained or written
    csv_before = (out / "results.csv").read_text()
    assert main(["bench", "--dry-run", "--out", str(out), "--methods", "joint,multiloss,mm", "--seeds", "0",
                 "--epochs", "2"] + TINY) == 0
    text = capsys.readouterr().out
    assert "plan: 3 runs" in text and "1 to do, 1 to resume, 1 to reuse" in text
    assert "reuse   synthetic/joint/seed0" in text
    assert "resume  synthetic/multiloss/seed0  (stopped after 1 of 2 epochs)" in text
    assert "to do   synthetic/mm/seed0" in text
    assert not (out / "synthetic" / "mm").exists() and (out / "results.csv").read_text() == csv_before

    rows, log = bench(out, methods=("multiloss",), epochs=2)
    assert "(resumed)" in log and not (run / "error.log").exists()
    want = json.loads((ref / "synthetic" / "multiloss" / "seed0" / "result.json").read_text())
    got = json.loads((run / "result.json").read_text())
    for k in ("test", "val", "best_epoch", "samples_seen"):
        assert got[k] == want[k], k
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ref_metrics = [json.loads(l) for l in (ref / "synthetic" / "multiloss" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and metrics == ref_metrics
    assert [(r["method"], r["seed"]) for r in csv_rows(out / "results.csv")] == [("joint", "0"), ("multiloss", "0")]


def test_parallel_rows_equal_serial_rows(tmp_path):
    grid = dict(methods=("joint", "ogm_ge"), seeds=(0, 1), epochs=2)
    bench(tmp_path / "j1", jobs=1, **grid)
    _, log = bench(tmp_path / "j2", jobs=2, **grid)
    assert "running 4 in 2 processes x 1 threads" in log
    serial, parallel = csv_rows(tmp_path / "j1" / "results.csv"), csv_rows(tmp_path / "j2" / "results.csv")
    assert [(r["method"], r["seed"]) for r in parallel] == [("joint", "0"), ("joint", "1"), ("ogm_ge", "0"), ("ogm_ge", "1")]
    assert parallel == serial


def test_a_failing_run_in_parallel_is_reported_by_folder_and_others_kept(tmp_path):
    out = tmp_path / "b"
    lines = []
    with pytest.raises(BenchError) as err:  # mcr refuses model.fusion=sum when its model is built (in the worker)
        run_bench(["synthetic"], ["joint", "mcr"], [0], out, epochs=1, overrides=TINY + ["model.fusion=sum"], jobs=2,
                  log=lines.append)
    run = out / "synthetic" / "mcr" / "seed0"
    msg = str(err.value)
    assert "1 of 2 runs failed" in msg and "synthetic/mcr/seed0: MethodSetupError" in msg and str(run) in msg
    assert (run / "error.log").is_file() and "Traceback" in (run / "error.log").read_text()
    assert any("synthetic/mcr/seed0: FAILED" in str(l) for l in lines)
    rows = csv_rows(out / "results.csv")
    assert [(r["dataset"], r["method"]) for r in rows] == [("synthetic", "joint")]  # the other result is kept
    assert (out / "results.md").is_file()


def test_bench_rejects_bad_parallel_options(tmp_path, capsys):
    with pytest.raises(ConfigError, match="jobs"):
        bench(tmp_path, jobs=0)
    with pytest.raises(ConfigError, match="executor"):
        bench(tmp_path, executor="slurm")
    assert main(["bench", "--out", str(tmp_path), "--address", "auto", "--dry-run"]) == 2
    assert "--executor ray" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tuned"):
        plan_bench(["synthetic"], ["joint"], [0], tmp_path, tuned=tmp_path / "nope")


def test_ray_executor_runs_a_grid_on_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'mmbalance[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        _, log = bench(out, seeds=(0, 1), executor="ray", jobs=None)
        assert "running 2 in Ray (local instance)" in log
        rows = csv_rows(out / "results.csv")
        assert [(r["method"], r["seed"]) for r in rows] == [("joint", "0"), ("joint", "1")]
        _, log = bench(out, seeds=(0, 1), executor="ray", jobs=None)  # resumable: all reused
        assert "0 to do, 0 to resume, 2 to reuse" in log
    finally:
        ray.shutdown()
    bench(tmp_path / "local", seeds=(0, 1))
    assert csv_rows(tmp_path / "local" / "results.csv") == rows


def test_every_declared_tune_space_is_valid():
    from mmbalance.bench.tune import declared_space, space_errors
    from mmbalance.methods import METHODS
    for name, e in METHODS:
        assert space_errors(e.obj) == [], name
    for name in ("mm", "bmm", "midas", "gmm_adaptive", "arm", "mcr", "ogm_ge", "pmr", "agm"):
        assert declared_space(METHODS.get(name)), name

    class Bad:
        from dataclasses import dataclass

        @dataclass
        class Options:
            alpha: float = 1.0
            tune_space = {"alpha": ("log", 0.0, 1.0), "beta": ("float", 0, 1), "gamma": ("grid", 1)}
    errs = space_errors(Bad)
    assert any("log range needs low > 0" in e for e in errs)
    assert any("'beta' is not an option" in e for e in errs)
    assert any("'gamma'" in e for e in errs)


def test_search_space_adds_lr_and_skips_user_fixed_keys():
    from mmbalance.bench.tune import search_space
    from mmbalance.config import resolve_config
    cfg = resolve_config("synthetic", "ogm_ge", None, ["optim.lr=0.01"])
    assert search_space(cfg) == {"method.alpha": ("log", 0.05, 2.0), "optim.lr": ("log", pytest.approx(1e-3), pytest.approx(0.1))}
    assert list(search_space(cfg, fixed=["method.alpha"])) == ["optim.lr"]
    assert list(search_space(resolve_config("synthetic", "joint", None, []))) == ["optim.lr"]


def test_tune_three_trials_then_bench_takes_the_tuned_values(tmp_path, capsys):
    pytest.importorskip("optuna", reason="the tune extra is not installed (pip install 'mmbalance[tune]')")
    out = tmp_path / "tune"
    assert main(["tune", "--dataset", "synthetic", "--method", "ogm_ge", "--trials", "3", "--epochs", "1",
                 "--out", str(out)] + TINY) == 0
    d = out / "synthetic" / "ogm_ge"
    trials = csv_rows(d / "trials.csv", drop=())
    assert len(trials) == 3 and all(t["state"] == "complete" for t in trials)
    assert all(0.05 <= float(t["method.alpha"]) <= 2.0 for t in trials)
    assert len({t["method.alpha"] for t in trials}) == 3  # three different samples
    best = yaml.safe_load((d / "best.yaml").read_text())
    top = max(float(t["val_accuracy"]) for t in trials)
    assert any(best["method"]["alpha"] == pytest.approx(float(t["method.alpha"])) and
               best["optim"]["lr"] == pytest.approx(float(t["optim.lr"]))
               for t in trials if float(t["val_accuracy"]) == top)  # (ties: any of the best)
    assert not (d / "trials" / "trial_000" / "checkpoints").exists()
    assert "best val_accuracy" in capsys.readouterr().out
    # bench --tuned: ogm_ge takes the values, joint (not tuned) is flagged in the plan
    plan = plan_bench(["synthetic"], ["ogm_ge", "joint"], [0], tmp_path / "b", epochs=1, overrides=TINY, tuned=out)
    assert plan[0].cfg.method_options.alpha == pytest.approx(best["method"]["alpha"])
    assert plan[0].cfg.optim.lr == pytest.approx(best["optim"]["lr"])
    assert "tuned" in plan[0].reason and "NOT tuned" in plan[1].reason
    # the same seed samples the same values (TPE is seeded)
    from mmbalance.bench.tune import tune
    res = tune("synthetic", "ogm_ge", trials=1, out_dir=tmp_path / "again", epochs=1, overrides=TINY, log=lambda *_: None)
    again = csv_rows(tmp_path / "again" / "synthetic" / "ogm_ge" / "trials.csv", drop=())
    assert again[0]["method.alpha"] == trials[0]["method.alpha"] and res["value"] == pytest.approx(float(trials[0]["val_accuracy"]))


def test_default_jobs_thread_split_and_ray_requests(monkeypatch, tmp_path):
    from mmbalance.bench import executors as X
    from mmbalance.bench.runner import _task
    monkeypatch.setattr(X, "usable_cores", lambda: 16)
    assert [X.default_jobs(n) for n in (100, 3, 0)] == [8, 3, 1]
    assert X.default_jobs(100, "cuda") == 1
    assert [X.threads_per_job(j) for j in (1, 2, 8, 32)] == [16, 8, 2, 1]
    plan = plan_bench(["synthetic"], ["joint"], [0], tmp_path, overrides=["train.threads=4", "train.device=cuda"])
    t = _task(0, plan[0])
    assert (t["cpus"], t["gpus"], t["action"]) == (4, 1, "run")
    plan = plan_bench(["synthetic"], ["joint"], [0], tmp_path, overrides=["train.device=cpu"])
    assert (_task(0, plan[0])["cpus"], _task(0, plan[0])["gpus"]) == (1, 0)


def test_warnings_of_a_run_go_to_its_folder(tmp_path, monkeypatch):
    import warnings

    from mmbalance.training.trainer import Trainer
    real = Trainer.train_epoch

    def noisy(self, epoch):
        warnings.warn("something odd", UserWarning)
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", noisy)
    _, log = bench(tmp_path, epochs=2)
    path = tmp_path / "synthetic" / "joint" / "seed0" / "warnings.log"
    assert "UserWarning: something odd" in path.read_text()
    assert f"distinct warnings: {path}" in log


def test_tune_resumes_the_same_search_and_refuses_another(tmp_path):
    """2 trials, then the same command with --trials 3: the 2 finished trials are replayed (not
    retrained) and the third equals the third of an uninterrupted 3-trial search."""
    pytest.importorskip("optuna", reason="the tune extra is not installed (pip install 'mmbalance[tune]')")
    from mmbalance.bench.tune import tune
    quiet = dict(epochs=1, overrides=TINY, log=lambda *_: None)
    full = tune("synthetic", "ogm_ge", trials=3, out_dir=tmp_path / "full", **quiet)
    tune("synthetic", "ogm_ge", trials=2, out_dir=tmp_path / "part", **quiet)
    d = tmp_path / "part" / "synthetic" / "ogm_ge"
    marker = d / "trials" / "trial_000" / "result.json"
    mtime = marker.stat().st_mtime_ns
    resumed = tune("synthetic", "ogm_ge", trials=3, out_dir=tmp_path / "part", **quiet)
    assert marker.stat().st_mtime_ns == mtime  # trial 0 was replayed, not trained again
    a = csv_rows(tmp_path / "full" / "synthetic" / "ogm_ge" / "trials.csv", drop=("train_seconds",))
    b = csv_rows(d / "trials.csv", drop=("train_seconds",))
    assert a == b and resumed["best"] == full["best"] and resumed["value"] == full["value"]
    with pytest.raises(ConfigError, match="another search .*seed"):
        tune("synthetic", "ogm_ge", trials=3, out_dir=tmp_path / "part", seed=1, **quiet)
    with pytest.raises(ConfigError, match="already holds 3 trials"):
        tune("synthetic", "ogm_ge", trials=2, out_dir=tmp_path / "part", **quiet)

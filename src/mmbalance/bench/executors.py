"""Where the runs of a bench execute: in this process (``-j 1``), in a pool of local processes
(``-j N``, spawn context), or as Ray tasks (``--executor ray``, the ``mmbalance[ray]`` extra).

Every executor runs the same :func:`run_task` on a plain-dict task (the resolved config tree, the
run folder, ``run`` or ``resume``) and hands back a plain dict (``ok``, ``result`` or ``error``),
so a task pickles everywhere and a failure never takes the other runs with it: its traceback goes
to ``<run folder>/error.log`` and the bench reports it by its folder.
"""
from __future__ import annotations

import os
import shutil
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import yaml

from ..errors import MMBalanceError

#: a run folder's error record (removed when the run is started again)
ERROR_LOG = "error.log"
#: the resolved config a bench asked for (``config.yaml`` is the trainer's: after the method's
#: ``configure_model``, e.g. heads switched on); the next bench compares its config with this one
BENCH_CONFIG = "bench_config.yaml"
#: the distinct warnings a run raised (kept out of the console)
WARNINGS_LOG = "warnings.log"

Done = Callable[[Dict[str, Any], Dict[str, Any]], None]


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_jobs(n_runs: int, device: str = "cpu") -> int:
    """Processes for ``bench`` without ``-j``: one per usable core, at most 8 (each process holds
    its own copy of the data) and at most the number of runs to do; 1 when the runs use CUDA
    (they would share one GPU; use ``-j`` or Ray to spread runs over GPUs)."""
    if device.startswith("cuda"):
        return 1
    return max(1, min(usable_cores(), 8, n_runs))


def threads_per_job(jobs: int) -> int:
    """Torch threads of each of ``jobs`` parallel runs: the usable cores split between them."""
    return max(1, usable_cores() // max(1, jobs))


def run_task(task: Dict[str, Any]) -> Dict[str, Any]:
    """Train (``action='run'``) or continue (``action='resume'``) one run; never raises.

    ``task``: ``config`` (a resolved config tree), ``run_dir``, ``action``, optional ``threads``
    (caps torch's intra-op threads in this process; a run with ``train.threads`` > 0 keeps its own
    setting, and ``train.threads=0`` still gives small models one thread, see the trainer)."""
    run_dir = Path(task["run_dir"])
    try:
        import torch

        from ..config import config_from_dict
        from ..training.trainer import Trainer
        if task.get("threads"):
            torch.set_num_threads(int(task["threads"]))
        cfg = config_from_dict(task["config"])
        if task["action"] == "resume":
            (run_dir / ERROR_LOG).unlink(missing_ok=True)
            trainer = Trainer(cfg, run_dir, quiet=True)
        else:
            if (run_dir / "config.yaml").exists():  # a run folder of another config: replaced whole
                shutil.rmtree(run_dir)
            (run_dir / ERROR_LOG).unlink(missing_ok=True)
            trainer = Trainer(cfg, run_dir, quiet=True, overwrite=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / BENCH_CONFIG).write_text(yaml.safe_dump(task["config"], sort_keys=False))
        (run_dir / WARNINGS_LOG).unlink(missing_ok=True)
        # warnings go to the run folder, not between the progress lines of parallel runs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            res = trainer.fit(resume=task["action"] == "resume")
        lines = list(dict.fromkeys(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught))
        if lines:
            (run_dir / WARNINGS_LOG).write_text("\n".join(lines) + "\n")
        return {"ok": True, "result": res, "warnings": len(lines)}
    except Exception as exc:  # reported by the bench with the run folder; the other runs go on
        msg = f"{type(exc).__name__}: {exc}"
        log = None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ERROR_LOG).write_text(traceback.format_exc())
            log = str(run_dir / ERROR_LOG)
        except OSError:
            pass
        return {"ok": False, "error": msg, "log": log}


def run_local(tasks: Sequence[Dict[str, Any]], jobs: int, done: Done) -> None:
    """``jobs`` == 1: one after another in this process; else a pool of ``jobs`` spawned processes,
    each run's torch threads capped at :func:`threads_per_job`. ``done(task, outcome)`` is called in
    this process as each run ends (completion order)."""
    if jobs <= 1:
        for t in tasks:
            done(t, run_task(t))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    threads = threads_per_job(jobs)
    tasks = [dict(t, threads=t.get("threads") or threads) for t in tasks]
    ex = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)) or 1, mp_context=mp.get_context("spawn"))
    try:
        futures = {ex.submit(run_task, t): t for t in tasks}
        for f in as_completed(futures):
            try:
                out = f.result()
            except Exception as exc:  # the worker process died (killed, out of memory, crash)
                out = {"ok": False, "error": f"worker process died ({type(exc).__name__}: {exc})", "log": None}
            done(futures[f], out)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def run_ray(tasks: Sequence[Dict[str, Any]], done: Done, address: Optional[str] = None) -> None:
    """Each run a Ray task requesting ``cpus`` CPUs (its torch threads) and ``gpus`` GPUs. Uses the
    Ray instance already started in this process, else ``ray.init(address=address)`` (``None``:
    a local instance; ``auto`` or ``ray://host:10001``: a running cluster). Run folders must be on
    a file system every node sees (the bench passes absolute paths)."""
    try:
        import ray
    except ImportError:
        raise MMBalanceError("--executor ray needs Ray: pip install 'mmbalance[ray]' (or pip install ray)") from None
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:
            raise MMBalanceError(f"cannot start or reach Ray (address={address!r}): {exc}") from None
        started = True
    try:
        remote = ray.remote(max_retries=0)(run_task)
        pending = {}
        for t in tasks:
            t = dict(t, threads=t["cpus"])
            ref = remote.options(num_cpus=t["cpus"], num_gpus=t["gpus"], name=f"mmbalance:{t['label']}").remote(t)
            pending[ref] = t
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                t = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as exc:  # the task's worker died
                    out = {"ok": False, "error": f"Ray task failed ({type(exc).__name__}: {exc})", "log": None}
                done(t, out)
    finally:
        if started:
            ray.shutdown()


__all__ = ["BENCH_CONFIG", "ERROR_LOG", "WARNINGS_LOG", "default_jobs", "run_local", "run_ray", "run_task", "threads_per_job", "usable_cores"]

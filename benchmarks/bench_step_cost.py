"""Training cost of every method against `joint`, on the ResNet-18 audio-visual model (CPU).

    .venv/bin/python benchmarks/bench_step_cost.py [--methods all] [--batch 16] [--repeats 2]

Random audio-like [1, 64, 64] and visual [3, 64, 64] inputs, 3 classes; ResNet-18 encoders (the
OGM-GE template, small-input stem), concat fusion (or the method's own). Each method first trains
2 epochs on 2 batches with its warm-up shortened to 1 epoch (so its own mechanism is active),
then one more epoch of ``steps`` batches is timed -- hooks included (epoch-start statistic
passes, re-sampling copies). Reported: seconds per training batch of the dataset (ARM's extra
copies count as cost) and the ratio to ``joint`` measured in the same process, methods
interleaved over ``repeats`` rounds. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import fields

import numpy as np
import torch

from mmbalance.config import resolve_config
from mmbalance.data import from_arrays
from mmbalance.methods import METHODS
from mmbalance.training.trainer import Trainer


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3

    def split():
        return ({"audio": rng.normal(size=(n, 1, 64, 64)).astype(np.float32),
                 "visual": rng.normal(size=(n, 3, 64, 64)).astype(np.float32)}, y)
    return from_arrays(train=split(), val=split(), test=split(), name="av-random")


def time_method(name: str, data, batch: int) -> float:
    opts = {f.name for f in fields(METHODS.get(name).Options)}
    over = ["model.encoder=resnet18", "model.small_input=true", f"data.batch_size={batch}", "train.epochs=3",
            "train.progress=off", "data.eval_batch_size=64"]
    if "warmup_epochs" in opts:
        over.append("method.warmup_epochs=1")
    cfg = resolve_config("custom", name, overrides=over)
    tr = Trainer(cfg, None, quiet=True, data=data)
    for epoch in range(2):
        tr.train_epoch(epoch)
    t0 = time.perf_counter()
    tr.train_epoch(2)
    secs = time.perf_counter() - t0
    return secs / (len(data.train) / batch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="all")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    methods = METHODS.names() if args.methods == "all" else args.methods.split(",")
    if "joint" not in methods:
        methods = ["joint"] + methods
    data = make_data(args.batch * args.steps)
    times = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            torch.manual_seed(0)
            times[m].append(time_method(m, data, args.batch))
    base = statistics.median(times["joint"])
    print(f"| method | s / batch (median of {args.repeats}) | ratio to joint |")
    print("|---|---|---|")
    for m in methods:
        t = statistics.median(times[m])
        print(f"| {m} | {t:.3f} | {t / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

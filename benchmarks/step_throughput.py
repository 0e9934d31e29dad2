"""Training-step throughput (samples/s) of the ResNet-18 audio-visual model for ``joint`` and every
registered method, in one run, with ratios to ``joint``, under the precision / memory-format
variants (issue 12, point 5).

    .venv/bin/python benchmarks/step_throughput.py [--device cpu|cuda] [--methods all] [--batch 16]
        [--size 64] [--steps 3] [--repeats 1] [--variants default,previous,bf16] [--variant-methods joint]
        [--threads 1]

Data as in ``bench_step_cost.py``: random audio-like ``[1, S, S]`` and visual ``[3, S, S]`` inputs,
3 classes; ResNet-18 encoders with the small-input stem, concat fusion (or the method's own).
Each measurement builds a fresh trainer, trains one epoch of ``steps`` batches with the method's
warm-up shortened to 0 epochs (so its own mechanism is active; the first epoch also warms up the
kernels), then times one more epoch of ``steps`` batches -- hooks included (epoch-start passes,
re-sampling copies) -- and reports training samples per second. On CPU the clock is the
process's CPU time (``time.process_time``) with ``--threads`` torch threads (default 1): on a shared
machine wall time swings with the other jobs' load, CPU time hardly does. On CUDA it is wall time,
read after ``torch.cuda.synchronize()``.

Variants (``model.channels_last`` / ``train.precision``):

* ``default``  -- today's defaults: channels_last on, fp32;
* ``previous`` -- the defaults before issue 12: channels_last off, fp32;
* ``bf16``     -- channels_last on, bf16 autocast (opt-in);
* ``fp16``     -- channels_last on, fp16 autocast + GradScaler (CUDA only).

Table 1: every method under ``default`` (samples/s, ratio to ``joint``). Table 2: the variants
for ``--variant-methods`` (default ``joint``; ``all`` for every method), as samples/s and the
speed-up over ``previous``. Methods are interleaved over ``repeats`` rounds; medians are reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import fields

import numpy as np
import torch

from mmbalance.config import resolve_config
from mmbalance.data import from_arrays
from mmbalance.methods import METHODS, load_all
from mmbalance.training.trainer import Trainer

VARIANTS = {
    "default": ["model.channels_last=true", "train.precision=fp32"],
    "previous": ["model.channels_last=false", "train.precision=fp32"],
    "bf16": ["model.channels_last=true", "train.precision=bf16"],
    "fp16": ["model.channels_last=true", "train.precision=fp16"],
}


def make_data(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3

    def split():
        return ({"audio": rng.normal(size=(n, 1, size, size)).astype(np.float32),
                 "visual": rng.normal(size=(n, 3, size, size)).astype(np.float32)}, y)
    return from_arrays(train=split(), val=split(), test=split(), name="av-random")


def samples_per_second(name: str, data, batch: int, device: str, variant: str, threads: int = 1) -> float:
    opts = {f.name for f in fields(METHODS.get(name).Options)}
    over = ["model.encoder=resnet18", "model.small_input=true", f"data.batch_size={batch}", "train.epochs=2",
            "train.progress=off", "data.eval_batch_size=64", f"train.device={device}",
            f"train.threads={threads}"] + VARIANTS[variant]
    if "warmup_epochs" in opts:
        over.append("method.warmup_epochs=0")
    cfg = resolve_config("custom", name, overrides=over)
    tr = Trainer(cfg, None, quiet=True, data=data)
    if tr.threads > 0:
        torch.set_num_threads(tr.threads)
    tr.train_epoch(0)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    sync()
    t0 = clock()
    tr.train_epoch(1)
    sync()
    return len(data.train) / (clock() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default=None, help="default: default,previous,bf16 (+fp16 on CUDA)")
    ap.add_argument("--variant-methods", default="joint")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU; 0 = torch's default)")
    args = ap.parse_args(argv)
    load_all()
    methods = METHODS.names() if args.methods == "all" else args.methods.split(",")
    methods = ["joint"] + [m for m in methods if m != "joint"]
    variants = (args.variants.split(",") if args.variants else
                ["default", "previous", "bf16"] + (["fp16"] if args.device.startswith("cuda") else []))
    vmethods = methods if args.variant_methods == "all" else args.variant_methods.split(",")
    data = make_data(args.batch * args.steps, args.size)
    plan = [(m, "default") for m in methods] + [(m, v) for m in vmethods for v in variants if v != "default"]
    results = {k: [] for k in plan}
    t_start = time.perf_counter()
    for _ in range(args.repeats):
        for m, v in plan:
            torch.manual_seed(0)
            results[(m, v)].append(samples_per_second(m, data, args.batch, args.device, v, args.threads))
    med = {k: statistics.median(v) for k, v in results.items()}
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    clock = "wall" if args.device.startswith("cuda") else "process CPU"
    print(f"device {args.device} ({dev}), torch {torch.__version__}, threads {args.threads}, {clock} time, "
          f"batch {args.batch}, inputs {args.size}x{args.size}, {args.steps} timed steps, repeats {args.repeats}, "
          f"load average {load}, total {time.perf_counter() - t_start:.0f} s")
    base = med[("joint", "default")]
    print("\n| method | samples/s (default) | ratio to joint |\n|---|---|---|")
    for m in methods:
        print(f"| {m} | {med[(m, 'default')]:.1f} | {med[(m, 'default')] / base:.2f} |")
    print("\n| method | " + " | ".join(f"{v} samples/s" for v in variants) + " | "
          + " | ".join(f"{v} / previous" for v in variants if v != "previous") + " |")
    print("|---|" + "---|" * (2 * len(variants) - 1))
    for m in vmethods:
        row = [med[(m, v)] for v in variants]
        prev = med.get((m, "previous"))
        ratios = [f"{med[(m, v)] / prev:.2f}" if prev else "-" for v in variants if v != "previous"]
        print(f"| {m} | " + " | ".join(f"{x:.1f}" for x in row) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Torch thread count for small models on CPU: the synthetic default (MLP encoders, ~30k
parameters) trained with ``train.threads=1`` and ``=2``, interleaved, in one process.

    .venv/bin/python benchmarks/bench_threads.py [--epochs 3] [--repeats 2]

Prints seconds per epoch for each setting and the ratio; ``train.threads=0`` (the default, auto)
picks 1 for models under ``SMALL_MODEL_PARAMS`` parameters on CPU.
"""
from __future__ import annotations

import argparse
import statistics

from mmbalance.config import resolve_config
from mmbalance.training.trainer import SMALL_MODEL_PARAMS, Trainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", default="joint")
    args = ap.parse_args(argv)
    secs = {1: [], 2: []}
    for _ in range(args.repeats):
        for n in (1, 2):
            cfg = resolve_config("synthetic", args.method, overrides=[f"epochs={args.epochs}", f"train.threads={n}",
                                                                     "train.progress=off"])
            tr = Trainer(cfg, None, quiet=True)
            res = tr.fit()
            secs[n].append(res["train_seconds"] / args.epochs)
    params = sum(p.numel() for p in tr.model.parameters())
    one, two = statistics.median(secs[1]), statistics.median(secs[2])
    print(f"{args.method} on synthetic ({params} parameters; auto threshold {SMALL_MODEL_PARAMS}): "
          f"threads=1 {one:.2f} s/epoch, threads=2 {two:.2f} s/epoch, ratio 2/1 = {two / one:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

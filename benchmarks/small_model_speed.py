"""Small-model speed: a 2-modality IMU-like sequence set trained end to end (issue 12, point 6).

    .venv/bin/python benchmarks/small_model_speed.py [--epochs 12] [--seeds 0] [--out /tmp/imu]
        [--write-only] [key=value ...]

Writes ``imu.npz`` (once) into ``--out``: 6 activity classes, an accelerometer and a gyroscope
modality of 50 steps x 3 channels each (one 6-channel IMU), 2,000 training, 500 validation and
500 test windows. Each class has its own base frequency and axis mix; the accelerometer carries
the class more clearly than the gyroscope (noisier, phase-jittered), so the set is mildly
imbalanced like real IMU data. Then trains ``joint`` on it with the CLI defaults (plus the given
``key=value`` overrides) for every seed and prints samples/s (training only, from result.json),
the wall time of the whole run (training + evaluation each epoch + test) and test accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CLASSES = 6
STEPS = 50
SPLITS = {"train": 2000, "val": 500, "test": 500}


def make_imu(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = sum(SPLITS.values())
    y = rng.integers(0, CLASSES, size=n)
    t = np.arange(STEPS) / 25.0  # 25 Hz, 2 s windows
    freq = 0.6 + 0.35 * np.arange(CLASSES)  # Hz per class
    mix = rng.normal(size=(CLASSES, 3))
    mix /= np.linalg.norm(mix, axis=1, keepdims=True)
    gmix = rng.normal(size=(CLASSES, 3))
    gmix /= np.linalg.norm(gmix, axis=1, keepdims=True)

    def signal(amp, mixes, jitter, noise):
        f = freq[y] * (1 + 0.08 * rng.normal(size=n))  # per-window tempo
        ph = rng.uniform(0, 2 * np.pi, size=n) if jitter else np.zeros(n)
        wave = np.sin(2 * np.pi * f[:, None] * t[None, :] + ph[:, None])  # [N, T]
        wave2 = 0.5 * np.sin(4 * np.pi * f[:, None] * t[None, :] + 2 * ph[:, None])
        x = amp * (wave[:, :, None] * mixes[y][:, None, :] + wave2[:, :, None] * mixes[(y + 1) % CLASSES][:, None, :])
        return (x + noise * rng.normal(size=x.shape)).astype(np.float32)

    acc = signal(1.0, mix, jitter=True, noise=1.2)
    gyro = signal(0.6, gmix, jitter=True, noise=1.5)
    split = np.array(sum(([s] * k for s, k in SPLITS.items()), []))
    np.savez(path, x_accelerometer=acc, x_gyroscope=gyro, y=y.astype(np.int64), split=split,
             class_names=np.array([f"activity{k}" for k in range(CLASSES)]))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--method", default="joint")
    ap.add_argument("--out", default="/tmp/mmbalance-imu")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "imu.npz"
    if not npz.exists():
        make_imu(npz)
    if args.write_only:
        print(npz)
        return 0
    from mmbalance.cli import main as cli
    print("| seed | train samples/s | run wall s | test accuracy |")
    print("|---|---|---|---|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"run-{args.method}-s{seed}"
        t0 = time.perf_counter()
        rc = cli(["train", "--dataset", str(npz), "--method", args.method, "--out", str(run), "--overwrite",
                  "--quiet", f"epochs={args.epochs}", f"seed={seed}", *args.overrides])
        wall = time.perf_counter() - t0
        if rc != 0:
            return rc
        res = json.loads((run / "result.json").read_text())
        print(f"| {seed} | {res['train_samples_per_second']} | {wall:.1f} | {res['test']['accuracy']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Loader throughput with/without the input cache vs a ResNet-18 training step (CREMA-D shapes, CPU).

    .venv/bin/python benchmarks/bench_loader.py [--clips 48] [--batch 16] [--workers 0] [--out docs/benchmarks_loader.md]

Generates a fake CREMA-D folder in the C-OGM layout (train.csv/test.csv, AudioWAV/*.wav 16 kHz 2.5 s,
Image-01-FPS/<clip>/NNNNN.jpg 3 frames 480x640 like the real 1 fps extractions' size class), then
measures samples/s of the training split's DataLoader without the cache, with the cache while it
fills (epoch 1) and once filled (epoch 2), the time to the first batch, and samples/s of a full
training step (forward + backward + SGD) of the audio+visual ResNet-18 model on audio [1, 257, 188]
and 2 frames [3, 224, 224].
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import DataLoader


def make_fake_cremad(root: Path, clips: int, frame_hw=(480, 640)) -> None:
    emos = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    for k in range(clips):
        emo = emos[k % 6]
        clip = f"{1000 + k}_DFA_{emo}_XX"
        rows["test" if k % 8 == 7 else "train"].append(f"{clip},{emo}")
        (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
        sf.write(root / "AudioWAV" / f"{clip}.wav", (0.1 * rng.standard_normal(40000)).astype(np.float32), 16000,
                 subtype="PCM_16")
        d = root / "Image-01-FPS" / clip
        d.mkdir(parents=True, exist_ok=True)
        for f in range(3):
            img = (rng.random((frame_hw[0] // 8, frame_hw[1] // 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).resize(frame_hw[::-1], Image.BILINEAR).save(d / f"{f * 30:05d}.jpg", quality=90)
    for s, r in rows.items():
        (root / f"{s}.csv").write_text("\ufeff" + "\n".join(r) + "\n")


def loader_rate(ds, batch, workers):
    from mmbalance.data import collate
    t0 = time.perf_counter()
    first = None
    n = 0
    for b in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate):
        if first is None:
            first = time.perf_counter() - t0
        n += len(b)
    return n / (time.perf_counter() - t0), first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (config default: 0)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="docs/benchmarks_loader.md")
    a = ap.parse_args()
    torch.manual_seed(0)
    from mmbalance.config import ModelConfig
    from mmbalance.data import build_dataset
    from mmbalance.data.datasets.av import CremaDOptions
    from mmbalance.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "cremad", Path(tmp) / "cache"
        t = time.perf_counter()
        make_fake_cremad(root, a.clips)
        gen_s = time.perf_counter() - t
        cfg = SimpleNamespace(root=str(root), on_error="raise", cache=None)
        t_start = time.perf_counter()
        b = build_dataset("cremad", CremaDOptions(), cfg, 0)
        build_s = time.perf_counter() - t_start
        plain, first_plain = loader_rate(b.train, a.batch, a.workers)
        first_batch_s = build_s + first_plain
        cfg.cache = str(cache)
        bc = build_dataset("cremad", CremaDOptions(), cfg, 0)
        fill, _ = loader_rate(bc.train, a.batch, a.workers)
        warm, _ = loader_rate(bc.train, a.batch, a.workers)

        model = build_model(b.modalities, b.input_shapes, b.num_classes, ModelConfig(), b.encoder_hints)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = {"audio": torch.randn(a.batch, 1, 257, 188), "visual": torch.randn(a.batch, 2, 3, 224, 224)}
        y = torch.randint(0, 6, (a.batch,))

        def step():
            out = model(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        train_rate = a.steps * a.batch / (time.perf_counter() - t)

    ratio = train_rate / warm
    lines = [
        "## Data loading (CREMA-D-shaped, CPU)", "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_loader.py', f'--clips {a.clips}', f'--batch {a.batch}', f'--workers {a.workers}'])}`"
        f" on {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fake C-OGM folder of {a.clips} clips (3 JPEG frames 480x640, 2.5 s 16 kHz WAV, resampled to 22,050 Hz), "
        f"inputs audio [1, 257, 188] + 2 frames [3, 224, 224], batch {a.batch}, {a.workers} DataLoader workers.", "",
        "| measurement | samples/s |", "|---|---|",
        f"| loader, no cache | {plain:.1f} |",
        f"| loader, cache filling (epoch 1) | {fill:.1f} |",
        f"| loader, cache filled (epoch >= 2) | {warm:.1f} |",
        f"| ResNet-18 a+v training step (fwd+bwd+SGD) | {train_rate:.2f} |", "",
        f"* Loading time as a share of a training step: {100 * train_rate / plain:.1f}% without the cache, "
        f"{100 * ratio:.1f}% with the filled cache (target < 10%).",
        f"* First batch {first_batch_s:.2f} s after the start (dataset build {build_s:.2f} s incl. validation; target < 10 s).",
        f"* Fixture generation took {gen_s:.1f} s (not counted).", "",
    ]
    text = "\n".join(lines)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Audio-visual digits: FSDD spoken digits paired with MNIST images of the same digit.

In the spirit of AV-MNIST (MultiBench). Audio: the FSDD recording (8 kHz) repeated (``audio_fill=tile``, the
OGM-GE convention; most recordings are 0.3-0.7 s) or zero-padded (``pad``) and cut to
``audio_seconds``, log-magnitude spectrogram ``log(|STFT| + 1e-7)`` with ``torch.stft`` (Hann
window, ``n_fft``, ``hop``), standardised with the training split's mean and std -> [1, F, T].
Image: the 28x28 MNIST digit in [0, 1], optionally degraded by Gaussian noise of std
``image_noise`` (fixed per sample, seeded) -> [1, 28, 28].

Splits: FSDD repetitions 0-4 of every speaker and digit are test (the dataset's convention),
the rest train; a seeded stratified ``val_fraction`` of train is validation. Each recording is
paired with an MNIST image of the same digit from the matching MNIST split (train images for
train/val, test images for test), by a seeded permutation.

``data.root`` is the folder holding ``fsdd/recordings`` and ``mnist-subset`` (default:
``$MMBALANCE_DATA`` or ``../shared/data``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError
from .. import media
from ..base import DataBundle, Subset, TensorMultimodalDataset, register_dataset, stratified_holdout

_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


@dataclass
class AVDigitsOptions:
    audio_seconds: float = 1.0
    audio_fill: str = "tile"  # tile (repeat the recording, as OGM-GE does for CREMA-D) | pad (zeros)
    n_fft: int = 128
    hop: int = 64
    image_noise: float = 0.0
    val_fraction: float = 0.1
    pair_seed: int = 0
    val_seed: int = 0


def default_root() -> Path:
    env = os.environ.get("MMBALANCE_DATA")
    return Path(env) if env else Path("../shared/data")


def read_png(path: Path) -> torch.Tensor:
    """One grey-scale image [H, W] in [0, 1]."""
    return media.to_float(media.load_image_uint8(path, mode="L"))[0]


@register_dataset("avdigits", options=AVDigitsOptions, modalities=("audio", "image"), needs_root=True,
                  description="real audio-visual digits: FSDD recordings paired with MNIST images (../shared/data)",
                  presets={"train": {"epochs": 12}, "optim": {"lr": 0.01}, "data": {"batch_size": 64}})
def build_avdigits(options: AVDigitsOptions, data_cfg=None, seed: int = 0) -> DataBundle:
    o = options or AVDigitsOptions()
    root = Path(getattr(data_cfg, "root", None) or default_root())
    rec = root / "fsdd" / "recordings"
    mnist = root / "mnist-subset"
    if not rec.is_dir() or not mnist.is_dir():
        raise DataError(f"avdigits: '{root}' must hold fsdd/recordings/*.wav and mnist-subset/{{train,test}}/<digit>/*.png "
                        "(set data.root=DIR or $MMBALANCE_DATA)")
    files = sorted(p for p in rec.iterdir() if p.suffix == ".wav")
    if not files:
        raise DataError(f"avdigits: no .wav files in '{rec}'")
    n_samples = int(round(o.audio_seconds * 8000))
    specs, labels, is_test = [], [], []
    for p in files:
        m = _NAME.match(p.name)
        if not m:
            raise DataError(f"avdigits: file name '{p.name}' is not <digit>_<speaker>_<repetition>.wav")
        x, sr = media.read_audio(p)
        if sr != 8000:
            raise DataError(f"audio file '{p}' has sample rate {sr}; FSDD recordings are 8000 Hz")
        x = media.tile_to(x, n_samples) if o.audio_fill == "tile" else media.fix_length(x, n_samples)
        specs.append(media.log_spectrogram(x, o.n_fft, o.hop))
        labels.append(int(m.group(1)))
        is_test.append(int(m.group(3)) <= 4)
    audio = torch.stack(specs).unsqueeze(1)  # N,1,F,T
    y = np.array(labels, dtype=np.int64)
    test_mask = np.array(is_test)
    mu, sd = audio[~test_mask].mean(), audio[~test_mask].std()
    audio = (audio - mu) / sd

    rng = np.random.default_rng(o.pair_seed)
    images = torch.zeros(len(y), 1, 28, 28)
    for split_name, mask in (("train", ~test_mask), ("test", test_mask)):
        for d in range(10):
            folder = mnist / split_name / str(d)
            pngs = sorted(folder.glob("*.png"))
            if not pngs:
                raise DataError(f"avdigits: no images in '{folder}'")
            rows = np.flatnonzero(mask & (y == d))
            pick = rng.permutation(len(pngs))
            for j, r in enumerate(rows):
                images[r, 0] = read_png(pngs[pick[j % len(pngs)]])
    if o.image_noise > 0:
        g = torch.Generator().manual_seed(o.pair_seed + 1)
        images = images + o.image_noise * torch.randn(images.shape, generator=g)

    full_train = np.flatnonzero(~test_mask)
    keep, held = stratified_holdout(y[full_train], o.val_fraction, o.val_seed)
    test_idx = np.flatnonzero(test_mask)
    base = TensorMultimodalDataset({"audio": audio, "image": images}, y, 10)
    splits = {"train": Subset(base, full_train[keep]), "val": Subset(base, full_train[held]),
              "test": Subset(base, test_idx)}
    return DataBundle("avdigits", ("audio", "image"), 10, splits, class_names=[str(d) for d in range(10)])

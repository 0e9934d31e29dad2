"""Synthetic multimodal data with controllable modality imbalance (no files).

After MCR §4.1 (Kontras et al.): a K-class label ``y``; each sample follows one *information
pattern*: ``shared`` (every modality carries the label) or ``unique_m`` (only modality m does;
the others carry a random, independent label, i.e. noise w.r.t. y), or ``none`` (no modality
does: the rest of the probability mass). Per modality m, a latent vector
``u_m = sep * mu_m[c] + noise_m * N(0, I)`` (c = y where m is informative, else a random label,
``mu_m`` fixed random class means) is mapped to ``dim`` dimensions by a fixed random non-linear
map ``x_m = tanh(u_m A_m) B_m``. Everything is seeded by ``data_seed`` (not the training seed,
so every training seed sees the same data).

The default is imbalanced on purpose: both modalities carry the label on 90 % of the samples
(``shared``) and each alone on another 5 %, but ``x1`` with little noise (0.6) and ``x2`` with a
lot (1.5). ``x1`` is fitted first, and under joint training the fused classifier leans on it:
``x2``'s zero-out accuracy (the fused classifier on ``x2`` alone) stays ~9 points below what ``x2``
reaches alone, although a linear probe finds ``x2``'s encoder features nearly as good as the
unimodal model's (85.0 against 85.8, seed 0; ``mmbalance diagnose``): the imbalance sits in the
fusion head more than in the encoder.
Picked from a sweep of 9 settings (7 are in ``benchmarks/default_probe.py``) (issue 10; 3 seeds each, 20 epochs, mean ± std in %):

==========================================  =============  ==========
joint: fused accuracy                       94.6 ± 0.1
joint: ``x2``'s zero-out accuracy           77.0 ± 2.6     the weak modality, under-used
``x2`` trained alone                        85.7 ± 0.4     what ``x2`` can reach
``x1`` trained alone                        93.4 ± 0.0
ensemble of the two unimodal models         95.2 ± 0.1     beats the jointly trained model
MLA: fused / ``x2`` zero-out                94.8 ± 0.2 / 84.8 ± 0.2   a method that helps
OGM-GE: fused / ``x2`` zero-out             94.6 ± 0.3 / 74.9 ± 4.1   one that does not, here
==========================================  =============  ==========

The previous default (shared 0.5, unique [0.3, 0.1], noise [0.6, 1.0]) showed ``x2`` at
57.8 ± 7.1 against 64.4 alone: too close and seed-dependent to teach anything. Reproduce with
``benchmarks/default_probe.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

from ..base import DataBundle, TensorMultimodalDataset, register_dataset


@dataclass
class SyntheticOptions:
    num_classes: int = 5
    num_modalities: int = 2
    n_train: int = 3000
    n_val: int = 1000
    n_test: int = 2000
    latent_dim: int = 8
    dim: int = 32
    shared: float = 0.9
    unique: List[float] = field(default_factory=lambda: [0.05, 0.05])
    noise: List[float] = field(default_factory=lambda: [0.6, 1.5])
    sep: float = 1.5
    data_seed: int = 0

    def validate(self):
        errs = []
        m = self.num_modalities
        if m < 1:
            errs.append("num_modalities must be >= 1")
        if self.num_classes < 2:
            errs.append("num_classes must be >= 2")
        for name in ("unique", "noise"):
            v = getattr(self, name)
            if len(v) != m:
                errs.append(f"{name} needs one value per modality ({m}), got {len(v)}: {v}")
        if not 0 <= self.shared <= 1 or any(u < 0 for u in self.unique) or self.shared + sum(self.unique) > 1 + 1e-9:
            errs.append(f"shared ({self.shared}) + sum(unique) ({sum(self.unique)}) must be fractions summing to <= 1")
        if min(self.n_train, self.n_val, self.n_test) < 1:
            errs.append("n_train, n_val and n_test must be >= 1")
        return errs


def modality_names(m: int) -> List[str]:
    return [f"x{i + 1}" for i in range(m)]


def generate(o: SyntheticOptions):
    """Return (inputs dict of [N, dim] float32 arrays, labels [N], pattern [N]) for all splits."""
    rng = np.random.default_rng(o.data_seed)
    m_names = modality_names(o.num_modalities)
    n = o.n_train + o.n_val + o.n_test
    k = o.num_classes
    y = rng.integers(0, k, size=n)
    probs = np.array([o.shared, *o.unique, max(0.0, 1.0 - o.shared - sum(o.unique))], dtype=float)
    pattern = rng.choice(len(probs), size=n, p=probs / probs.sum())  # 0 shared, 1..M unique_m, M+1 none
    inputs = {}
    for j, m in enumerate(m_names):
        means = rng.normal(size=(k, o.latent_dim))
        a = rng.normal(size=(o.latent_dim, o.dim)) / np.sqrt(o.latent_dim)
        b = rng.normal(size=(o.dim, o.dim)) / np.sqrt(o.dim)
        informative = (pattern == 0) | (pattern == j + 1)
        cls = np.where(informative, y, rng.integers(0, k, size=n))
        u = o.sep * means[cls] + o.noise[j] * rng.normal(size=(n, o.latent_dim))
        x = np.tanh(u @ a) @ b
        mu, sd = x[: o.n_train].mean(0), x[: o.n_train].std(0) + 1e-6
        inputs[m] = ((x - mu) / sd).astype(np.float32)
    return inputs, y.astype(np.int64), pattern


@register_dataset("synthetic", options=SyntheticOptions, modalities=("x1", "x2"),
                  description="generated data with controllable modality imbalance (shared/unique information, MCR §4.1)",
                  presets={"train": {"epochs": 20}, "optim": {"lr": 0.05}, "model": {"feature_dim": 32, "hidden_dim": 64}})
def build_synthetic(options: SyntheticOptions, data_cfg=None, seed: int = 0) -> DataBundle:
    o = options or SyntheticOptions()
    inputs, y, _ = generate(o)
    bounds = {"train": (0, o.n_train), "val": (o.n_train, o.n_train + o.n_val),
              "test": (o.n_train + o.n_val, o.n_train + o.n_val + o.n_test)}
    splits = {s: TensorMultimodalDataset({m: torch.from_numpy(x[a:b]) for m, x in inputs.items()}, y[a:b], o.num_classes)
              for s, (a, b) in bounds.items()}
    return DataBundle("synthetic", tuple(inputs), o.num_classes, splits,
                      class_names=[str(c) for c in range(o.num_classes)])

"""Small builders shared by the tests: tiny datasets, configs and a hand-built trainer context."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from mmbalance.config import resolve_config
from mmbalance.data.base import DataBundle, TensorMultimodalDataset
from mmbalance.data.batch import collate


def tiny_bundle(num_modalities: int = 2, num_classes: int = 3, n: int = 48, dim: int = 6,
                shapes: Optional[Dict[str, Sequence[int]]] = None, seed: int = 0) -> DataBundle:
    """Linearly separable-ish random data; modality names m1..mM (or the keys of ``shapes``)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {f"m{i + 1}": (dim,) for i in range(num_modalities)}
    y = torch.arange(n) % num_classes
    splits = {}
    for s, off in (("train", 0), ("val", 1), ("test", 2)):
        inputs = {}
        for j, (m, shp) in enumerate(shapes.items()):
            x = torch.randn(n, *shp, generator=g)
            x.view(n, -1)[:, 0] += 2.0 * y.float()  # label signal in the first element
            inputs[m] = x
        splits[s] = TensorMultimodalDataset(inputs, y.numpy(), num_classes)
    return DataBundle("tiny", tuple(shapes), num_classes, splits)


def tiny_config(method: str, overrides: Sequence[str] = (), dataset: str = "synthetic"):
    base = ["train.epochs=2", "data.batch_size=16", "model.feature_dim=8", "model.hidden_dim=16",
            "model.fusion_hidden=16", "train.progress=off"]
    return resolve_config(dataset, method, None, base + list(overrides))


def batch_of(bundle: DataBundle, split: str = "train", n: int = 16):
    ds = bundle.splits[split]
    return collate([ds[i] for i in range(min(n, len(ds)))])


def two_steps(trainer, n: int = 32, batch_size: int = 16):
    """Run ``on_epoch_start`` and then ``training_step`` on the first ``n`` training rows in
    batches of ``batch_size``; returns the LossOutputs."""
    trainer.model.train()
    ctx = trainer.ctx
    trainer.method.on_epoch_start(trainer.model, ctx)
    batches = list(trainer._batches(trainer.bundle.train, range(n), batch_size))
    ctx.num_batches = len(batches)
    out = []
    for i, batch in enumerate(batches):
        ctx.batch_idx = i
        out.append(trainer.method.training_step(trainer.model, batch, ctx))
    return out

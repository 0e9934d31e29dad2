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


# ------------------------------------------------------------------ method harness (spec baselines §6)
def _steps(trainer, batches, start: int = 0):
    trainer.model.train()
    ctx = trainer.ctx
    ctx.num_batches = len(batches) + start
    out = []
    for i, batch in enumerate(batches):
        ctx.batch_idx = start + i
        out.append(trainer.method.training_step(trainer.model, batch, ctx))
        ctx.global_step += 1
    return out


def state_round_trip_reproduces_next_step(method: str, overrides=(), bundle=None, epoch: int = 0, steps: int = 2,
                                          tmp_path=None):
    """Train ``steps`` batches, checkpoint (model, optimiser, method state through
    ``torch.save`` / ``torch.load(weights_only=True)``), then take one more step on the original
    and on a fresh trainer restored from the checkpoint: the parameters must be bit-identical."""
    import io

    from mmbalance.training.trainer import Trainer
    bundle = bundle or tiny_bundle(2)
    cfg = tiny_config(method, list(overrides))
    a = Trainer(cfg, None, quiet=True, bundle=bundle)
    a.ctx.epoch = epoch
    a.method.on_epoch_start(a.model, a.ctx)
    batches = list(a._batches(bundle.train, range(16 * (steps + 1)), 16))
    _steps(a, batches[:steps])
    buf = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "optimizer": a.optimizer.state_dict(),
                "method": a.method.state_dict(), "step": a.ctx.global_step,
                "method_optimizers": {k: o.state_dict() for k, o in a.method.optimizers().items()},
                "method_schedulers": {k: o.state_dict() for k, o in a.method.schedulers().items()},
                "lr_scales": dict(a.lr_scales)}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = Trainer(cfg, None, quiet=True, bundle=bundle)
    b.model.load_state_dict(state["model"])
    b.optimizer.load_state_dict(state["optimizer"])
    b.method.load_state_dict(state["method"])
    b.ctx.global_step, b.ctx.epoch = state["step"], epoch
    b.lr_scales.update(state["lr_scales"])
    b._apply_lr_scales()
    b._load_method_optimizers(state)
    if b._pending_method_states:  # a method that creates its optimisers lazily in on_epoch_start
        b.method.on_epoch_start(b.model, b.ctx)
        b._load_method_optimizers(b._pending_method_states, final=True)
    torch.manual_seed(123)
    _steps(a, batches[steps:], start=steps)
    torch.manual_seed(123)
    _steps(b, batches[steps:], start=steps)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), f"{method}: parameter {n} differs after the restored step"


def one_step_params(method: str, overrides=(), bundle=None, epoch: int = 0, seed: int = 0):
    """Parameters (by name) after one training step of ``method`` from a seeded init."""
    from mmbalance.training.trainer import Trainer
    bundle = bundle or tiny_bundle(2)
    tr = Trainer(tiny_config(method, list(overrides) + [f"train.seed={seed}"]), None, quiet=True, bundle=bundle)
    tr.ctx.epoch = epoch
    tr.method.on_epoch_start(tr.model, tr.ctx)
    batch = next(iter(tr._batches(bundle.train, range(16), 16)))
    torch.manual_seed(7)
    _steps(tr, [batch])
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


def assert_same_step(method: str, noop_overrides, base: str = "joint", base_overrides=(), bundle=None,
                     epoch: int = 0, atol: float = 1e-6):
    """A no-op configuration of ``method`` takes the same step as ``base`` (params within atol),
    on every parameter the two models share."""
    a = one_step_params(method, noop_overrides, bundle, epoch)
    b = one_step_params(base, base_overrides, bundle, epoch)
    shared = [n for n in b if n in a and a[n].shape == b[n].shape]
    assert shared, "no shared parameters to compare"
    for n in shared:
        assert torch.allclose(a[n], b[n], atol=atol), f"{method} no-op differs from {base} at {n}"


def resume_is_exact(method: str, overrides=(), total_epochs: int = 4, stop_after: int = 2, bundle=None,
                    tmp_path=None):
    """Train ``method`` for ``total_epochs`` uninterrupted, and again stopped after ``stop_after``
    epochs (checkpoint of epoch ``stop_after - 1``) then resumed to ``total_epochs`` (the CLI's
    ``--resume``, or ``Trainer(..., data=bundle).fit(resume=True)`` for a Python-made bundle);
    asserts the same test/val/best_epoch in ``result.json`` and identical metrics rows (timing keys
    aside). Returns ``(full_result, resumed_result)``."""
    import json
    import tempfile
    from pathlib import Path

    import yaml

    from mmbalance.training.trainer import Trainer, load_run_config, run_from_dir
    tmp = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="resume_"))
    over = list(overrides) + [f"train.epochs={total_epochs}"]

    def trainer(out, cfg=None):
        cfg = cfg or tiny_config(method, over)
        return Trainer(cfg, out, quiet=True, data=bundle) if bundle is not None else Trainer(cfg, out, quiet=True)

    full = trainer(tmp / "full").fit()
    part = tmp / "part"
    tr = trainer(part)
    tr.cfg.train.epochs = stop_after  # as if interrupted after epoch stop_after - 1
    tr.fit()
    tree = yaml.safe_load((part / "config.yaml").read_text())
    tree["train"]["epochs"] = total_epochs
    (part / "config.yaml").write_text(yaml.safe_dump(tree))
    if bundle is None:
        resumed = run_from_dir(part, quiet=True)
    else:
        resumed = trainer(part, load_run_config(part)).fit(resume=True)
    for k in ("test", "val", "best_epoch"):
        assert resumed[k] == full[k], f"{method}: resumed run differs in result '{k}'"

    def rows(d):
        out = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
        return [{k: v for k, v in r.items() if "seconds" not in k and "time" not in k} for r in out]
    a, b = rows(tmp / "full"), rows(part)
    assert [r["epoch"] for r in b] == list(range(total_epochs)), [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert ra == rb, f"{method}: metrics row of epoch {ra['epoch']} differs after resume"
    return full, resumed

"""Any registered method inside your own training loop (your optimiser, your data).

    method = make_method("bmm", data.modalities, data.num_classes)
    model = prepare_model(method, model)           # heads / fusion / extras the method needs
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # built after prepare_model
    ctx = make_context(model, opt, data=data, num_epochs=E)
    for epoch in range(E):
        method.on_epoch_start(model, ctx.begin_epoch(epoch))
        for batch in ctx.batches(method, batch_size=64):
            result = method.training_step(model, batch, ctx)   # forward, loss, backward, step
        logs = method.on_epoch_end(model, ctx)

What the loop owes a method, and what :meth:`LoopContext.batches` does for you:

* ``ctx.epoch``, ``ctx.num_batches``, ``ctx.batch_idx`` and ``ctx.global_step`` kept current
  (B-MM, GMM, ARM, MLA read them);
* ``on_epoch_start`` / ``on_epoch_end`` called every epoch: B-MM's rho, GMM's warm-up switch and
  mixture fit, ARM's contributions and MIDAS's weights live there -- without them those methods
  silently become plain training;
* the epoch's order from ``method.sampler`` (ARM's re-sampling copies) when it gives one, else a
  seeded shuffle;
* ``ctx.train_eval_batches()`` for dataset-wide statistic passes (from ``data``);
* ``ctx.reset_optimizer()`` (GMM at the end of warm-up) clears your optimiser's state in place,
  so your variable and any LR scheduler on it stay valid;
* ``ctx.train_batches()`` (extra training passes), ``ctx.make_optimizer(params)`` (an optimiser
  of your optimiser's class and settings, fresh state) and, with ``make_context(..., holdout=f)``
  or a method whose ``holdout_fraction()`` is > 0 (``make_context(..., method=method)``),
  ``ctx.holdout_batches()``: the rows held out are removed from ``ctx.data.train`` -- iterate
  ``ctx.batches`` (not your own loader over the original data);
* ``ctx.set_lr_scale(name, s)`` rescales your optimiser's group ``name`` at once (relative to the
  rate it had when first rescaled); a scheduler that sets rates from its base rates (``LambdaLR``)
  overwrites it, so call ``ctx.reapply_lr_scales()`` after its ``step()``. The method's optimisers
  (``method.optimizers()``) and schedulers are yours to save.

``training_step`` zeroes the gradients, runs backward and steps ``ctx.optimizer`` itself.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from ..data.base import DataBundle
from ..data.batch import Batch, collate
from ..methods.base import Method, TrainContext


class LoopContext(TrainContext):
    """A :class:`TrainContext` for a loop you write; build it with :func:`make_context`."""

    data: Optional[DataBundle] = None
    eval_batch_size: int = 256

    def begin_epoch(self, epoch: int) -> "LoopContext":
        self.epoch = int(epoch)
        return self

    def batches(self, method: Method, batch_size: int = 64, dataset=None) -> Iterator[Batch]:
        """This epoch's training batches on the context's device: the method's sampler order or a
        shuffle seeded by (seed, epoch); keeps ``batch_idx`` / ``num_batches`` / ``global_step``."""
        ds = dataset if dataset is not None else (self.data.train if self.data is not None else None)
        if ds is None:
            raise RuntimeError("make_context(..., data=...) or batches(..., dataset=...) is needed")
        from .trainer import _Tagged, sampler_order
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = method.sampler(len(ds), self.epoch, gen)
        if order is None:
            order = torch.randperm(len(ds), generator=gen).tolist()
        else:
            order = sampler_order(order, len(ds), method.name)
        tagged = _Tagged(ds)
        self.num_batches = (len(order) + batch_size - 1) // batch_size
        for i in range(self.num_batches):
            self.batch_idx = i
            yield collate([tagged[j] for j in order[i * batch_size:(i + 1) * batch_size]]).to(self.device)
            self.global_step += 1

    def reapply_lr_scales(self) -> None:
        """Call once after each step of a scheduler that sets rates from its base rates
        (``LambdaLR``, as the trainer uses): the group's new rate is unscaled, multiply it by the
        group's scale. A chainable scheduler (``StepLR``, ``ExponentialLR``, ``MultiStepLR``)
        keeps the scale in the rate by itself -- then do not call this (it would apply the scale
        twice)."""
        for g in self.optimizer.param_groups:
            name = g.get("name")
            if name in self._lr_scales:
                g["_unscaled_lr"] = g["lr"]
                g["lr"] = g["lr"] * self._lr_scales[name]

    def eval_batches(self, dataset, batch_size: Optional[int] = None) -> Iterator[Batch]:
        """Batches of ``dataset`` in order, on the context's device (evaluation, statistics)."""
        bs = batch_size or self.eval_batch_size
        for i in range(0, len(dataset), bs):
            yield collate([dataset[j] for j in range(i, min(i + bs, len(dataset)))]).to(self.device)


def make_context(model, optimizer: torch.optim.Optimizer, *, data: Optional[DataBundle] = None,
                 num_epochs: int = 1, device: Any = None, seed: int = 0, grad_clip: float = 0.0,
                 eval_batch_size: int = 256, batch_size: int = 64, holdout: Optional[float] = None,
                 method: Optional[Method] = None) -> LoopContext:
    """The context a method's hooks need, for your own loop (see the module docstring).

    ``holdout``: a fraction of ``data``'s training split to hold out (``ctx.holdout_batches()``);
    default: ``method.holdout_fraction()`` when ``method`` is given, else none. ``method``: its
    ``setup(model, ctx)`` is called on the new context. ``batch_size``:
    the default batch size of ``ctx.train_batches()``."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    if holdout is None:
        holdout = float(method.holdout_fraction()) if method is not None else 0.0
    held = None
    if holdout:
        if data is None:
            raise RuntimeError("make_context(..., holdout=...) needs data=...")
        from .build import carve_holdout
        data, held = carve_holdout(data, holdout, seed)

    def reset() -> None:
        optimizer.state.clear()

    def make_optimizer(params, lr=None) -> torch.optim.Optimizer:
        defaults = dict(optimizer.defaults)
        if lr is not None:
            defaults["lr"] = float(lr)
        return type(optimizer)(params, **defaults)

    def set_lr_scale(name: str, scale: float) -> None:
        import math
        groups = [g for g in optimizer.param_groups if g.get("name") == name]
        if not groups:
            known = [g.get("name") for g in optimizer.param_groups if g.get("name") is not None]
            raise KeyError(f"no parameter group named {name!r}; the optimiser's named groups are {known or 'none'}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"LR scale of group {name!r} must be a finite number >= 0, got {scale}")
        old = ctx._lr_scales.get(name, 1.0)
        for g in groups:
            # the group's rate holds unscaled x old scale (a chainable scheduler keeps that
            # product as it decays; after a LambdaLR step, reapply_lr_scales restores it)
            unscaled = g["lr"] / old if old > 0 else g.get("_unscaled_lr", g["lr"])
            g["_unscaled_lr"] = unscaled
            g["lr"] = unscaled * scale
        ctx._lr_scales[name] = scale

    ctx = LoopContext(model=model, optimizer=optimizer, num_epochs=num_epochs, device=device,
                      reset_optimizer=reset, train_size=len(data.train) if data is not None else 0,
                      train_labels=data.train.labels if data is not None else None, grad_clip=grad_clip,
                      seed=seed, make_optimizer=make_optimizer, set_lr_scale=set_lr_scale,
                      holdout_size=len(held) if held is not None else 0)
    ctx.data = data
    ctx.eval_batch_size = eval_batch_size
    if data is not None:
        ctx._train_eval_batches = lambda: ctx.eval_batches(data.train_eval)
        ctx._val_batches = lambda: ctx.eval_batches(data.val)

        def train_pass(generator: torch.Generator, bs: Optional[int] = None) -> Iterator[Batch]:
            ds, bs = data.train, bs or batch_size
            order = torch.randperm(len(ds), generator=generator).tolist()
            for i in range(0, len(order), bs):
                yield collate([ds[j] for j in order[i:i + bs]]).to(ctx.device)

        ctx._train_batches = train_pass
    if held is not None:
        ctx._holdout_batches = lambda bs=None: ctx.eval_batches(held, bs)
    if method is not None:
        method.setup(model, ctx)
    return ctx

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
  so your variable and any LR scheduler on it stay valid.

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
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = method.sampler(len(ds), self.epoch, gen)
        if order is None:
            order = torch.randperm(len(ds), generator=gen).tolist()
        order = [int(i) for i in order]
        self.num_batches = (len(order) + batch_size - 1) // batch_size
        for i in range(self.num_batches):
            self.batch_idx = i
            yield collate([ds[j] for j in order[i * batch_size:(i + 1) * batch_size]]).to(self.device)
            self.global_step += 1

    def eval_batches(self, dataset) -> Iterator[Batch]:
        """Batches of ``dataset`` in order, on the context's device (evaluation, statistics)."""
        bs = self.eval_batch_size
        for i in range(0, len(dataset), bs):
            yield collate([dataset[j] for j in range(i, min(i + bs, len(dataset)))]).to(self.device)


def make_context(model, optimizer: torch.optim.Optimizer, *, data: Optional[DataBundle] = None,
                 num_epochs: int = 1, device: Any = None, seed: int = 0, grad_clip: float = 0.0,
                 eval_batch_size: int = 256) -> LoopContext:
    """The context a method's hooks need, for your own loop (see the module docstring)."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"

    def reset() -> None:
        optimizer.state.clear()

    ctx = LoopContext(model=model, optimizer=optimizer, num_epochs=num_epochs, device=device,
                      reset_optimizer=reset, train_size=len(data.train) if data is not None else 0,
                      train_labels=data.train.labels if data is not None else None, grad_clip=grad_clip,
                      seed=seed)
    ctx.data = data
    ctx.eval_batch_size = eval_batch_size
    if data is not None:
        ctx._train_eval_batches = lambda: ctx.eval_batches(data.train_eval)
        ctx._val_batches = lambda: ctx.eval_batches(data.val)
    return ctx

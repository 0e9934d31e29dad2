"""The method interface: a balancing method is a small object with hooks into the one loop.

Hooks follow the four kinds of remedy (data, feed-forward, objective, optimisation):

=====================  ==========================================================================
hook                   called
=====================  ==========================================================================
``configure_model``    before the model is built: switch on unimodal heads, replace the fusion
``extra_modules``      once, after the model is built: modules the method trains with the model
                       (attached as ``model.extras``; saved in checkpoints, optimised)
``param_groups``       when the optimiser is built: groups of parameters; a group's ``lr_scale``
                       multiplies ``optim.lr`` for it (the schedule keeps the ratios)
``sampler``            each epoch: the order of training indices (``None`` = plain shuffle)
``on_epoch_start``     before each training epoch (phases, dataset-wide statistics)
``transform_batch``    each training batch, before the forward pass (input-level remedies)
``compute_loss``       each training batch: returns a :class:`LossOutput`
``after_backward``     after ``loss.backward()``, before the optimiser step (gradient edits;
                       a method with ``grad_clip_owner = "method"`` clips here itself)
``after_step``         after the optimiser step (per-batch state updates)
``on_epoch_end``       after each training epoch; may return logs
``predict``            evaluation: the method's prediction (default: fused logits)
``zero_out_logits``    evaluation: per-modality predictions with the others removed
``state_dict``         checkpointing of the method's own state
=====================  ==========================================================================

A method that needs its own control flow (alternating or staged steps) overrides
``training_step`` -- one step, never the loop.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..errors import MethodSetupError
from ..models.multimodal import ModelOutput, MultimodalModel
from ..registry import Registry


@dataclass
class NoOptions:
    """This method has no options."""


@dataclass
class LossOutput:
    loss: Tensor
    output: Optional[ModelOutput] = None  # for training accuracy (logits on this batch's rows)
    logs: Dict[str, float | Tensor] = field(default_factory=dict)  # per-batch means (0-d tensors allowed)
    labels: Optional[Tensor] = None  # labels matching output.logits when rows differ from the batch


class TrainContext:
    """What the trainer lends a method. Built by the trainer; tests can build one by hand."""

    def __init__(self, *, model: MultimodalModel, optimizer: Optional[torch.optim.Optimizer] = None,
                 num_epochs: int = 1, device: torch.device | str = "cpu",
                 reset_optimizer: Optional[Callable[[], None]] = None,
                 train_eval_batches: Optional[Callable[[], Iterable[Batch]]] = None,
                 val_batches: Optional[Callable[[], Iterable[Batch]]] = None,
                 train_size: int = 0, train_labels: Optional[Sequence[int]] = None,
                 autocast: Optional[Callable[[], Any]] = None, grad_clip: float = 0.0, seed: int = 0,
                 engine: Optional[Callable[..., Any]] = None):
        self.model = model
        self.optimizer = optimizer
        self.num_epochs = num_epochs
        self.device = torch.device(device)
        self.epoch = 0
        self.batch_idx = 0
        self.num_batches = 0
        self.global_step = 0
        self.train_size = train_size
        self.train_labels = train_labels
        self.seed = seed
        self.grad_clip = grad_clip
        self._reset_optimizer = reset_optimizer
        self._train_eval_batches = train_eval_batches
        self._val_batches = val_batches
        #: the metrics of the trainer's latest evaluation (``val_accuracy``, ``val_{m}_zero_out_accuracy``,
        #: ``val_{m}_head_accuracy``, ...); empty before the first one
        self.last_eval: Dict[str, float] = {}
        self._autocast = autocast
        self._engine = engine

    @property
    def modalities(self) -> List[str]:
        return self.model.modalities

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def reset_optimizer(self) -> None:
        """Replace the optimiser and LR schedule by fresh ones (same config, new state)."""
        if self._reset_optimizer is None:
            raise RuntimeError("this context cannot rebuild the optimiser")
        self._reset_optimizer()

    def train_eval_batches(self) -> Iterable[Batch]:
        """Batches of the whole training split with eval transforms, on the device, in a fixed
        order (this process's shard under DDP), for dataset-wide statistics."""
        if self._train_eval_batches is None:
            raise RuntimeError("this context has no training data pass")
        return self._train_eval_batches()

    def val_batches(self) -> Iterable[Batch]:
        """Batches of the whole validation split with eval transforms, on the device, in a fixed
        order (every process sees the whole split), for methods that read validation data."""
        if self._val_batches is None:
            raise RuntimeError("this context has no validation data")
        return self._val_batches()

    def autocast(self):
        if self._autocast is None:
            import contextlib
            return contextlib.nullcontext()
        return self._autocast()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` through the process-group engine.

        Every forward pass whose outputs a method will ``backward()`` must go through here: under
        ``torchrun`` the trainer runs it inside ``DistributedDataParallel.forward``, so the
        gradients of its outputs are averaged across processes during ``backward()`` (bucketed,
        overlapped). In one process it is the plain call. Return the loss (and any other tensors
        the loss depends on) from ``fn``: tensors, tuples, dicts and dataclasses are all seen.
        """
        if self._engine is None:
            return fn(self.model, *args, **kwargs)
        return self._engine(fn, *args, **kwargs)

    def clip_grad(self, parameters: Optional[Iterable[nn.Parameter]] = None) -> None:
        if self.grad_clip > 0:
            params = list(parameters if parameters is not None else self.model.parameters())
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)


class Method:
    """Base class. Subclasses set ``Options`` (a dataclass) and override the hooks they need."""

    Options: type = NoOptions
    #: registry name, set by :func:`register_method`
    name: str = "?"
    #: ``(min, max)`` number of modalities supported; ``None`` = no upper bound
    modality_range = (2, None)
    #: attributes saved by the default :meth:`state_dict`
    state_attrs: Sequence[str] = ()
    #: who clips gradients: "trainer" (``ctx.clip_grad()`` after ``after_backward``, ``train.grad_clip``)
    #: or "method" (the method clips, e.g. only under a condition, and the trainer does not)
    grad_clip_owner: str = "trainer"

    def __init__(self, options: Any, modalities: Sequence[str], num_classes: int):
        self.options = options if options is not None else self.Options()
        self.modalities = list(modalities)
        self.num_classes = num_classes
        lo, hi = self.modality_range
        m = len(self.modalities)
        if m < lo or (hi is not None and m > hi):
            allowed = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise MethodSetupError(f"method '{self.name}' supports {allowed} modalities; this dataset has {m} "
                                   f"({', '.join(self.modalities)})")

    # ----------------------------------------------------------------------------- set-up
    def configure_model(self, model_cfg: Any) -> None:
        """Adjust the ``model`` config before the model is built (e.g. switch on heads)."""

    def build_fusion(self, dims: Mapping[str, int], num_classes: int, model_cfg: Any) -> Optional[nn.Module]:
        """Return a fusion module to use instead of ``model.fusion`` (``None`` = keep the config's)."""
        return None

    def extra_modules(self, model: MultimodalModel) -> Dict[str, nn.Module]:
        return {}

    def param_groups(self, model: MultimodalModel) -> Optional[List[Dict[str, Any]]]:
        return None

    # ----------------------------------------------------------------------------- training
    def sampler(self, dataset_size: int, epoch: int, generator: torch.Generator) -> Optional[Sequence[int]]:
        return None

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        pass

    def transform_batch(self, batch: Batch, ctx: TrainContext) -> Batch:
        return batch

    def compute_loss(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> LossOutput:
        out = model(batch.inputs)
        return LossOutput(nn.functional.cross_entropy(out.logits, batch.labels), out)

    def after_backward(self, model: MultimodalModel, batch: Batch, result: LossOutput, ctx: TrainContext) -> None:
        pass

    def after_step(self, model: MultimodalModel, batch: Batch, result: LossOutput, ctx: TrainContext) -> None:
        pass

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> Optional[Dict[str, float]]:
        return None

    def training_step(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> LossOutput:
        """One optimisation step. Override only for a different control flow."""
        batch = self.transform_batch(batch, ctx)
        with ctx.autocast():
            result = ctx.run(lambda m, b: self.compute_loss(m, b, ctx), batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()  # under torchrun: gradients averaged across processes here (DDP)
        return self.finish_step(model, batch, result, ctx)

    def finish_step(self, model: MultimodalModel, batch: Batch, result: LossOutput, ctx: TrainContext) -> LossOutput:
        """The end of a step once the gradients are in place: ``after_backward``, clipping (when
        the trainer owns it), the optimiser step, ``after_step``. For ``training_step`` overrides."""
        self.after_backward(model, batch, result, ctx)
        if self.grad_clip_owner == "trainer":
            ctx.clip_grad()
        ctx.optimizer.step()
        self.after_step(model, batch, result, ctx)
        return result

    # ----------------------------------------------------------------------------- evaluation
    def predict(self, model: MultimodalModel, batch: Batch) -> ModelOutput:
        return model(batch.inputs)

    def zero_out_logits(self, model: MultimodalModel, output: ModelOutput) -> Dict[str, Tensor]:
        """Per-modality logits used for ``zero_out_accuracy``: the fused classifier with every
        other modality's features replaced by zeros."""
        return model.zero_out_logits(output.features)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.state_attrs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in self.state_attrs if k not in state]
        if missing:
            raise KeyError(f"method '{self.name}' state lacks {missing}")
        for k in self.state_attrs:
            setattr(self, k, copy.deepcopy(state[k]))


METHODS: Registry[type] = Registry("method")


def register_method(name: str, *, paper: str, kind: str, description: str, modalities: str = ">=2"):
    """Register a :class:`Method` subclass. ``kind``: data | feed-forward | objective |
    optimisation | baseline."""

    def deco(cls: type) -> type:
        cls.name = name
        METHODS.register(name, paper=paper, kind=kind, description=description, modalities=modalities)(cls)
        return cls

    return deco


def build_method(name: str, options: Any, modalities: Sequence[str], num_classes: int) -> Method:
    from . import load_all
    load_all()
    return METHODS.get(name)(options, modalities, num_classes)

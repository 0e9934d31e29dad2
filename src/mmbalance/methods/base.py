"""The method interface: a balancing method is a small object with hooks into the one loop.

Hooks follow the four kinds of remedy (data, feed-forward, objective, optimisation):

=====================  ==========================================================================
hook                   called
=====================  ==========================================================================
``configure_model``    before the model is built: switch on unimodal heads, replace the fusion
``rebuild_model``      once, after the model is built (heads and the method's fusion in place): a
                       model to train instead, e.g. one that interleaves cross-modal blocks between
                       encoder stages (:class:`~mmbalance.models.stages.StagedMultimodalModel`)
``extra_modules``      once, after the model is built: modules the method trains with the model
                       (attached as ``model.extras``; saved in checkpoints, optimised)
``holdout_fraction``   once, before anything sees the training split: the fraction of train the
                       method wants held out (``ctx.holdout_batches()``); ``data.method_holdout``
                       > 0 overrides it
``setup``              once, when the trainer (or ``make_context(..., method=)``) has built the
                       context: keep ``ctx`` / build method-owned optimisers (``ctx.make_optimizer``)
``param_groups``       when the optimiser is built: groups of parameters; a group's ``lr_scale``
                       multiplies ``optim.lr`` for it (the schedule keeps the ratios); a group's
                       ``name`` (unique) lets the method rescale it later (``ctx.set_lr_scale``)
``sampler``            each epoch: the order of training indices (``None`` = plain shuffle);
                       entries may be ``(index, tag)`` pairs, the tag arriving as ``batch.tag``
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
``optimizers``         checkpointing: the method's own optimisers by name (saved in every
                       checkpoint, restored after ``load_state_dict`` on resume)
``schedulers``         after each epoch: the method's own LR schedulers by name (stepped by the
                       trainer, checkpointed like the optimisers)
=====================  ==========================================================================

What the context offers besides the hooks (:class:`TrainContext`): ``ctx.run`` (every forward
that is backpropagated), ``ctx.val_batches()`` / ``ctx.last_eval`` (validation),
``ctx.train_eval_batches()`` (train split, eval transforms), ``ctx.train_batches()`` (train split,
train transforms, shuffled: extra training passes, e.g. on model copies),
``ctx.holdout_batches()`` / ``ctx.holdout_size`` (the held-out part of train),
``ctx.make_optimizer(params)`` (an optimiser of the run's config with fresh state),
``ctx.set_lr_scale(group, s)`` / ``ctx.lr_scales`` (dynamic per-group LR multipliers),
``ctx.reset_optimizer()``.

A method that needs its own control flow (alternating or staged steps) overrides
``training_step`` -- one step, never the loop; it backpropagates with ``ctx.backward(loss)`` and
steps with ``ctx.optimizer_step()`` (or ``finish_step``), so that ``train.precision=fp16``'s loss
scaling is applied and undone before gradient hooks. Logs are 0-d device tensors where they come
from tensors (``LossOutput.logs``): the trainer sums them on the device and reads them once per
epoch, so a step makes no host sync for logging.

Tuning ranges (``mmbalance tune``): the ``Options`` dataclass declares the options worth searching
in a plain class attribute (not a field) ``tune_space = {"alpha": ("log", 0.05, 2.0)}``; each value
is ``("log"|"float"|"int", low, high)`` or ``("choice", [a, b, ...])``. ``optim.lr`` is searched
for every method (see :mod:`mmbalance.bench.tune`); a method without ``tune_space`` gets only that.
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
                 engine: Optional[Callable[..., Any]] = None,
                 train_batches: Optional[Callable[[torch.Generator, Optional[int]], Iterable[Batch]]] = None,
                 holdout_batches: Optional[Callable[[Optional[int]], Iterable[Batch]]] = None,
                 holdout_size: int = 0,
                 make_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
                 set_lr_scale: Optional[Callable[[str, float], None]] = None):
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
        self._train_batches = train_batches
        self._holdout_batches = holdout_batches
        #: rows in the held-out part of train (``ctx.holdout_batches()``); 0 = no holdout
        self.holdout_size = int(holdout_size)
        self._make_optimizer = make_optimizer
        self._set_lr_scale = set_lr_scale
        #: the dynamic LR multipliers set with :meth:`set_lr_scale` (the trainer's own dict)
        self._lr_scales: Dict[str, float] = {}
        self._pass_epoch: Optional[int] = None
        self._pass_calls = 0

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
        """Batches of the whole training split (without the method holdout, if any) with eval
        transforms, on the device, in a fixed order (this process's shard under DDP), for
        dataset-wide statistics."""
        if self._train_eval_batches is None:
            raise RuntimeError("this context has no training data pass")
        return self._train_eval_batches()

    def val_batches(self) -> Iterable[Batch]:
        """Batches of the whole validation split with eval transforms, on the device, in a fixed
        order (every process sees the whole split), for methods that read validation data."""
        if self._val_batches is None:
            raise RuntimeError("this context has no validation data")
        return self._val_batches()

    def holdout_batches(self, batch_size: Optional[int] = None) -> Iterable[Batch]:
        """Batches of the held-out part of the training split (``data.method_holdout`` or
        :meth:`Method.holdout_fraction`): eval transforms, a fixed order, on the device, the whole
        holdout in every process. Those rows were removed from train before anything saw it (the
        sampler, ``train_batches``, ``train_eval_batches`` never yield them); stratified by label and
        seeded by ``train.seed``, so a resumed run holds out the same rows. ``batch_size``: default
        ``data.eval_batch_size``."""
        if self._holdout_batches is None or self.holdout_size == 0:
            raise RuntimeError("this run has no held-out split: set data.method_holdout=<fraction in (0, 0.5)> "
                               "or return a fraction from Method.holdout_fraction()")
        return self._holdout_batches(batch_size)

    def train_pass_seed(self) -> int:
        """The seed of the next default ``train_batches`` shuffle: from (seed, epoch, the number of
        earlier passes this epoch), so reruns and resumed runs shuffle identically."""
        if self._pass_epoch != self.epoch:
            self._pass_epoch, self._pass_calls = self.epoch, 0
        self._pass_calls += 1
        return (self.seed * 1_000_003 + self.epoch * 7919 + self._pass_calls * 104_729 + 29) % (2**31)

    def train_batches(self, generator: Optional[torch.Generator] = None,
                      batch_size: Optional[int] = None) -> Iterable[Batch]:
        """Batches of the (non-held-out) training split with TRAIN transforms, shuffled with
        ``generator``, on the device; this process's shard under DDP (padded so every process gets
        as many batches). For extra training passes (look-ahead copies, in-run unimodal teachers).
        Default generator: seeded by :meth:`train_pass_seed`. ``batch_size``: default
        ``data.batch_size``. Rows are untagged (``batch.tag`` -1); the method's sampler is not used."""
        if self._train_batches is None:
            raise RuntimeError("this context has no training data pass")
        if generator is None:
            generator = torch.Generator().manual_seed(self.train_pass_seed())
        return self._train_batches(generator, batch_size)

    def make_optimizer(self, params: Any, lr: Optional[float] = None) -> torch.optim.Optimizer:
        """A new optimiser over ``params`` (parameters or param-group dicts) with the run's optimiser
        config (name, lr, momentum, weight decay, betas) and fresh state; ``lr`` overrides the rate.
        It is the method's own: step it yourself, and return it from :meth:`Method.optimizers` to
        have it checkpointed."""
        if self._make_optimizer is None:
            raise RuntimeError("this context cannot build optimisers")
        return self._make_optimizer(params, lr)

    def set_lr_scale(self, group: str, scale: float) -> None:
        """Multiply the learning rate of the main optimiser's parameter group named ``group``
        (``"name"`` in :meth:`Method.param_groups`) by ``scale`` from now on: effective lr =
        scheduled lr x the group's static ``lr_scale`` x ``scale``. Not compounding (setting 0.5
        twice gives 0.5); kept across epochs and schedule steps until changed; checkpointed and
        restored on resume. Unknown name -> KeyError naming the known groups."""
        if self._set_lr_scale is None:
            raise RuntimeError("this context cannot rescale learning rates")
        self._set_lr_scale(group, scale)

    @property
    def lr_scales(self) -> Dict[str, float]:
        """The dynamic LR multipliers set so far (group name -> scale; unset groups are 1)."""
        return dict(self._lr_scales)

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

    #: ``train.precision=fp16``: the trainer's ``torch.amp.GradScaler`` (``None`` otherwise)
    grad_scaler: Optional[Any] = None
    _scaled = False
    _unscaled = False

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``; under ``train.precision=fp16`` the loss is scaled first
        (GradScaler). Use it for the backward passes whose gradients the main optimiser applies
        (``Method.training_step`` does); :meth:`unscale_grads` / :meth:`optimizer_step` undo the
        scale before any gradient hook reads the gradients."""
        if self.grad_scaler is None:
            loss.backward(**kwargs)
            return
        self.grad_scaler.scale(loss).backward(**kwargs)
        self._scaled = True

    def unscale_grads(self) -> None:
        """Divide the gradients of a scaled backward by the loss scale (once per step; a no-op
        without fp16). ``Method.finish_step`` calls it before ``after_backward``, so gradient
        edits and clipping see true gradients."""
        if self.grad_scaler is not None and self._scaled and not self._unscaled:
            self.grad_scaler.unscale_(self.optimizer)
            self._unscaled = True

    def optimizer_step(self) -> None:
        """The main optimiser's step: ``optimizer.step()``, or under fp16 the GradScaler's step
        (skipped when a gradient is inf/nan) and scale update."""
        if self.grad_scaler is not None and self._scaled:
            self.unscale_grads()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self._scaled = self._unscaled = False

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
    #: the run's ``data.name`` (set by ``build_run``; "" when the method was built on its own), e.g. for
    #: checking that weights loaded from another run come from the same dataset
    data_name: str = ""

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

    def rebuild_model(self, model: MultimodalModel) -> Optional[MultimodalModel]:
        """Return a :class:`MultimodalModel` to train instead of ``model`` (``None`` = keep it).

        For mid-level fusion: build a :class:`~mmbalance.models.stages.StagedMultimodalModel`
        from ``model`` (its encoders' ``stages()``, same encoders, fusion and heads) with the
        method's cross-modal blocks between stages; it must keep the modalities and classes.
        Called once per run (and again, identically, when a run is resumed or rebuilt for
        evaluation), after the heads and :meth:`build_fusion` and before :meth:`extra_modules`
        and the optimiser. An encoder without stages raises a clear ``ModelSetupError``."""
        return None

    def extra_modules(self, model: MultimodalModel) -> Dict[str, nn.Module]:
        return {}

    def param_groups(self, model: MultimodalModel) -> Optional[List[Dict[str, Any]]]:
        """Groups for the main optimiser (``None`` = all trainable parameters in one group). Each
        dict: ``params``, optional ``lr_scale`` (static factor of ``optim.lr``), optional ``name``
        (unique; :meth:`TrainContext.set_lr_scale` rescales the group by name), other optimiser keys."""
        return None

    def setup(self, model: MultimodalModel, ctx: TrainContext) -> None:
        """Called once when the run's context exists, before any training or resume: a method may
        keep ``ctx`` and build its own optimisers here (``ctx.make_optimizer``)."""

    def holdout_fraction(self) -> float:
        """The fraction of the training split this method needs held out (``ctx.holdout_batches()``),
        in [0, 0.5); 0 = none. ``data.method_holdout`` > 0 takes precedence."""
        return 0.0

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        """The method's own optimisers by name (default none). The trainer saves each one's
        ``state_dict`` in every checkpoint (``method_optimizers``); on resume, after the model
        weights and :meth:`load_state_dict`, it calls ``optimizers()`` again and loads the saved
        states into the optimisers returned under the same names -- so create them
        deterministically from the method's own state (e.g. lazily with ``ctx.make_optimizer`` in
        ``on_epoch_start``, or in :meth:`setup`). A saved name not returned right after
        ``load_state_dict`` is loaded as soon as it is, after the next ``on_epoch_start``; still
        missing then is an error.
        The method steps them itself; an optimiser over parameters the main optimiser also owns
        is the method's responsibility (zero and step them consistently)."""
        return {}

    def schedulers(self) -> Dict[str, Any]:
        """The method's own LR schedulers by name (objects with ``step()``, ``state_dict()`` and
        ``load_state_dict()``): stepped by the trainer after each epoch (after the main schedule)
        and checkpointed like :meth:`optimizers` (``method_schedulers``)."""
        return {}

    # ----------------------------------------------------------------------------- training
    def sampler(self, dataset_size: int, epoch: int, generator: torch.Generator) -> Optional[Sequence[Any]]:
        """This epoch's order of training indices (``None`` = a shuffle). Entries are indices
        (``int``) or ``(index, tag)`` pairs (any mix; an index may repeat with different tags); a
        row's tag arrives as ``batch.tag`` (-1 for a plain index). Indices are positions in the
        training split without the holdout (``dataset_size`` rows)."""
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
        ctx.backward(result.loss)  # under torchrun: gradients averaged across processes here (DDP)
        return self.finish_step(model, batch, result, ctx)

    def finish_step(self, model: MultimodalModel, batch: Batch, result: LossOutput, ctx: TrainContext) -> LossOutput:
        """The end of a step once the gradients are in place: ``after_backward``, clipping (when
        the trainer owns it), the optimiser step, ``after_step``. For ``training_step`` overrides.
        Under fp16 the gradients are unscaled first (``after_backward`` sees true gradients)."""
        ctx.unscale_grads()
        self.after_backward(model, batch, result, ctx)
        if self.grad_clip_owner == "trainer":
            ctx.clip_grad()
        ctx.optimizer_step()
        self.after_step(model, batch, result, ctx)
        return result

    # ----------------------------------------------------------------------------- evaluation
    def predict(self, model: MultimodalModel, batch: Batch) -> ModelOutput:
        return model(batch.inputs)

    def zero_out_logits(self, model: MultimodalModel, output: ModelOutput) -> Dict[str, Tensor]:
        """Per-modality logits used for ``zero_out_accuracy``: the fused classifier with every
        other modality's features replaced by zeros (or ``output.zero_out`` when ``predict``
        filled it)."""
        if output.zero_out:
            return output.zero_out
        return model.zero_out_logits(output.features)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """The attributes named in ``state_attrs``, copied. Values must be tensors and plain Python
        values (checkpoints load with ``torch.load(weights_only=True)``). Keep per-sample arrays
        and weight copies as tensors: they are saved as tensors (no Python-list copies). Size:
        a copy of weights (D&R's initial encoder weights) adds their size again -- D&R's
        checkpoint holds the encoders twice."""
        return {k: _copy_value(getattr(self, k)) for k in self.state_attrs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in self.state_attrs if k not in state]
        if missing:
            raise KeyError(f"method '{self.name}' state lacks {missing}")
        for k in self.state_attrs:
            setattr(self, k, copy.deepcopy(state[k]))


def _copy_value(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().clone()
    return copy.deepcopy(v)


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

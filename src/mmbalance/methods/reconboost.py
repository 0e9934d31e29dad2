"""ReconBoost: alternating boosting with modality reconcilement.

Paper: Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality Reconcilement",
ICML 2024 (arXiv 2405.09321). Code followed: huacong/ReconBoost@14ab57a (``train.py::main``, the
stage loop; ``models/dynamic_net.py::DynamicNet`` and ``Head``), as specified in
``shared/specs/baselines.md`` §4.12. Math in :mod:`mmbalance.functional.reconboost`.

Model (``build_fusion`` -> :class:`BoostEnsemble`): every modality's encoder feeds ONE shared
head ``Linear(d, 256) -> ReLU -> Linear(256, K)`` (the code's ``common_space=True``; spec §3
convention (c)), so all encoders must output the same size ``d`` (else ``MethodSetupError``).
Learner ``f_m = head(z_m)``; ensemble ``F = beta * sum_{m in ensemble} f_m`` with a learnable
scalar ``beta`` (``boost_rate``, init 1.0). The configured ``model.fusion`` is not used.

Stages (``training_step``, phase from the epoch): epoch ``e`` -> stage ``s = e // (E_b + E_c)``,
boosting while ``e mod (E_b + E_c) < E_b``, then correcting. Stage s boosts modality
``modalities[s mod M]`` (the dataset's modality order; the code starts with audio).

* boosting (``boost_epochs`` = 4, the code's ``epochs_per_stage``): one optimiser over encoder m
  and the shared head (not ``beta``), created FRESH when the phase starts.
  ``F_-m = beta * sum_{j in ensemble, j != m} f_j`` under ``no_grad`` (the other learners in train
  mode, as ``DynamicNet.forward``), ``q_i = softmax(F_-m)_i[y_i]``,
  ``l_i = -(1/K)(w1 - w2 q_i) log softmax(f_m)_i[y_i]``; from stage 1 on
  ``L = mean_i l_i + alpha * MSE(softmax(f_m), softmax(f_prev))`` with ``f_prev`` the learner of
  the previous stage's modality (for M = 2: the other modality, the code's ``pre_model``), detached.
* correction (``correct_epochs`` = 4, the code's ``correct_epoch``): one optimiser over the
  ensemble's encoders, the head and ``beta``, created FRESH when the phase starts;
  ``L = CE(beta * sum_{m in ensemble} f_m, y)``.
* The ensemble grows as in ``DynamicNet.add``: a modality's learner joins at the end of its first
  boosting phase (without ``--use_pretrain``, the code's default). So during stage s's boosting the
  ensemble holds the first ``min(s, M)`` modalities, from its correction on ``min(s + 1, M)``. With
  an empty ensemble (stage 0) the code's ``F_-m`` is the constant ``c0`` expanded to one column,
  whose softmax is 1: ``q_i = 1``.

Optimisers (gap G): both are the method's own, built with ``ctx.make_optimizer`` (the run's
``optim`` config: name, momentum, weight decay; the code: SGD, momentum 0.9, weight decay 5e-4)
with ``lr = boost_lr`` / ``correct_lr`` (``None`` = ``optim.lr``; the code: 0.01 both, set by the cremad and ave presets), times the
stage decay ``lr_decay ** (s // lr_decay_stages)`` (``lr_decay_stages`` 0 = constant; presets:
CREMA-D x0.1 every 30 stages, AVE x0.5 every 40 -- the code decays AVE once, at stage 40, which
only differs from stage 80 on), times the run's schedule factor (``schedule.*``; 1 with the
default ``schedule.name=none``) at each epoch start. The live one is returned by
:meth:`optimizers` under ``boost`` or ``correct``, so the trainer checkpoints its state and a
run resumed in the middle of a phase continues with the same momentum. The main optimiser of the
run is never stepped (its ``lr`` column in ``metrics.jsonl`` is the schedule's, not ReconBoost's:
``on_epoch_end`` logs ``stage``, ``boosting`` (1 / 0) and ``phase_lr``, the live optimiser's rate).
Clipping: ``train.grad_clip`` over the live optimiser's parameters. ``train.precision=fp16`` (loss
scaling for the main optimiser) is refused.

Evaluation: ``predict`` is the ensemble ``beta * sum f_m`` over the first ``min(s + 1, M)``
modalities (the count lives in the fusion, so a checkpoint evaluates as it was trained).
``zero_out_logits``: each learner alone, ``head(z_m)`` (the code's ``uni_eval``).

Decisions and deviations:
* DECISION (spec): ``ga_grad=true`` (the paper's reading: the reconcilement term has a gradient
  to ``f_m``); ``ga_grad=false`` reproduces the released code, where both arguments of the MSE are
  detached (a no-op term). ``class_mean=true``: the code's ``1/K`` factor in the boosting loss.
* The code evaluates only at the end of a stage (on the test set) and keeps the best for
  ``s >= 3``; here the trainer evaluates every ``train.eval_every`` epochs on val and keeps the best
  val epoch. An evaluation during stage s's boosting phase scores the ensemble *including* the
  learner being boosted (the stage's ensemble as it would be without correction); the code never
  evaluates there (its ensemble would then lack that learner, and at stage 0 be the constant c0).
* ``f_prev`` reuses the features of ``F_-m``'s forward pass (the code runs ``pre_model`` a second
  time with gradients it then detaches: same values, wasted work, BN statistics updated twice).
* Unimodal pre-training (``--use_pretrain``) is not done: the run starts from the model's init.
* The head uses torch's default ``nn.Linear`` initialisation (as the code's ``Head``), hidden
  size ``head_hidden`` (256).
* Distributed: both phases run their forward through ``ctx.run``, so DDP averages the gradients;
  ``F_-m`` and ``f_prev`` are per-sample and need no reduction. BatchNorm statistics of the other
  encoders update during ``F_-m`` (as the code) on each process's own shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MethodSetupError
from ..functional.reconboost import (
    BOOST,
    CORRECT,
    boosting_loss,
    ensemble_size,
    phase_of,
    reconcilement_loss,
    stage_lr,
)
from ..models.fusion import Fusion
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method


@dataclass
class ReconBoostOptions:
    boost_epochs: int = 4  # E_b: epochs of each stage's boosting phase (the code's epochs_per_stage)
    correct_epochs: int = 4  # E_c: epochs of each stage's correction phase (the code's correct_epoch)
    w1: float = 5.0  # boosting-loss weight of the learner's own CE (the code: 5 CREMA-D, 4 AVE / ModelNet40)
    w2: float = 1.0  # boosting-loss weight of the ensemble's true-class probability
    alpha: float = 0.5  # weight of the reconcilement (GA) term, from stage 1 on
    ga_grad: bool = True  # true: the GA term has a gradient to f_m (paper); false: detached (released code)
    class_mean: bool = True  # divide the boosting loss by K (the code's mean over one-hot classes)
    boost_rate: float = 1.0  # initial value of the learnable ensemble scale beta
    head_hidden: int = 256  # hidden size of the shared head
    boost_lr: Optional[float] = None  # lr of the boosting optimiser; None = optim.lr (the code: 0.01)
    correct_lr: Optional[float] = None  # lr of the correction optimiser; None = optim.lr (the code: 0.01)
    lr_decay_stages: int = 0  # multiply both rates by lr_decay every this many stages; 0 = never
    lr_decay: float = 0.1  # the per-stage decay factor

    def validate(self):
        errs = []
        if self.boost_epochs < 1:
            errs.append(f"boost_epochs must be >= 1, got {self.boost_epochs}")
        if self.correct_epochs < 0:
            errs.append(f"correct_epochs must be >= 0, got {self.correct_epochs}")
        for k in ("w1", "w2", "alpha"):
            if getattr(self, k) < 0:
                errs.append(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.head_hidden < 1:
            errs.append(f"head_hidden must be >= 1, got {self.head_hidden}")
        for k in ("boost_lr", "correct_lr"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                errs.append(f"{k} must be > 0 (or null for optim.lr), got {v}")
        if self.lr_decay_stages < 0:
            errs.append(f"lr_decay_stages must be >= 0 (0 = no decay), got {self.lr_decay_stages}")
        if not self.lr_decay > 0:
            errs.append(f"lr_decay must be > 0, got {self.lr_decay}")
        return errs


RECONBOOST_PRESETS = {
    # the code's m_lr = e_lr = 0.01 on both (its phase optimisers are SGD, momentum 0.9, wd 5e-4)
    "cremad": {"method": {"w1": 5.0, "lr_decay_stages": 30, "lr_decay": 0.1, "boost_lr": 0.01, "correct_lr": 0.01}},
    "ave": {"method": {"w1": 4.0, "lr_decay_stages": 40, "lr_decay": 0.5, "boost_lr": 0.01, "correct_lr": 0.01}},
}


class BoostEnsemble(Fusion):
    """The shared head on every modality and the learnable scale ``beta``; fused logits =
    ``beta * sum f_m`` over the first ``active`` modalities (a buffer: saved with the weights)."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int = 256, boost_rate: float = 1.0):
        super().__init__(dims, num_classes)
        sizes = set(self.dims.values())
        if len(sizes) != 1:
            raise MethodSetupError(f"method 'reconboost' applies one shared head to every modality, so all encoders "
                                   f"must output the same size; got {self.dims}. Use encoders with equal feature "
                                   f"sizes (model.feature_dim applies to the small encoders; ResNet-18 gives 512)")
        d = sizes.pop()
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.beta = nn.Parameter(torch.tensor(float(boost_rate)))
        self.register_buffer("active", torch.tensor(len(self.modalities), dtype=torch.long))

    def members(self, count: Optional[int] = None) -> List[str]:
        n = int(self.active) if count is None else int(count)
        return self.modalities[:n]

    def modality_logits(self, features):
        return {m: self.head(features[m]) for m in self.modalities if m in features}

    def ensemble(self, features: Mapping[str, Tensor], members: List[str]) -> Tensor:
        out = None
        for m in members:
            f = self.head(features[m])
            out = f if out is None else out + f
        return self.beta * out

    def forward(self, features):
        return self.ensemble(features, self.members())


def _boost_forward(model, inputs, labels, m: str, others: List[str], prev: Optional[str], o: "ReconBoostOptions"):
    """The boosting step's forward (through ``ctx.run``): ``(loss, l_boost, l_ga, f_m, F_-m)``."""
    fusion = model.fusion
    with torch.no_grad():
        feats = model.encode(inputs, others) if others else {}
        f_others = fusion.ensemble(feats, others) if others else None
    z = model.encode(inputs, [m])[m]
    f_m = fusion.head(z)
    l_boost = boosting_loss(f_m, f_others, labels, o.w1, o.w2, o.class_mean).mean()
    loss, l_ga = l_boost, None
    if prev is not None:
        with torch.no_grad():
            f_prev = fusion.head(feats[prev])
        l_ga = reconcilement_loss(f_m, f_prev, grad=o.ga_grad)
        loss = loss + o.alpha * l_ga
    return loss, l_boost, l_ga, f_m, f_others


def _correct_forward(model, inputs, labels, members: List[str]):
    feats = model.encode(inputs, members)
    logits = model.fusion.ensemble(feats, members)
    return F.cross_entropy(logits.float(), labels), logits, feats


@register_method("reconboost", paper="Hua et al., ICML 2024", kind="optimisation", modalities=">=2",
                 description="ReconBoost: staged alternating boosting of one modality's learner (shared head) "
                             "with reconcilement, then ensemble correction; fresh optimisers per phase")
class ReconBoost(Method):
    Options = ReconBoostOptions
    presets = RECONBOOST_PRESETS
    modality_range = (2, None)
    #: ``opt_key``: ``[stage, phase]`` of the live optimiser (None before the first epoch)
    state_attrs = ("opt_key",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.opt_key: Optional[list] = None
        self._opt: Optional[torch.optim.Optimizer] = None
        self._ctx = None
        self._model = None

    # ------------------------------------------------------------------------------ set-up
    def build_fusion(self, dims, num_classes, model_cfg):
        o = self.options
        return BoostEnsemble(dims, num_classes, o.head_hidden, o.boost_rate)

    def setup(self, model, ctx):
        if getattr(ctx, "grad_scaler", None) is not None:
            raise MethodSetupError("method 'reconboost' steps its own optimisers, which fp16 loss scaling does not "
                                   "cover; use train.precision=bf16 or fp32")
        self._bind(model, ctx)

    def _bind(self, model, ctx) -> None:
        if not isinstance(model.fusion, BoostEnsemble):
            raise MethodSetupError("method 'reconboost' needs its ensemble fusion (built by ReconBoost.build_fusion; "
                                   "build the model through the method: prepare_model / Trainer)")
        self._model, self._ctx = model, ctx

    def phase(self, epoch: int):
        o = self.options
        return phase_of(epoch, o.boost_epochs, o.correct_epochs, len(self.modalities))

    def phase_params(self, model, stage: int, name: str) -> List[nn.Parameter]:
        """The parameters a phase optimises: encoder m + head (boost), or the ensemble's encoders +
        head + beta (correct)."""
        fusion = model.fusion
        if name == BOOST:
            m = self.modalities[stage % len(self.modalities)]
            ps = list(model.encoders[m].parameters()) + list(fusion.head.parameters())
        else:
            members = fusion.members(ensemble_size(stage, CORRECT, len(self.modalities)))
            ps = [p for m in members for p in model.encoders[m].parameters()]
            ps += list(fusion.head.parameters()) + [fusion.beta]
        return [p for p in ps if p.requires_grad]

    def _base_lr(self, name: str) -> Optional[float]:
        return self.options.boost_lr if name == BOOST else self.options.correct_lr

    def _build(self) -> None:
        stage, name = self.opt_key
        self._opt = self._ctx.make_optimizer(self.phase_params(self._model, stage, name), lr=self._base_lr(name))
        for g in self._opt.param_groups:
            g["base_lr"] = g["lr"]

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        if self.opt_key is None:
            return {}
        if self._opt is None:
            if self._ctx is None:
                return {}
            self._build()
        return {self.opt_key[1]: self._opt}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.opt_key = list(self.opt_key) if self.opt_key is not None else None
        self._opt = None  # rebuilt from opt_key (optimizers()), its state loaded by the trainer

    # ------------------------------------------------------------------------------ training
    def on_epoch_start(self, model, ctx):
        if self._ctx is not ctx or self._model is not model:
            self._bind(model, ctx)
        ph = self.phase(ctx.epoch)
        model.fusion.active.fill_(ensemble_size(ph.stage, CORRECT, len(self.modalities)))
        key = [ph.stage, ph.name]
        if self.opt_key != key:  # a new phase: a fresh optimiser
            self.opt_key, self._opt = key, None
        if self._opt is None:
            self._build()
        o = self.options
        run = 1.0
        g0 = ctx.optimizer.param_groups[0] if ctx.optimizer is not None and ctx.optimizer.param_groups else {}
        if g0.get("initial_lr"):
            run = float(g0["lr"]) / float(g0["initial_lr"])
        for g in self._opt.param_groups:
            g["lr"] = stage_lr(g["base_lr"], ph.stage, o.lr_decay_stages, o.lr_decay) * run

    def training_step(self, model, batch, ctx):
        if self._opt is None:
            self.on_epoch_start(model, ctx)
        batch = self.transform_batch(batch, ctx)
        stage, name = self.opt_key
        M = len(self.modalities)
        fusion = model.fusion
        opt = self._opt
        opt.zero_grad(set_to_none=True)
        if name == BOOST:
            m = self.modalities[stage % M]
            others = [j for j in fusion.members(ensemble_size(stage, BOOST, M)) if j != m]
            prev = self.modalities[(stage - 1) % M] if stage >= 1 and self.options.alpha > 0 else None
            with ctx.autocast():
                loss, l_boost, l_ga, f_m, f_others = ctx.run(_boost_forward, batch.inputs, batch.labels, m, others,
                                                             prev, self.options)
            loss.backward()
            ctx.clip_grad(p for g in opt.param_groups for p in g["params"])
            opt.step()
            with torch.no_grad():
                fused = fusion.beta.detach() * f_m.detach()
                if f_others is not None:
                    fused = fused + f_others
            logs = {"loss_boost": l_boost.detach(), "beta": float(fusion.beta.detach())}
            if l_ga is not None:
                logs["loss_ga"] = l_ga.detach()
            return LossOutput(loss.detach(), ModelOutput(fused, {}, {}), logs)
        members = fusion.members(ensemble_size(stage, CORRECT, M))
        with ctx.autocast():
            loss, logits, feats = ctx.run(_correct_forward, batch.inputs, batch.labels, members)
        loss.backward()
        ctx.clip_grad(p for g in opt.param_groups for p in g["params"])
        opt.step()
        return LossOutput(loss.detach(), ModelOutput(logits.detach(), {k: v.detach() for k, v in feats.items()}, {}),
                          {"loss_correct": loss.detach(), "beta": float(fusion.beta.detach())})

    def on_epoch_end(self, model, ctx):
        if self.opt_key is None or self._opt is None:
            return None
        stage, name = self.opt_key
        return {"stage": float(stage), "boosting": 1.0 if name == BOOST else 0.0,
                "phase_lr": float(self._opt.param_groups[0]["lr"])}

    def zero_out_logits(self, model, output):
        """Each learner alone, ``head(z_m)`` (the code's unimodal evaluation)."""
        return model.fusion.modality_logits(output.features)

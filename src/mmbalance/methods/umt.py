"""UMT (Uni-Modal Teacher) and UME (Uni-Modal Ensemble).

Paper: Du, Teng, ..., Zhao, "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning",
ICML 2023 (earlier arXiv 2021: "Improving Multi-Modal Learning with Uni-Modal Teachers"). No
official code was found (spec ``baselines.md`` §4.11); read: the peer
GeWu-Lab/BalanceBenchmark@4c1482f ``balancemm/trainer/UMT_trainer.py``.

Teachers / members are unimodal models: encoder m and a classifier used with every other
modality's features replaced by zeros -- exactly what the ``unimodal`` method trains (a copy of the
config's fusion as the classifier). They come either

* from earlier mmbalance runs: ``method.teachers="x1=runs/a,x2=runs/b"`` (or a mapping in YAML /
  Python) names, per modality, a run folder (its ``checkpoints/best.pt``) or a checkpoint file of
  a ``unimodal`` run of that modality on the same dataset (``data.name``); or
* from an in-run unimodal stage (modalities without a listed run): before the first epoch, each
  teacher (a copy of the student's initial encoder and fusion) is trained alone with cross-entropy
  for ``teacher_epochs`` passes over the training split (``ctx.train_batches()``, train
  transforms) with its own optimiser of the run's config (``ctx.make_optimizer``); every teacher
  steps on the same batches, each with its own loss.

**UMT** (``umt``): ``L = CE(fuse(z), y) + weight * sum_m MSE(z_m, t_m)``, ``z_m`` the student's
encoder features, ``t_m`` the frozen teacher encoder's (eval mode, no grad; MSE = mean over the
``B * d_m`` elements). The student predicts with its fused classifier.

**UME** (``ume``): the M unimodal members are the model's encoders, each with its own classifier
(``model.extras["ume_classifiers"][m]``, a copy of the fusion); trained side by side in the run,
``L = sum_m CE(classifier_m(z_m alone), y)`` (each member gets only its own gradient: M unimodal
models), or loaded from unimodal runs (``teachers``, then nothing is trained: every epoch is an
evaluation pass over train; run it with ``epochs=1``). Prediction: ``log(mean_m softmax(l_m))``;
per-modality predictions (zero-out metrics) are the members alone.

Decisions and deviations (spec §4.11):

* Teachers frozen in EVAL mode (BatchNorm running statistics fixed; the peer runs them in train
  mode under ``no_grad``, so their statistics drift -- a bug). DECISION.
* ``weight`` (lambda) default 10 (the peer's ``scaling``), until the PDF is read; active in every
  epoch (the peer's window 0..80 covers its whole run).
* Student encoders initialised randomly, not from the teachers (DECISION); ``init_from_teacher=true``
  copies the teachers' encoder weights into the student before the first step.
* In-run teachers start from the student's initial weights (a separate ``unimodal`` run with the
  same seed starts from the same ones) and train at the constant ``optim.lr`` (the run's schedule is
  not applied to the teacher stage). ``teacher_epochs=0`` means ``train.epochs``: the teachers get
  the budget of a separate unimodal run. The whole stage runs inside the first epoch's
  ``on_epoch_start``, so it is part of ``train_seconds`` of that epoch; its sample count is logged as
  ``teacher_samples`` (rows x teachers). The trainer's ``samples_seen`` counts the stage's rows
  once each (every ``ctx.train_batches`` row does), beside the student's steps.
* The teacher encoders are part of the model (``model.extras``, parameters frozen, excluded from
  the optimiser): checkpoints carry them, so a resumed run needs neither the teacher runs nor the
  stage again. Under DDP the teacher stage averages its gradients over processes by hand.
* No projection between student and teacher features (paper, recollection): the teacher encoder
  is the student's architecture, so the shapes agree; a loaded run whose encoder shapes differ is
  refused, naming the parameter.
* ``weight=0`` (and ``init_from_teacher=false``) needs no teachers: no stage runs and UMT is joint
  training.
* UME: the spec maps UME to ``ensemble`` (separate linear heads); here the members' classifiers
  are copies of the config's fusion used with zeros (the ``unimodal`` method's classifier) so that
  in-run members and members loaded from ``unimodal`` runs are the same model. With a concat
  fusion both are linear heads.

State: ``ready`` (bool: teachers/members in place). Logs: ``loss_ce``, ``loss_distill`` (UMT, per
batch); ``loss_{m}`` (UME, per batch); ``teacher_samples`` and ``teacher_acc_{m}`` (training
accuracy of each in-run teacher in its last pass) in the first epoch.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..errors import MethodSetupError, MMBalanceError
from ..functional.umt import alone, distillation_loss, ensemble_log_probs
from ..models.multimodal import ModelOutput
from ..registry import suggest
from .base import LossOutput, Method, register_method


# ------------------------------------------------------------------------------------ teachers
def parse_teachers(spec: Any) -> dict[str, str]:
    """``"m1=path1,m2=path2"`` or a mapping -> ``{modality: path}`` ("" / None -> {})."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        out = {str(k).strip(): str(v).strip() for k, v in spec.items()}
    elif isinstance(spec, str):
        out = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"teachers: '{part}' is not modality=run_folder (e.g. "
                                 f"\"audio=runs/uni_audio,visual=runs/uni_visual\")")
            k, v = part.split("=", 1)
            k, v = k.strip(), v.strip()
            if k in out:
                raise ValueError(f"teachers: modality '{k}' is listed twice")
            out[k] = v
    else:
        raise ValueError(f"teachers must be a string \"modality=run_folder,...\" or a mapping, got {spec!r}")
    empty = [k for k, v in out.items() if not k or not v]
    if empty:
        raise ValueError(f"teachers: an entry has an empty modality or folder ({spec!r})")
    return out


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_file() else p / "checkpoints" / "best.pt"


def load_unimodal_run(path: str, modality: str, data_name: str, key: str = "method.teachers") -> dict[str, Any]:
    """The ``best.pt`` state of a finished ``unimodal`` run of ``modality`` (a run folder or a
    checkpoint file), checked: it exists and reads, it is a unimodal run of that modality, and it was
    trained on ``data_name`` (when known). Errors name the option, the modality and the folder."""
    from ..training.checkpoint import load_checkpoint
    where = f"{key}: teacher run '{path}' for modality '{modality}'"
    p = Path(path)
    if not p.exists():
        raise MethodSetupError(f"{where} does not exist")
    ck = _checkpoint_path(path)
    if not ck.is_file():
        raise MethodSetupError(f"{where} has no checkpoint {ck} (a run folder of a finished run, or a .pt file)")
    try:
        state = load_checkpoint(ck)
    except MMBalanceError as exc:
        raise MethodSetupError(f"{where}: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise MethodSetupError(f"{where}: {ck} is not an mmbalance checkpoint (no model weights / config)")
    cfg = state["config"]
    method = cfg.get("method", {}).get("name")
    if method != "unimodal":
        raise MethodSetupError(f"{where} was trained with method '{method}'; a teacher is a 'unimodal' run "
                               f"(mmbalance train --method unimodal method.modality={modality})")
    encs = []
    for k in state["model"]:
        if k.startswith("encoders."):
            m = k.split(".")[1]
            if m not in encs:
                encs.append(m)
    trained = cfg.get("method", {}).get("modality") or (encs[0] if encs else None)
    if trained != modality:
        raise MethodSetupError(f"{where} trained modality '{trained}', not '{modality}'")
    ran_on = cfg.get("data", {}).get("name")
    if data_name and not _same_data(str(ran_on), data_name):
        raise MethodSetupError(f"{where} was trained on dataset '{ran_on}', this run is on '{data_name}'")
    return state


def _same_data(a: str, b: str) -> bool:
    """Same ``data.name``; two ``.npz`` paths are compared as resolved files."""
    if a == b:
        return True
    if a.endswith(".npz") and b.endswith(".npz"):
        return Path(a).resolve() == Path(b).resolve()
    return False


def copy_weights(target: nn.Module, state: Mapping[str, Tensor], prefix: str, where: str) -> None:
    """Load ``state[prefix + name]`` into every parameter and buffer of ``target``; every key and
    shape must match (errors name the parameter and both shapes)."""
    own = target.state_dict()
    got = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in got]
    extra = [k for k in got if k not in own]
    if missing or extra:
        raise MethodSetupError(f"{where}: its weights do not fit this run's model (missing {missing[:4]}, "
                               f"unexpected {extra[:4]}); train the teacher with the same model settings")
    for k, v in own.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise MethodSetupError(f"{where}: parameter '{prefix}{k}' has shape {list(got[k].shape)} there but "
                                   f"{list(v.shape)} in this run's model; train the teacher with the same model "
                                   f"settings (model.*)")
    target.load_state_dict({k: got[k].to(v.device, v.dtype) for k, v in own.items()})


class FrozenTeacher(nn.Module):
    """A teacher encoder: parameters without gradient, always in eval mode (``model.train()`` does
    not switch it) unless ``frozen`` is lifted for its own training stage."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.frozen = True
        self.freeze()

    def freeze(self) -> None:
        self.frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        super().train(False)

    def thaw(self) -> None:
        self.frozen = False
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        super().train(True)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


def train_unimodal_stage(members: Mapping[str, nn.Module], classifiers: Mapping[str, nn.Module],
                         feature_dims: Mapping[str, int], epochs: int, ctx) -> dict[str, float]:
    """Train each ``members[m]`` (encoder) with ``classifiers[m]`` alone (others' features zero),
    cross-entropy, for ``epochs`` passes over ``ctx.train_batches()``; one optimiser per modality
    (``ctx.make_optimizer``); gradients averaged over processes under DDP. Returns logs."""
    opts = {m: ctx.make_optimizer(list(members[m].parameters()) + list(classifiers[m].parameters()))
            for m in members}
    for m in members:
        members[m].train()
        classifiers[m].train()
    seen = 0
    correct = {m: 0 for m in members}
    for e in range(epochs):
        last = e == epochs - 1
        for batch in ctx.train_batches():
            for m in members:
                params = list(members[m].parameters()) + list(classifiers[m].parameters())
                with ctx.autocast():
                    logits = classifiers[m](alone(members[m](batch.inputs[m]), m, feature_dims))
                    loss = F.cross_entropy(logits, batch.labels)
                opts[m].zero_grad(set_to_none=True)
                loss.backward()
                if D.is_distributed():
                    ws = D.world_size()
                    for p in params:
                        if p.grad is not None:
                            p.grad = D.all_reduce_sum(p.grad) / ws
                ctx.clip_grad(params)
                opts[m].step()
                if last:
                    correct[m] += int((logits.detach().argmax(1) == batch.labels).sum())
            seen += len(batch)
    last_seen = seen // max(epochs, 1)  # every pass has as many rows (train_batches pads shards)
    tot = D.all_reduce_sum(torch.tensor([float(seen), float(last_seen)] + [float(correct[m]) for m in members],
                                        dtype=torch.float64)).tolist()
    logs = {"teacher_samples": tot[0] * len(members)}
    for j, m in enumerate(members):
        logs[f"teacher_acc_{m}"] = tot[2 + j] / max(tot[1], 1.0)
    return logs


@dataclass
class UMTOptions:
    weight: float = 10.0  # lambda: weight of the summed feature-MSE distillation (peer 'scaling' 10)
    teachers: Any = ""  # "" = every teacher trained in-run; "m1=run_folder,m2=..." (or a mapping): unimodal runs
    teacher_epochs: int = 0  # in-run teacher stage: passes over train per teacher; 0 = train.epochs
    init_from_teacher: bool = False  # start the student encoders from the teachers' weights
    tune_space = {"weight": ("log", 0.1, 100.0)}  # mmbalance tune ranges (ours; peer 10)

    def __post_init__(self):
        self.teachers = _plain_teachers(self.teachers)

    def validate(self):
        errs = []
        if self.weight < 0:
            errs.append(f"weight must be >= 0, got {self.weight}")
        if self.teacher_epochs < 0:
            errs.append(f"teacher_epochs must be >= 0 (0 = train.epochs), got {self.teacher_epochs}")
        try:
            parse_teachers(self.teachers)
        except ValueError as exc:
            errs.append(str(exc))
        return errs


def _plain_teachers(v: Any) -> Any:
    """Plain ``str`` / ``dict`` of ``str`` (command-line values arrive as str subclasses)."""
    if isinstance(v, Mapping):
        return {str(k): str(x) for k, x in v.items()}
    if v is None:
        return ""
    return str(v) if isinstance(v, str) else v


class _TeacherMixin:
    """Shared: parse and check ``teachers`` at construction; the in-run stage's length."""

    def _init_teachers(self) -> None:
        try:
            self.teacher_runs = parse_teachers(self.options.teachers)
        except ValueError as exc:
            raise MethodSetupError(f"method.{exc}") from None
        unknown = [m for m in self.teacher_runs if m not in self.modalities]
        if unknown:
            raise MethodSetupError(f"method.teachers names modality '{unknown[0]}', which this dataset does not "
                                   f"have.{suggest(unknown[0], self.modalities)} Modalities: {', '.join(self.modalities)}")

    def _stage_epochs(self, ctx) -> int:
        return int(self.options.teacher_epochs) or int(ctx.num_epochs)


@register_method("umt", paper="Du et al., ICML 2023", kind="objective",
                 description="Uni-Modal Teacher: distil frozen unimodal teachers' encoder features (in-run stage or "
                             "earlier unimodal runs) into the multimodal model's encoders (feature MSE)")
class UMT(_TeacherMixin, Method):
    Options = UMTOptions
    modality_range = (2, None)
    state_attrs = ("ready",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self._init_teachers()
        self.ready = False

    def needs_teachers(self) -> bool:
        return self.options.weight > 0 or self.options.init_from_teacher

    def extra_modules(self, model):
        if not self.needs_teachers():
            return {}
        return {"umt_teachers": nn.ModuleDict({m: FrozenTeacher(copy.deepcopy(model.encoders[m]))
                                               for m in self.modalities})}

    def teachers(self, model) -> nn.ModuleDict:
        return model.extras["umt_teachers"]

    def on_epoch_start(self, model, ctx):
        if self.ready or not self.needs_teachers():
            return
        teachers = self.teachers(model)
        for m, path in self.teacher_runs.items():
            state = load_unimodal_run(path, m, self.data_name)
            copy_weights(teachers[m].encoder, state["model"], f"encoders.{m}.",
                         f"method.teachers: teacher run '{path}' for modality '{m}'")
        todo = [m for m in self.modalities if m not in self.teacher_runs]
        if todo:
            self._stage_logs = self._train_teachers(model, teachers, todo, ctx)
        for m in self.modalities:
            teachers[m].freeze()
            if self.options.init_from_teacher:
                model.encoders[m].load_state_dict(teachers[m].encoder.state_dict())
        self.ready = True

    def _train_teachers(self, model, teachers, todo: list[str], ctx) -> dict[str, float]:
        classifiers = {m: copy.deepcopy(model.fusion) for m in todo}
        for c in classifiers.values():
            for p in c.parameters():
                p.requires_grad_(True)
        for m in todo:
            teachers[m].thaw()
        try:
            return train_unimodal_stage({m: teachers[m].encoder for m in todo}, classifiers, model.feature_dims,
                                        self._stage_epochs(ctx), ctx)
        finally:
            for m in todo:
                teachers[m].freeze()

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        ce = F.cross_entropy(out.logits, batch.labels)
        if self.options.weight <= 0:
            return LossOutput(ce, out, {"loss_ce": ce.detach()})
        if not self.ready:
            raise MethodSetupError("method 'umt': the teachers are not in place (on_epoch_start has not run)")
        teachers = self.teachers(model)
        with torch.no_grad():
            t = {m: teachers[m](batch.inputs[m]) for m in self.modalities}
        distill = distillation_loss(out.features, t, self.options.weight)
        return LossOutput(ce + distill, out, {"loss_ce": ce.detach(), "loss_distill": distill.detach()})

    def on_epoch_end(self, model, ctx):
        logs = getattr(self, "_stage_logs", None)
        self._stage_logs = None
        return logs


@dataclass
class UMEOptions:
    teachers: Any = ""  # "" = members trained in this run; "m1=run_folder,m2=..." (or a mapping): every member from a unimodal run

    def __post_init__(self):
        self.teachers = _plain_teachers(self.teachers)

    def validate(self):
        try:
            parse_teachers(self.teachers)
        except ValueError as exc:
            return [str(exc)]
        return []


@register_method("ume", paper="Du et al., ICML 2023", kind="baseline",
                 description="Uni-Modal Ensemble: unimodal models (trained side by side, or loaded from unimodal "
                             "runs) whose softmax probabilities are averaged")
class UME(_TeacherMixin, Method):
    Options = UMEOptions
    modality_range = (2, None)
    state_attrs = ("ready",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self._init_teachers()
        missing = [m for m in self.modalities if m not in self.teacher_runs]
        if self.teacher_runs and missing:
            raise MethodSetupError(f"method.teachers lists runs for {', '.join(self.teacher_runs)} but not for "
                                   f"{', '.join(missing)}: UME loads every member or none (omit teachers to train "
                                   f"them in this run)")
        self.loaded = bool(self.teacher_runs)
        self.ready = not self.loaded

    def extra_modules(self, model):
        cls = nn.ModuleDict({m: copy.deepcopy(model.fusion) for m in self.modalities})
        return {"ume_classifiers": cls}

    def classifiers(self, model) -> nn.ModuleDict:
        return model.extras["ume_classifiers"]

    def param_groups(self, model):
        # the model's own fusion is never used: leave it out of the optimiser
        skip = {id(p) for p in model.fusion.parameters()}
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in skip]}]

    def member_logits(self, model, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cls = self.classifiers(model)
        return {m: cls[m](alone(feats[m], m, model.feature_dims)) for m in self.modalities}

    def on_epoch_start(self, model, ctx):
        if self.ready:
            return
        cls = self.classifiers(model)
        for m, path in self.teacher_runs.items():
            state = load_unimodal_run(path, m, self.data_name)
            where = f"method.teachers: teacher run '{path}' for modality '{m}'"
            copy_weights(model.encoders[m], state["model"], f"encoders.{m}.", where)
            copy_weights(cls[m], state["model"], "fusion.", where)
        self.ready = True

    def compute_loss(self, model, batch, ctx):
        feats = model.encode(batch.inputs)
        logits = self.member_logits(model, feats)
        losses = {m: F.cross_entropy(l, batch.labels) for m, l in logits.items()}
        out = ModelOutput(ensemble_log_probs({m: l.detach() for m, l in logits.items()}), feats, logits)
        return LossOutput(sum(losses.values()), out, {f"loss_{m}": v.detach() for m, v in losses.items()})

    def training_step(self, model, batch, ctx):
        if not self.loaded:
            return super().training_step(model, batch, ctx)
        # loaded members: nothing is trained (an evaluation pass over train, members in eval mode)
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), ctx.autocast():
                return self.compute_loss(model, batch, ctx)
        finally:
            model.train(was)

    def predict(self, model, batch):
        feats = model.encode(batch.inputs)
        logits = self.member_logits(model, feats)
        return ModelOutput(ensemble_log_probs(logits), feats, logits)

    def zero_out_logits(self, model, output):
        return dict(output.unimodal_logits)

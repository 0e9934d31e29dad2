"""MSLR: Modality-Specific Learning Rates (fixed ``keep`` and per-epoch ``dynamic`` rates).

Paper: Yao, Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive
Late-fusion", Findings of ACL 2022. **No official code exists and the paper was not read**
(spec ``baselines.md`` §4.16); re-implementations read for the spec: lihong2303/AGM@5a65542
(``run/CREMAD_main.py``), kkontras/MLB@357b5ce (``Bias_Infusion_MSLR``) and an unofficial
``MSLRTrainer`` ("implemented by ourself, based on the paper") whose ``keep`` mode is the
``keep`` strategy here; ``dynamic`` follows kkontras/MLB@357b5ce (spec DECISION).

Computation (``strategy="keep"``): the optimiser gets one parameter group per modality -- the
encoder of modality m and, with ``heads_follow_modality`` (default), its unimodal head if the
model has one -- with learning rate ``optim.lr * lr_scale[m]`` (a modality missing from
``lr_scale`` keeps factor 1), and one group ``fusion`` for everything else (fusion head, method
extras) at ``optim.lr * fusion_lr_scale``. The rates are fixed for the whole run; the trainer's
LR schedule multiplies every group's initial rate by the same factor each epoch (``LambdaLR``
keeps one base rate per group), so the ratios between modalities are kept throughout. The loss
is the plain fused cross-entropy (as joint training).

Decisions and deviations:

* Factors, not absolute rates: the unofficial trainer gives absolute initial LRs (fusion 1e-3,
  audio 1e-3, visual 1e-2, text 2e-5); the spec's DECISION asks for per-modality LR *factors*.
  Each group carries ``lr_scale``; the trainer (and
  :func:`mmbalance.training.build.optimizer_groups` in a user's own loop) turns it into
  ``lr = optim.lr * lr_scale``. ``tests/methods/test_mslr.py`` checks the optimiser's group rates.
* ``strategy="dynamic"`` (spec DECISION, re-implementation kkontras/MLB@357b5ce
  ``Bias_Infusion_MSLR``): before each epoch t, for each modality m with the accuracy
  ``acc_t`` of the trainer's latest evaluation (``ctx.last_eval["val_{m}_zero_out_accuracy"]``:
  the fused classifier with the other modalities' features zeroed, on the **val** split -- gap A)
  and the accuracies of the ``memory`` (5) evaluations before it, the multiplier is
  ``c_m = init_scale[m] * acc_t / mean(acc_{t-5..t-1})`` -- non-compounding (each epoch from the
  raw accuracies, not from the previous multiplier) -- and 1 while fewer than ``memory`` earlier
  accuracies exist (:func:`mmbalance.functional.mslr.dynamic_rate`). An epoch that follows no new
  evaluation (``train.eval_every`` > 1) keeps the previous multipliers.
  ``apply`` says what ``c_m`` multiplies. ``apply="grad"`` (default, the spec DECISION and both
  re-implementations): every gradient of encoder m is multiplied by ``c_m`` after the backward
  pass (``after_backward``; heads and fusion untouched, as kkontras/MLB's ``enc_0``/``enc_1``).
  ``apply="lr"`` (ours): ``c_m`` multiplies modality m's *learning rate* instead
  (``ctx.set_lr_scale(m, c_m)``, gap E; it composes with the LR schedule; heads follow with
  ``heads_follow_modality``) -- the paper's subject is learning rates. With plain SGD the two are
  identical; with momentum they differ through the momentum dynamics; with Adam a gradient
  multiplier does almost nothing (Adam is invariant to the gradient's scale) while an LR
  multiplier acts.
  The fusion group keeps factor 1. ``lr_scale`` / ``fusion_lr_scale`` (the ``keep`` factors, also
  set by the audio-visual presets) are not used by ``dynamic``: every group starts at
  ``optim.lr`` as in the MLB re-implementation. ``init_scale`` defaults to 1 per modality; the
  CREMA-D preset uses the re-implementations' ``{audio: 0.9, visual: 1.1}``.
* Presets: the spec gives no per-dataset factors for ``keep``. For the audio-visual datasets the
  presets use the unofficial trainer's initial LRs as factors relative to its fusion LR
  (audio 1e-3/1e-3 = 1, visual 1e-2/1e-3 = 10); its text rate (2e-5, factor 0.02) has no dataset
  here. With the defaults (no factors) MSLR is joint training.
* Note: with SGD+momentum an LR factor and a gradient factor (what the AGM/MLB re-implementations
  use for their dynamic variant) differ only through the momentum dynamics and weight decay;
  with Adam they differ a lot (Adam is invariant to the gradient's scale, not to the LR's).
* M > 2: natural (one group per modality).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from ..errors import MethodSetupError
from ..functional.mslr import dynamic_rate
from ..registry import suggest
from .base import Method, register_method
from .gradients import scale_modality_grads

STRATEGIES = ("keep", "dynamic")
APPLIES = ("grad", "lr")


@dataclass
class MSLROptions:
    strategy: str = "keep"  # keep (fixed factors) | dynamic (per-epoch factors from val accuracy)
    lr_scale: Dict[str, float] = field(default_factory=dict)  # keep: modality -> factor of optim.lr (default 1)
    fusion_lr_scale: float = 1.0  # keep: factor of optim.lr for the fusion head and other parameters
    heads_follow_modality: bool = True  # unimodal heads (if any) use their modality's rate
    init_scale: Dict[str, float] = field(default_factory=dict)  # dynamic: init_m (default 1) of c_m
    memory: int = 5  # dynamic: earlier evaluations averaged (keep_memory_epoch); c_m = 1 until known
    apply: str = "grad"  # dynamic: c_m multiplies encoder m's gradients (grad, spec) or its learning rate (lr)

    def validate(self):
        errs = []
        if self.strategy not in STRATEGIES:
            errs.append(f"strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        for m, v in self.init_scale.items():
            if not v > 0:
                errs.append(f"init_scale.{m} must be > 0, got {v}")
        if self.apply not in APPLIES:
            errs.append(f"apply must be one of {', '.join(APPLIES)}, got '{self.apply}'")
        if self.memory < 1:
            errs.append(f"memory must be >= 1 (evaluations averaged), got {self.memory}")
        for m, v in self.lr_scale.items():
            if not v >= 0:
                errs.append(f"lr_scale.{m} must be >= 0, got {v}")
        if not self.fusion_lr_scale >= 0:
            errs.append(f"fusion_lr_scale must be >= 0, got {self.fusion_lr_scale}")
        return errs


_AV = {"method": {"lr_scale": {"audio": 1.0, "visual": 10.0}}}
_CREMAD = {"method": {"lr_scale": {"audio": 1.0, "visual": 10.0}, "init_scale": {"audio": 0.9, "visual": 1.1}}}


@register_method("mslr", paper="Yao & Mihalcea, Findings of ACL 2022", kind="optimisation",
                 description="modality-specific learning rates: fixed per-modality LR factors ('keep') or "
                             "per-epoch factors from validation accuracy ('dynamic')")
class MSLR(Method):
    Options = MSLROptions
    presets = {"cremad": _CREMAD, "kinetics_sounds": _AV, "ave": _AV, "vggsound": _AV}
    state_attrs = ("history", "coeffs", "last_eval_seen")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        for key in ("lr_scale", "init_scale"):
            unknown = [m for m in getattr(self.options, key) if m not in self.modalities]
            if unknown:
                raise MethodSetupError(f"method.{key} names unknown modalities {unknown}.{suggest(unknown[0], self.modalities)} "
                                       f"Modalities: {', '.join(self.modalities)}")
        self.dynamic = self.options.strategy == "dynamic"
        #: dynamic: each modality's val zero-out accuracies of earlier evaluations (last ``memory``)
        self.history: Dict[str, List[float]] = {m: [] for m in self.modalities}
        #: dynamic: the current multipliers c_m
        self.coeffs: Dict[str, float] = {m: 1.0 for m in self.modalities}
        #: the val loss of the evaluation last read (tells a new evaluation from an old one)
        self.last_eval_seen: float | None = None

    def lr_factors(self) -> Dict[str, float]:
        """The static per-group factors (``keep``); ``dynamic`` starts every group at 1."""
        if self.dynamic:
            return {m: 1.0 for m in self.modalities}
        return {m: float(self.options.lr_scale.get(m, 1.0)) for m in self.modalities}

    def param_groups(self, model) -> List[Dict[str, Any]]:
        seen = set()
        groups: List[Dict[str, Any]] = []
        for m, factor in self.lr_factors().items():
            params = list(model.encoder_parameters(m))
            if self.options.heads_follow_modality:
                params += list(model.head_parameters(m))
            params = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "name": m, "lr_scale": factor})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            fusion = 1.0 if self.dynamic else self.options.fusion_lr_scale
            groups.append({"params": rest, "name": "fusion", "lr_scale": fusion})
        return groups

    def update_rates(self, last_eval: Dict[str, float]) -> bool:
        """dynamic: read a new evaluation (if ``last_eval`` is one) into the multipliers; True if it was."""
        if not last_eval or last_eval.get("val_loss") == self.last_eval_seen:
            return False
        accs = {}
        for m in self.modalities:
            key = f"val_{m}_zero_out_accuracy"
            if key not in last_eval:
                raise RuntimeError(f"mslr strategy=dynamic reads '{key}' from the latest evaluation, which lacks it "
                                   f"(has {sorted(last_eval)})")
            accs[m] = float(last_eval[key])
        mem = self.options.memory
        for m in self.modalities:
            init = float(self.options.init_scale.get(m, 1.0))
            self.coeffs[m] = dynamic_rate(self.history[m], accs[m], init, mem)
            self.history[m] = (self.history[m] + [accs[m]])[-mem:]
        self.last_eval_seen = float(last_eval["val_loss"])
        return True

    def on_epoch_start(self, model, ctx):
        if not self.dynamic:
            return
        self.update_rates(ctx.last_eval)
        if self.options.apply != "lr":
            return
        named = {g.get("name") for g in ctx.optimizer.param_groups}
        for m, c in self.coeffs.items():
            if m in named:  # (a modality without trainable parameters has no group)
                ctx.set_lr_scale(m, c)

    def after_backward(self, model, batch, result, ctx):
        if self.dynamic and self.options.apply == "grad":
            scale_modality_grads(model, {m: c for m, c in self.coeffs.items() if c != 1.0}, rule="all")

    def on_epoch_end(self, model, ctx):
        if self.dynamic:
            return {f"coeff_{m}": c for m, c in self.coeffs.items()}
        return {f"coeff_{m}": f for m, f in self.lr_factors().items()}

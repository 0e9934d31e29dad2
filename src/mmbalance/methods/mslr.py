"""MSLR: Modality-Specific Learning Rates (the fixed-rate ``keep`` strategy).

Paper: Yao, Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive
Late-fusion", Findings of ACL 2022. **No official code exists and the paper was not read**
(spec ``baselines.md`` §4.16); re-implementations read for the spec: lihong2303/AGM@5a65542
(``run/CREMAD_main.py``), kkontras/MLB@357b5ce (``Bias_Infusion_MSLR``) and an unofficial
``MSLRTrainer`` ("implemented by ourself, based on the paper") whose ``keep`` mode is what this
module implements.

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
* ``strategy="dynamic"`` (spec DECISION: non-compounding per-epoch gradient multiplier
  ``init_m * acc_t / mean(acc_{t-5..t-1})`` from validation zero-out accuracy) is not implemented
  yet; ``validate()`` rejects it. The ``strategy`` option is where it will be added.
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
from ..registry import suggest
from .base import Method, register_method

STRATEGIES = ("keep",)  # "dynamic" comes with the per-epoch validation-accuracy schedule


@dataclass
class MSLROptions:
    strategy: str = "keep"  # keep (fixed rates); dynamic: not yet
    lr_scale: Dict[str, float] = field(default_factory=dict)  # modality -> factor of optim.lr (default 1)
    fusion_lr_scale: float = 1.0  # factor of optim.lr for the fusion head and other parameters
    heads_follow_modality: bool = True  # unimodal heads (if any) use their modality's rate

    def validate(self):
        errs = []
        if self.strategy not in STRATEGIES:
            errs.append(f"strategy must be one of {', '.join(STRATEGIES)} (dynamic is not implemented yet), "
                        f"got '{self.strategy}'")
        for m, v in self.lr_scale.items():
            if not v >= 0:
                errs.append(f"lr_scale.{m} must be >= 0, got {v}")
        if not self.fusion_lr_scale >= 0:
            errs.append(f"fusion_lr_scale must be >= 0, got {self.fusion_lr_scale}")
        return errs


_AV = {"method": {"lr_scale": {"audio": 1.0, "visual": 10.0}}}


@register_method("mslr", paper="Yao & Mihalcea, Findings of ACL 2022", kind="optimisation",
                 description="modality-specific learning rates (fixed per-modality LR factors, 'keep')")
class MSLR(Method):
    Options = MSLROptions
    presets = {"cremad": _AV, "kinetics_sounds": _AV, "ave": _AV, "vggsound": _AV}

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        unknown = [m for m in self.options.lr_scale if m not in self.modalities]
        if unknown:
            raise MethodSetupError(f"method.lr_scale names unknown modalities {unknown}.{suggest(unknown[0], self.modalities)} "
                                   f"Modalities: {', '.join(self.modalities)}")

    def lr_factors(self) -> Dict[str, float]:
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
            groups.append({"params": rest, "name": "fusion", "lr_scale": self.options.fusion_lr_scale})
        return groups

    def on_epoch_end(self, model, ctx):
        return {f"coeff_{m}": f for m, f in self.lr_factors().items()}

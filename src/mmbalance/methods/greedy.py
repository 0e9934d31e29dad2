"""Greedy: balanced multimodal learning with MMTM mid-level fusion, the conditional learning speed
and its curation rule.

Paper: Wu, Jastrzębski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in
Multi-modal Deep Neural Networks", ICML 2022 (arXiv 2202.05306). Code followed:
nyukat/greedy_multimodal_learning@a190e03 (``src/model.py::MMTM_MVCNN``,
``src/balanced_mmtm.py::MMTM_mitigate``, ``src/callbacks.py::Bias_Mitigation_Strong``,
``train.py::blend_loss``, ``configs/training_guided.gin``, ``configs/eval.gin``); spec
``baselines.md`` §4.3 (and §4.26 D3 for the CUR).

Model (``rebuild_model``, spec gap F): the configured encoders split into stages
(:mod:`mmbalance.models.stages`) with an :class:`~mmbalance.models.mmtm.MMTM` block (reduction
ratio 4) after the stages named by ``mmtm_after``; ``auto`` places them

* ResNet-18: after ``layer2``, ``layer3``, ``layer4`` (the code: stages 2-4);
* the small CNN (``cnn``): after ``block2``, ``block3`` -- the analogous placement: every conv
  stage but the first (lowest-level) one, as ResNet skips ``layer1``;
* MLP (synthetic data, vectors): after ``out`` (its second and last layer; same rule: every stage
  but the first);
* sequence/text encoders (a trivial one-stage split): after ``encode``, i.e. on the pooled features;
* frames: the frame encoder's placement, the squeeze averaging over time too.

When the two encoders give different numbers of points, they are paired from the deepest
(the last ``min`` points of each). Each branch has its own classifier (the ``late`` fusion:
``fc_m: Linear(d_m, K)``, prediction ``(x_0 + x_1) / 2``), which replaces ``model.fusion``; the
loss is **CE(x_0, y) + CE(x_1, y)** (``blend_loss``; no fused CE). ``zero_out_accuracy`` of
modality m is its branch's logits ``x_m`` from a second forward pass with every other modality's
**input** set to zeros (evaluation only: ``predict`` fills ``ModelOutput.zero_out``). The branch's
logits of the normal pass (the code's per-view accuracy) see the other modality through the MMTM
gates -- on the synthetic default they reach the fused accuracy for both modalities -- so they
cannot say how much a modality carries alone.

Conditional learning speed and curation (every step, after the backward pass)::

    main_m = encoder m + its classifier fc_m;  bypass_m = fc_excite[m] + fc_squeeze of every MMTM
    cum_bypass_m += sum ||grad||^2 / sum ||theta||^2 over bypass_m;  cum_main_m likewise (never reset)
    BDR_m = log10(cum_bypass_m / cum_main_m);  d = BDR_0 - BDR_1
    from start_epoch on: out of curation, |d| > epsilon -> curate for `window` steps, caring for
    modality 0 if d > 0 else 1

In curation mode the caring modality's MMTM gates are replaced by their running averages (no
sample-specific cross-modal flow into that branch; ``MMTM`` docstring). Defaults as the code:
epsilon 0.01, window 5, start epoch 2, ratio 4. The code trains with SGD lr 0.1, momentum 0,
batch 8 on ModelNet40 views; no per-dataset preset is shipped (the paper's datasets are not
mmbalance datasets).

CUR (``cur_every`` > 0, every that many epochs, logged as ``cur_{m'}`` = ``CUR(m' -> m)``, as
``mmbalance diagnose`` reports ``rate[m']``): the accuracy ``A(m | all)`` of branch m on the
validation split, and ``A(m | alone)`` with the other modality's squeeze vectors in every MMTM
replaced by their training-set means (one eval pass over train records them; the code's
``turnoff_cross_modal_flow``); the formula is ``functional.greedy.conditional_utilisation_rate``,
shared with the diagnostics.

DECISIONS and deviations:

* Running-average bug (spec): each modality's running gate averages its own gate
  (``fix_avg_bug=true``, default); ``false`` reproduces the code (both from modality 0's gate;
  needs equal channel counts).
* Running averages are updated in training forwards only (the code also updates them in every
  evaluation forward). Under DDP the batch-mean gate is averaged over processes first.
* BDR before any learning (a zero cumulative speed) is 0 (the code would take log10(0)).
* ``curation=false`` trains the same MMTM model without the rule (the paper's un-guided MMTM).
* Two modalities only (spec: MMTM is pairwise and the rule compares two BDRs); M > 2 is refused
  at construction. The spec's M-modality extension is not implemented.
* The code's ``ReduceLROnPlateau`` / early stopping are the trainer's schedule choices, not part
  of the method; the code's random-curation variant (``Bias_Mitigation_Random``) is not shipped.
* Speeds are computed in float64 from the (fp32) gradients; nothing to reduce across processes
  (gradients are already averaged by DDP).
* At most one host sync per step: the cumulative speeds accumulate on the device (float64, the
  same additions as the Python floats they were), the ``bdr_{m}`` logs are 0-d device tensors, and
  the cumulative speeds are read (one ``tolist``) only on the steps where the rule looks at ``d``
  (out of a curation window, from ``start_epoch`` on); the state keeps them as lists of floats.
  The rule's ``d`` is computed from the read values with ``math.log10`` as before (the same
  decisions); the logged ``bdr_{m}`` use ``torch.log10``, which may differ in the last ulp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data.batch import Batch
from ..distributed import all_reduce_sum
from ..errors import MethodSetupError
from ..functional.greedy import (balance_ratios, balance_ratios_tensor, conditional_utilisation_rate,
                                 curation_update, learning_speed_tensor)
from ..models.fusion import LateFusion
from ..models.mmtm import MMTM
from ..models.multimodal import ModelOutput, MultimodalModel
from ..models.resnet import ogm_init
from ..models.stages import StagedMultimodalModel, stage_channel_dim, stage_channels
from .base import LossOutput, Method, TrainContext, register_method


@dataclass
class GreedyOptions:
    epsilon: float = 0.01  # |BDR_0 - BDR_1| above which curation starts (code: 0.01)
    window: int = 5  # steps a curation window lasts (code: 5)
    start_epoch: int = 2  # first epoch (0-based) the rule may start curation (code: 2)
    ratio: float = 4.0  # MMTM reduction ratio: squeeze width 2 (C_0 + C_1) / ratio (code: 4)
    mmtm_after: str = "auto"  # "auto" or comma-separated stage names (in both encoders) to put MMTM after
    curation: bool = True  # false: MMTM model without the curation rule (the un-guided baseline)
    fix_avg_bug: bool = True  # each modality's running gate from its own gate (false: the code's bug)
    cur_every: int = 0  # log the CUR on val every this many epochs (0 = never; costs 1 train + 3 val eval passes)

    def validate(self):
        errs = []
        if not (self.epsilon >= 0) or math.isnan(self.epsilon):
            errs.append(f"epsilon must be >= 0, got {self.epsilon}")
        if self.window < 1:
            errs.append(f"window must be >= 1 step, got {self.window}")
        if self.start_epoch < 0:
            errs.append(f"start_epoch must be >= 0, got {self.start_epoch}")
        if not self.ratio > 0:
            errs.append(f"ratio must be > 0, got {self.ratio}")
        if self.cur_every < 0:
            errs.append(f"cur_every must be >= 0 (0 = never), got {self.cur_every}")
        if not isinstance(self.mmtm_after, str) or not self.mmtm_after.strip():
            errs.append(f"mmtm_after must be 'auto' or comma-separated stage names, got {self.mmtm_after!r}")
        return errs


def auto_points(channels: Mapping[str, int]) -> List[str]:
    """Every couplable stage but the first; the only one when there is one."""
    names = list(channels)
    return names[1:] if len(names) > 1 else names


@register_method("greedy", paper="Wu et al., ICML 2022", kind="feed-forward", modalities="2",
                 description="MMTM blocks between encoder stages; curation windows re-balance the conditional "
                             "learning speed (BDR) by freezing the caring branch's cross-modal gates")
class Greedy(Method):
    Options = GreedyOptions
    modality_range = (2, 2)
    state_attrs = ("cum_bypass", "cum_main", "curation_mode", "caring", "step_in_window")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        #: ``[[cum_bypass_0, cum_bypass_1], [cum_main_0, cum_main_1]]``, float64 on the model's device
        #: (accumulated there every step: no host read); ``cum_bypass`` / ``cum_main`` read it as floats
        self._cum = torch.zeros(2, 2, dtype=torch.float64)
        self.curation_mode = False
        self.caring = 0
        self.step_in_window = 0

    # the cumulative speeds as lists of floats (state, tests); reading them is a host sync, so the
    # training step uses ``_cum`` itself
    @property
    def cum_bypass(self) -> List[float]:
        return [float(v) for v in self._cum[0].tolist()]

    @cum_bypass.setter
    def cum_bypass(self, value) -> None:
        self._set_cum(0, value)

    @property
    def cum_main(self) -> List[float]:
        return [float(v) for v in self._cum[1].tolist()]

    @cum_main.setter
    def cum_main(self, value) -> None:
        self._set_cum(1, value)

    def _set_cum(self, row: int, value) -> None:
        cum = self._cum.clone()
        cum[row] = torch.as_tensor([float(v) for v in value], dtype=torch.float64)
        self._cum = cum

    # ----------------------------------------------------------------------------- model
    def build_fusion(self, dims, num_classes, model_cfg):
        fusion = LateFusion(dims, num_classes)
        ogm_init(fusion)
        return fusion

    def rebuild_model(self, model: MultimodalModel) -> MultimodalModel:
        o = self.options
        who = "method 'greedy' (MMTM between encoder stages)"
        a, b = self.modalities
        chans = {m: stage_channels(model.encoders[m], m, who) for m in (a, b)}
        if o.mmtm_after.strip() == "auto":
            pts = {m: auto_points(chans[m]) for m in (a, b)}
            k = min(len(pts[a]), len(pts[b]))
            pts = {m: pts[m][len(pts[m]) - k:] for m in (a, b)}
        else:
            names = [s.strip() for s in o.mmtm_after.split(",") if s.strip()]
            for m in (a, b):
                bad = [s for s in names if s not in chans[m]]
                if bad:
                    raise MethodSetupError(f"greedy: method.mmtm_after names {bad}, which encoder '{m}' "
                                           f"({type(model.encoders[m]).__name__}) has no couplable stage for; its "
                                           f"stages: {', '.join(chans[m])}")
            pts = {m: names for m in (a, b)}
        if not pts[a]:
            raise MethodSetupError("greedy: no stage to place an MMTM block after")
        dims = [stage_channel_dim(model.encoders[m]) for m in (a, b)]
        blocks = [MMTM([a, b], [chans[a][sa], chans[b][sb]], o.ratio, dims, o.fix_avg_bug)
                  for sa, sb in zip(pts[a], pts[b])]
        for blk in blocks:
            ogm_init(blk)
        return StagedMultimodalModel(model, [{a: sa, b: sb} for sa, sb in zip(pts[a], pts[b])], blocks, who)

    @staticmethod
    def _blocks(model: MultimodalModel) -> List[MMTM]:
        blocks = [b for b in getattr(model, "cross", []) if isinstance(b, MMTM)]
        if not blocks:
            raise MethodSetupError("method 'greedy' needs the model it built (MMTM blocks between encoder stages); "
                                   "build it through the method (mmbalance.prepare_model / Trainer)")
        return blocks

    # ----------------------------------------------------------------------------- training
    def compute_loss(self, model, batch, ctx):
        blocks = self._blocks(model)
        caring = self.caring if (self.options.curation and self.curation_mode) else None
        try:
            for blk in blocks:
                blk.caring = caring
            out = model(batch.inputs)
        finally:
            for blk in blocks:
                blk.caring = None
        logits = model.modality_logits(out.features)
        loss = sum(F.cross_entropy(logits[m], batch.labels) for m in self.modalities)
        logs: Dict[str, Any] = {f"curation_{m}": float(caring == i) for i, m in enumerate(self.modalities)}
        return LossOutput(loss, out, logs)

    def parameter_sets(self, model: MultimodalModel):
        """``(main_m, bypass_m)`` parameter lists per modality index (see the module docstring)."""
        blocks = self._blocks(model)
        branches = getattr(model.fusion, "branches", None)
        out = []
        for i, m in enumerate(self.modalities):
            main = list(model.encoders[m].parameters()) + (list(branches[m].parameters()) if branches is not None else [])
            byp = [p for blk in blocks for p in list(blk.fc_excite[i].parameters()) + list(blk.fc_squeeze.parameters())]
            out.append((main, byp))
        return out

    @staticmethod
    def _sq_norm(tensors, device=None) -> Tensor:
        """``sum ||t||^2`` in float64 (one fused norm kernel per list)."""
        ts = [t.detach().float() for t in tensors]
        if not ts:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(torch._foreach_norm(ts)).double().pow(2).sum()

    @classmethod
    def _speed_tensor(cls, params) -> Tensor:
        """One step's learning speed of ``params`` as a float64 device scalar (no host read)."""
        w = cls._sq_norm(params)
        g = cls._sq_norm([p.grad for p in params if p.grad is not None], w.device)
        return learning_speed_tensor(g, w)

    @classmethod
    def _speed(cls, params) -> float:
        return float(cls._speed_tensor(params))

    def after_backward(self, model, batch, result, ctx):
        o = self.options
        sets = self.parameter_sets(model)
        speeds = torch.stack([torch.stack([self._speed_tensor(byp) for _, byp in sets]),
                              torch.stack([self._speed_tensor(main) for main, _ in sets])])
        self._cum = self._cum.to(speeds.device) + speeds  # float64: the additions of Python floats
        bdr = balance_ratios_tensor(self._cum[0], self._cum[1])
        for i, m in enumerate(self.modalities):
            result.logs[f"bdr_{m}"] = bdr[i]  # 0-d device tensors: the trainer reads them once per epoch
        if o.curation:
            # the rule looks at d = BDR_0 - BDR_1 only out of a curation window and from start_epoch
            # on: only then are the cumulative speeds read (the step's one host sync), and d is
            # computed from them in Python exactly as before; inside a window the countdown is Python
            d = 0.0
            if ctx.epoch >= o.start_epoch and not self.curation_mode:
                byp, main = self._cum.tolist()
                b = balance_ratios(byp, main)
                d = b[0] - b[1]
            self.curation_mode, self.caring, self.step_in_window = curation_update(
                self.curation_mode, self.caring, self.step_in_window, d, ctx.epoch,
                start_epoch=o.start_epoch, epsilon=o.epsilon, window=o.window)

    # ----------------------------------------------------------------------------- evaluation
    def predict(self, model: MultimodalModel, batch: Batch) -> ModelOutput:
        """The fused prediction; in evaluation also ``zero_out[m]``: branch m's logits from a pass
        with every other modality's input zeroed (the MMTM gates mix the branches, so the normal
        pass's branch logits are not single-modality predictions)."""
        out = model(batch.inputs)
        if not model.training:
            for m in self.modalities:
                alone = {k: (x if k == m else torch.zeros_like(x)) for k, x in batch.inputs.items()}
                out.zero_out[m] = model.modality_logits(model(alone).features)[m]
        return out

    def on_epoch_end(self, model, ctx: TrainContext) -> Optional[Dict[str, float]]:
        k = self.options.cur_every
        if k <= 0 or (ctx.epoch + 1) % k:
            return None
        return self.cur(model, ctx)

    @torch.no_grad()
    def cur(self, model: MultimodalModel, ctx: TrainContext) -> Dict[str, float]:
        """``{cur_{m'}: CUR(m' -> m)}`` on the validation split (module docstring)."""
        blocks = self._blocks(model)
        was = model.training
        model.eval()
        try:
            for blk in blocks:
                blk.record = []
            for batch in ctx.train_eval_batches():
                model(batch.inputs)
            means = []
            for blk in blocks:
                sums = [torch.cat([r[i] for r in blk.record]).double() for i in range(2)]
                means.append([all_reduce_sum(torch.cat([s.sum(0), s.new_tensor([s.shape[0]])])) for s in sums])
                means[-1] = [t[:-1] / t[-1] for t in means[-1]]
                blk.record = None

            def accuracy(replace: Optional[int]) -> List[float]:
                for blk, mu in zip(blocks, means):
                    blk.squeeze_override = None if replace is None else {replace: mu[replace].float()}
                correct, n = [0.0, 0.0], 0
                for batch in ctx.val_batches():
                    logits = model.modality_logits(model(batch.inputs).features)
                    for i, m in enumerate(self.modalities):
                        correct[i] += float((logits[m].argmax(1) == batch.labels).sum())
                    n += int(batch.labels.shape[0])
                return [c / max(n, 1) for c in correct]

            a_all = accuracy(None)
            alone = [accuracy(1)[0], accuracy(0)[1]]  # branch i with the other's squeeze at its train mean
        finally:
            for blk in blocks:
                blk.record = None
                blk.squeeze_override = None
            model.train(was)
        logs = {}
        for i, m in enumerate(self.modalities):
            other = self.modalities[1 - i]
            logs[f"cur_{other}"] = (conditional_utilisation_rate(a_all[i], alone[i]) if a_all[i] > 0 else float("nan"))
        return logs

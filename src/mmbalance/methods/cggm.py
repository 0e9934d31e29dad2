"""CGGM: classifier-guided gradient modulation.

Paper: Guo, Jin, Chen, Zhao, "Classifier-guided Gradient Modulation for Enhanced Multimodal
Learning", NeurIPS 2024 (arXiv 2411.01409). Code followed: zrguo/CGGM@21e428c
(``src/foodtrain.py::train_model.train``, ``models/msamodel.py::ClassifierGuided`` / ``Classifier``,
``src/eval_metrics.py::cal_cos``), as specified in ``shared/specs/baselines.md`` §4.25. Math in
:mod:`mmbalance.functional.cggm`.

Model: the configured fusion plus one auxiliary classifier ``C_m`` per modality (``extra_modules``,
``model.extras["cggm"]``) on the DETACHED encoder feature ``z_m``: ``out(relu(proj(proj(z_m))))``
with ``proj = Linear(d_m, d_m)`` applied twice (as the code's ``Classifier.forward``) and
``out = Linear(d_m, K)``. The auxiliary classifiers have their own optimiser (gap G): AdamW,
``aux_lr`` 5e-4, ``aux_weight_decay`` 3e-3 (the code's ``cls_lr`` and weight decay); the main
optimiser does not hold them (``param_groups``). The trainer checkpoints it (``optimizers()``).

Per batch (``compute_loss`` + ``after_backward``, the code's order):

* ``L = CE(fused, y) + lambda * l_gm(previous step)``; backward (main optimiser's gradients).
* auxiliary: ``L_aux = sum_m CE(C_m(z_m.detach()), y)``, its own backward (through ``ctx.run``);
  ``acc_m`` = batch accuracy of ``C_m`` (before its step); ``d_m = acc_m - acc_m,prev``
  (``acc_prev`` = the previous step's, 0 at the start; kept across epochs);
  ``coeff_m = (sum_j d_j - d_m) / (sum_j d_j + 1e-8)``;
* ``cos_m = cosine(flat(C_m.out.weight), flat(W_m))`` -- WEIGHTS, as the code's ``cal_cos``;
  ``l_gm = (sum_m |coeff_m| - sum_m coeff_m cos_m) / M``, used in the NEXT step's loss;
* every parameter of encoder m: ``grad *= rho * coeff_m`` (``rho`` 1.3);
* the auxiliary optimiser steps; the model's gradients (not the auxiliary classifiers') are
  clipped to norm ``clip`` (0.8; ``grad_clip_owner = "method"``); the main optimiser steps.

Logged per batch: ``coeff_{m}``, ``cos_{m}``, ``aux_accuracy_{m}``, ``loss_gm`` (the term added
to this step's loss, 0 on the first), ``loss_aux``.

Decisions and deviations:
* DECISION (spec): the code's coefficient with guards -- ``coeff_m`` clipped to ``[0, 2]``, and
  every ``coeff = 1`` when ``|sum_j d_j| < 1e-6`` (the code then divides by 1e-8: ``-d_m / 1e-8``,
  or 0 when every d is 0, which zeroes every encoder gradient); ``guard=false`` gives the code's
  raw values. The spec's ``direction="grad"`` option (the paper's gradient-direction reading) is
  NOT implemented: only the code's weight cosine.
* ``W_m`` (mmbalance mapping): the code's fusion is a transformer over every modality's tokens
  followed by ONE ``out_layer`` (``[K, proj_dim]``, the size of every modality's tokens), which
  each ``C_m.out_layer`` is compared with. Here the fusion's classifier reads modality m through
  its own block: ``fusion.fc.weight[:, block_m]`` for ``concat`` (the W-split), the branch weight
  ``branches[m].weight`` for ``sum`` / ``late``; other fusions are refused (MethodSetupError).
  ``C_m``'s hidden size is ``d_m`` so the shapes match.
* ``l_gm`` of the previous step: the code keeps the autograd graph of ``cal_cos`` (on clones of
  the weights) into the next step, so that step's backward adds ``lambda * dl_gm/dW`` evaluated at
  the PREVIOUS weights (its contribution to ``C_m.out.weight`` is discarded by the auxiliary
  ``zero_grad``). We keep the previous weights and coefficients as tensors (checkpointable) and
  rebuild the same term: ``W_eff = W_prev + (W - W.detach())`` has the value ``W_prev`` and passes
  the gradient to ``W``; ``C_m``'s weights enter as constants. Same loss value and gradients.
* The auxiliary batch accuracies are batch statistics that change the gradients: under torchrun
  the correct counts and batch sizes are summed over processes first (every replica gets the
  same coefficients). The auxiliary forward runs through ``ctx.run`` (DDP averages its gradients).
* The code clips every model gradient at ``clip`` (0.8) also without modulation; here it is the
  method's option (``train.grad_clip`` must stay 0 with this method, else MethodSetupError).
  Main optimiser, schedule and epochs are the run's config (the code: AdamW 1e-3, wd 6e-3,
  ReduceLROnPlateau); presets only set ``lamda`` (0.2 for MOSI, the README; 0.05 Food-101).
* Mixed precision: coefficients and cosines in fp32 (spec §3.5).
* No host read of a device tensor in a step: the correct counts, accuracies, coefficients (the
  guard's flat case by ``torch.where``), gradient scales and logs stay on the device (0-d
  tensors; the trainer reads the logs once per epoch); ``acc_prev`` and ``gm_coeff`` live on the
  model's device. The auxiliary AdamW is ``fused=True``: the ``foreach`` implementation reads
  its per-parameter step counters on the host (two ``.item()`` per parameter, 16 per step); the
  fused kernel gives the same update up to the last ulp (measured: 3e-8 after 50 steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.cggm import coefficients, direction_cosines, gm_loss
from .base import LossOutput, Method, register_method
from .gradients import head_block, scale_modality_grads


@dataclass
class CGGMOptions:
    rho: float = 1.3  # encoder gradient scale: grad_m *= rho * coeff_m
    lamda: float = 0.05  # weight of l_gm in the next step's loss (the code's name; Food-101 0.05, MOSI 0.2)
    aux_lr: float = 5e-4  # AdamW rate of the auxiliary classifiers (the code's cls_lr)
    aux_weight_decay: float = 3e-3  # AdamW weight decay of the auxiliary classifiers
    clip: float = 0.8  # max global grad norm of the model (not the auxiliaries); 0 = off
    guard: bool = True  # coeff clipped to [0, 2], 1 when the accuracy changes sum to ~0 (spec DECISION)
    modulate: bool = True  # false: the code's modulation='none' (plain CE + clipping; no auxiliaries trained)

    def validate(self):
        errs = []
        for k in ("rho", "lamda", "aux_weight_decay", "clip"):
            if getattr(self, k) < 0:
                errs.append(f"{k} must be >= 0, got {getattr(self, k)}")
        if not self.aux_lr > 0:
            errs.append(f"aux_lr must be > 0, got {self.aux_lr}")
        return errs


CGGM_PRESETS = {
    "food101": {"method": {"lamda": 0.05}},
    "mosi": {"method": {"lamda": 0.2}},
}


class AuxClassifier(nn.Module):
    """``out(relu(proj(proj(z))))`` -- the code's ``Classifier`` head (its ``proj1`` applied twice)
    without the transformer (mmbalance encoders give pooled features)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(F.relu(self.proj(self.proj(z))))


def fusion_block(model, m: str) -> Tensor:
    """The fusion classifier's weights that read modality ``m`` (``[K, d_m]``)."""
    fusion = model.fusion
    name = type(fusion).__name__
    if name == "ConcatFusion":
        return fusion.fc.weight[:, head_block(model, m)]
    if name in ("SumFusion", "LateFusion"):
        return fusion.branches[m].weight
    raise MethodSetupError(f"method 'cggm' compares each auxiliary classifier with the fusion classifier's weights "
                           f"for its modality, which needs model.fusion=concat, sum or late; this model has {name}")


def _aux_forward(model, features: Dict[str, Tensor], labels: Tensor, modalities: List[str]):
    logits = {m: model.extras["cggm"][m](features[m]) for m in modalities}
    loss = sum(F.cross_entropy(logits[m].float(), labels) for m in modalities)
    return loss, logits


@register_method("cggm", paper="Guo et al., NeurIPS 2024", kind="optimisation", modalities=">=2",
                 description="CGGM: auxiliary per-modality classifiers (own AdamW) guide encoder gradient scales "
                             "from their accuracy changes, plus a classifier-direction loss")
class CGGM(Method):
    Options = CGGMOptions
    presets = CGGM_PRESETS
    modality_range = (2, None)
    grad_clip_owner = "method"
    #: ``acc_prev`` [M]; ``gm_coeff`` [M], ``gm_aux`` / ``gm_fusion`` ({m: weights}): the previous
    #: step's l_gm (None before the first step)
    state_attrs = ("acc_prev", "gm_coeff", "gm_aux", "gm_fusion")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.acc_prev = torch.zeros(len(self.modalities), dtype=torch.float64)
        self.gm_coeff: Optional[Tensor] = None
        self.gm_aux: Optional[Dict[str, Tensor]] = None
        self.gm_fusion: Optional[Dict[str, Tensor]] = None
        self._aux: Optional[nn.ModuleDict] = None
        self._opt: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------------------ set-up
    def extra_modules(self, model):
        for m in self.modalities:
            fusion_block(model, m)  # refuses other fusions now, not mid-training
        self._aux = nn.ModuleDict({m: AuxClassifier(d, model.num_classes) for m, d in model.feature_dims.items()})
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            self._aux.to(device)
        self._opt = None
        return {"cggm": self._aux}

    def param_groups(self, model):
        aux = {id(p) for p in model.extras["cggm"].parameters()} if hasattr(model, "extras") else set()
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in aux]}]

    def setup(self, model, ctx):
        if ctx.grad_clip > 0:
            raise MethodSetupError(f"method 'cggm' clips gradients itself (method.clip, the authors' "
                                   f"{self.Options.clip}); leave train.grad_clip at 0 (it is {ctx.grad_clip}) "
                                   f"and set method.clip instead")

    def optimizers(self):
        if self._aux is None:
            return {}
        if self._opt is None:
            o = self.options
            self._opt = torch.optim.AdamW(self._aux.parameters(), lr=o.aux_lr, weight_decay=o.aux_weight_decay,
                                          fused=True)  # one kernel, no host reads of its step counters
        return {"aux": self._opt}

    def _model_params(self, model):
        if getattr(self, "_params_of", None) is not model:
            aux = {id(p) for p in self._aux.parameters()}
            self._params = [p for p in model.parameters() if id(p) not in aux]
            self._params_of = model
        return self._params

    def _clip(self, model) -> None:
        if self.options.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self._model_params(model) if p.grad is not None],
                                           self.options.clip)

    # ------------------------------------------------------------------------------ training
    def previous_gm(self, model) -> Optional[Tensor]:
        """``l_gm`` of the previous step, its value at the previous weights, differentiable in the
        current fusion weights (see the module docstring)."""
        if self.gm_coeff is None:
            return None
        fus = []
        for m in self.modalities:
            w = fusion_block(model, m)
            prev = self.gm_fusion[m].to(device=w.device, dtype=w.dtype)
            fus.append(prev + (w - w.detach()))
        aux = [self.gm_aux[m].to(fus[0].device) for m in self.modalities]
        return gm_loss(self.gm_coeff.to(fus[0].device), direction_cosines(aux, fus))

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        loss = F.cross_entropy(out.logits, batch.labels)
        gm = self.previous_gm(model) if self.options.lamda > 0 and self.options.modulate else None
        logs = {"loss_fused": loss.detach()}
        if gm is not None:
            loss = loss + self.options.lamda * gm
            logs["loss_gm"] = gm.detach()
        return LossOutput(loss, out, logs)

    def after_backward(self, model, batch, result, ctx):
        o = self.options
        M = len(self.modalities)
        if not o.modulate:
            self._clip(model)
            return
        feats = {m: z.detach() for m, z in result.output.features.items()}
        opt = self.optimizers()["aux"]
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            aux_loss, logits = ctx.run(_aux_forward, feats, batch.labels, self.modalities)
        aux_loss.backward()
        with torch.no_grad():
            # counts, accuracies, coefficients and scales stay on the device (no host read)
            labels = batch.labels
            counts = torch.stack([(logits[m].argmax(1) == labels).sum() for m in self.modalities]
                                 + [torch.tensor(labels.shape[0], device=labels.device)]).double()
            counts = D.all_reduce_sum(counts)  # global batch accuracy: every replica the same
            acc = counts[:M] / counts[M]
            coeff = coefficients(acc, self.acc_prev.to(acc), guard=o.guard)
            self.acc_prev = acc.clone()
            aux_w = {m: self._aux[m].out.weight.detach().float().clone() for m in self.modalities}
            fus_w = {m: fusion_block(model, m).detach().float().clone() for m in self.modalities}
            cos = direction_cosines([aux_w[m] for m in self.modalities], [fus_w[m] for m in self.modalities])
            self.gm_coeff, self.gm_aux, self.gm_fusion = coeff.float(), aux_w, fus_w
            # float64 scales: cast to the gradients' dtype in the multiply, as the Python floats were
            scale_modality_grads(model, {m: o.rho * coeff[i] for i, m in enumerate(self.modalities)}, rule="all")
        opt.step()
        self._clip(model)
        for i, m in enumerate(self.modalities):  # 0-d device tensors: the trainer reads them once per epoch
            result.logs[f"coeff_{m}"] = coeff[i]
            result.logs[f"cos_{m}"] = cos[i]
            result.logs[f"aux_accuracy_{m}"] = acc[i]
        result.logs["loss_aux"] = aux_loss.detach()
        result.logs.setdefault("loss_gm", 0.0)

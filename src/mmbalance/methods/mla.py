"""MLA: Multimodal Learning with Alternating unimodal adaptation.

Paper: Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal
Adaptation", CVPR 2024. Code followed: ``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
Adaptation`` (``main.py::train_epoch``/``valid`` with ``--gs_flag``, ``utils/utils.py::GSPlugin``);
spec ``seed-methods.md`` §4 (MLA bullet).

* Model: one **shared head** ``fc = Linear(d, K)`` applied to every modality's feature (the
  method's fusion, :class:`SharedHeadFusion`; ``model.fusion`` is ignored). All encoders must
  output the same size ``d`` (else ``MethodSetupError``).
* Training (``training_step``): per batch, one step per modality in the dataset's modality order
  (the code: audio, visual, text): encode modality m, ``CE(fc(z_m), y)``, backward; project the
  shared head's **weight** gradient (not its bias) with the OWM-style projector
  ``r = mean_batch(z_m)``, ``alpha = 0.1 ** (1 + batch_idx / num_batches)``, ``k = P r^T``,
  ``P <- P - k k^T / (alpha + r k)``, ``P <- P / ||P||_F``, ``grad <- grad P^T``; optimiser
  step; gradients set to None. Only encoder m and the shared head have gradients in sub-step m,
  so the optimiser (SGD/Adam skip parameters without gradient) leaves the other encoders alone.
  One projector ``P`` (``d x d``, identity at start) is shared by all modalities, as ``GSPlugin``;
  it and the sub-step counter are method state (checkpointed).
* Inference: per-modality logits ``fc(z_m)`` fused by entropy gates
  ``w_m ∝ exp(H_max - H_m)`` (``fusion=dynamic``, default) or fixed weights (``fusion=fixed``:
  ``fixed_weights``, default uniform = the code's ``av_alpha=0.5``). Zero-out evaluation is the
  shared head on each modality alone (``zero_out_logits`` overridden).

Facts checked against the authors' code, and DECISIONS (each with its switch):
* ``alpha``, ``k``, the Frobenius normalisation and ``grad @ P^T`` are as in ``GSPlugin``; ``r``
  is the batch mean of the head's input (the encoder feature).
* Denominator: ``GSPlugin`` writes ``alpha + torch.mm(k, r)`` -- a ``[d, d]`` outer product
  dividing element-wise -- where OWM and the paper have the scalar ``alpha + r k``. Default the
  scalar (``denominator=owm``); ``denominator=code`` reproduces the code literally.
* In the released code the projection never runs: ``before_update`` looks for a parameter named
  ``"module.weight"`` in ``fusion_module.fc_out``, a bare ``nn.Linear`` whose parameters are named
  ``"weight"``/``"bias"``. We apply the projection as the paper describes (``project=true``);
  ``project=false`` reproduces the released code's effective behaviour (plain alternation).
* The code skips the very first sub-step of training (``exp_count == 0``: no update of P, no
  projection); so do we. P is updated with the current modality's ``r`` *before* projecting
  that modality's gradient (the code's order).
* Entropy gates: the code's ``calculate_entropy`` takes the softmax over the **batch** dimension
  and sums the entropy over the whole batch (one scalar gate per modality per batch); we default
  to per-sample entropies over classes (``gate_scope=sample``, the paper's per-sample form);
  ``gate_scope=batch`` is the code's.
* The code computes all features in one forward pass before the sub-steps; we encode modality m
  inside its own sub-step (identical values: the other sub-steps do not touch encoder m).
* Under DDP each process updates P with its own shard's ``r`` (not all-reduced).
* The code uses SGD lr 1e-3, momentum 0.9, wd 1e-4, bs 64, StepLR(70, 0.1), 100 epochs; left to the
  config (no presets), as for the other methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MethodSetupError
from ..functional.mla import (entropy_gates, fixed_weights, gated_logits, owm_update, project_gradient,
                              projector_alpha)
from ..models.fusion import Fusion
from ..models.multimodal import ModelOutput
from ..models.resnet import ogm_init
from .base import LossOutput, Method, register_method


@dataclass
class MLAOptions:
    fusion: str = "dynamic"  # dynamic (entropy gates) | fixed
    fixed_weights: List[float] = field(default_factory=list)  # fusion=fixed; empty = uniform 1/M
    gate_scope: str = "sample"  # sample (paper) | batch (authors' calculate_entropy)
    project: bool = True  # OWM-style projection of the shared head's weight gradient
    denominator: str = "owm"  # owm (scalar alpha + r k) | code (element-wise alpha + k r)

    def validate(self):
        errs = []
        if self.fusion not in ("dynamic", "fixed"):
            errs.append(f"fusion must be dynamic or fixed, got '{self.fusion}'")
        if self.gate_scope not in ("sample", "batch"):
            errs.append(f"gate_scope must be sample or batch, got '{self.gate_scope}'")
        if self.denominator not in ("owm", "code"):
            errs.append(f"denominator must be owm or code, got '{self.denominator}'")
        if any(w < 0 for w in self.fixed_weights):
            errs.append(f"fixed_weights must be >= 0, got {self.fixed_weights}")
        return errs


class SharedHeadFusion(Fusion):
    """One ``Linear(d, K)`` applied to each modality; fused logits = entropy-gated (``dynamic``)
    or fixed-weight sum of the per-modality logits."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, mode: str = "dynamic",
                 weights: Optional[List[float]] = None, scope: str = "sample"):
        super().__init__(dims, num_classes)
        sizes = set(self.dims.values())
        if len(sizes) != 1:
            raise MethodSetupError(f"method 'mla' applies one shared head to every modality, so all encoders must "
                                   f"output the same size; got {self.dims}. Use encoders with equal feature sizes "
                                   f"(model.feature_dim applies to the small encoders; ResNet-18 gives 512)")
        self.fc = nn.Linear(sizes.pop(), num_classes)
        self.mode = mode
        self.scope = scope
        self.register_buffer("weights", fixed_weights(len(self.modalities), weights), persistent=False)

    def modality_logits(self, features):
        return {m: self.fc(features[m]) for m in self.modalities}

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        ls = [logits[m] for m in self.modalities]
        w = entropy_gates(ls, self.scope) if self.mode == "dynamic" else self.weights
        return gated_logits(ls, w).to(ls[0].dtype)

    def forward(self, features):
        return self.combine(self.modality_logits(features))


@register_method("mla", paper="Zhang et al., CVPR 2024", kind="optimisation",
                 description="MLA: alternating unimodal steps through a shared head with OWM gradient projection; entropy-gated fusion")
class MLA(Method):
    Options = MLAOptions
    state_attrs = ("projector", "num_updates")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        w = self.options.fixed_weights
        if w and len(w) != len(self.modalities):
            raise MethodSetupError(f"method.fixed_weights needs one weight per modality ({len(self.modalities)}: "
                                   f"{', '.join(self.modalities)}), got {list(w)}")
        self.projector: Optional[Tensor] = None
        self.num_updates = 0

    def build_fusion(self, dims, num_classes, model_cfg):
        o = self.options
        fusion = SharedHeadFusion(dims, num_classes, o.fusion, o.fixed_weights, o.gate_scope)
        ogm_init(fusion)
        return fusion

    @staticmethod
    def _head(model) -> nn.Linear:
        if not isinstance(model.fusion, SharedHeadFusion):
            raise MethodSetupError("method 'mla' needs its shared-head fusion (built by MLA.build_fusion)")
        return model.fusion.fc

    def _project(self, head: nn.Linear, z: Tensor, ctx) -> None:
        g = head.weight.grad
        if g is None:
            return
        d = g.shape[1]
        if self.projector is None or self.projector.shape != (d, d):
            self.projector = torch.eye(d, device=g.device, dtype=torch.float32)
        self.projector = self.projector.to(g.device)
        r = z.detach().float().mean(dim=0)
        alpha = projector_alpha(ctx.batch_idx, ctx.num_batches)
        self.projector = owm_update(self.projector, r, alpha, self.options.denominator)
        head.weight.grad = project_gradient(g.float(), self.projector).to(g.dtype)

    def unimodal_step(self, model, batch, m: str, ctx):
        """One optimiser step on modality ``m``'s CE through the shared head (encoder m + head).
        Returns ``(features, logits, loss)``, detached."""
        head = self._head(model)
        ctx.optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            z = model.encode(batch.inputs, [m])[m]
            out = head(z)
            loss = F.cross_entropy(out.float(), batch.labels)
        loss.backward()
        ctx.sync_grads()
        if self.options.project and self.num_updates > 0:
            self._project(head, z, ctx)
        ctx.clip_grad()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        return z.detach(), out.detach(), loss.detach()

    def training_step(self, model, batch, ctx):
        batch = self.transform_batch(batch, ctx)
        feats: Dict[str, Tensor] = {}
        logits: Dict[str, Tensor] = {}
        losses: Dict[str, Tensor] = {}
        for m in self.modalities:
            feats[m], logits[m], losses[m] = self.unimodal_step(model, batch, m, ctx)
        with torch.no_grad():
            fused = model.fusion.combine(logits)
        total = torch.stack(list(losses.values())).mean()
        logs = {f"loss_{m}": float(v) for m, v in losses.items()}
        return LossOutput(total, ModelOutput(fused, feats, {}), logs)

    def zero_out_logits(self, model, output):
        """The shared head on each modality alone (what the authors report as unimodal accuracy)."""
        head = self._head(model)
        return {m: head(output.features[m]) for m in self.modalities}

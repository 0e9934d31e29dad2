"""InfoReg: adaptive unimodal regulation of information acquisition.

Paper: Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information
Acquisition", CVPR 2025 (arXiv 2503.18595). Code followed: GeWu-Lab/InfoReg_CVPR2025@939b2ed
(``main.py::train_epoch``, ``main.py::main``), as specified in ``shared/specs/baselines.md``
§4.21. Math in ``functional/inforeg.py``.

Computation:

* epoch start (``on_epoch_start``): snapshot ``theta_e`` of every encoder parameter; the
  window test per modality ``k_m = 1`` at epoch 0, else ``(T1 - T2) / T1`` with
  ``T1 = mean(tr_m[-10:])``, ``T2 = mean(tr_m[-11:-1])`` over the per-epoch Fisher-trace list
  ``tr_m`` (initialised with ``window`` = 10 zeros, as the code);
* per batch (``compute_loss``): ``L = CE(fused) + w sum_m CE(l_m)`` with the fusion's
  per-modality logits ``l_m`` (W-split with ``b/M`` for concat; ``w = unimodal_weight`` = 1 in the
  code); scores ``s_m = sum_i softmax(l_m)_i[y_i]`` (batch sums, no grad);
  ``beta_m = gamma_m exp(tanh(s_m - mean_{j != m} s_j))`` for every modality with
  ``s_m > mean_j s_j`` whose window is open (``k > threshold`` = 0.05), else 0 (M = 2: the code's
  ``s_a > s_v`` rule);
* ``after_backward``: ``p.grad += beta_m (p - p_e)`` for every parameter of encoder m (the
  gradient of the proximal term ``beta_m / 2 ||theta_m - theta_e||^2``); then the squared
  weight gradients of every Linear / Conv layer of each encoder are accumulated (after the
  proximal term, before clipping, as the code);
* epoch end: ``tr_m.append(sum_layers mean(F_m[layer]))``; accumulators reset.

Logged: per batch ``coeff_{m}`` (beta_m) and ``score_{m}``; per epoch ``trace_{m}`` and
``window_k_{m}`` (the k used in that epoch).

Options: ``gamma=0.95`` (every modality), ``gamma_modality`` (per-name overrides),
``threshold=0.05``, ``window=10``, ``window_modality="dominant"`` (each modality's own trace
decides whether *it* may still be regulated; a modality name makes that modality's trace decide
for all -- ``audio`` reproduces the code), ``unimodal_weight=1.0``.
Preset ``cremad``: ``gamma_modality={audio: 0.95, visual: 0.1}`` (the code's constants).

Decisions and deviations:
* DECISION (spec): regulate the dominant modality (``argmax s_m``; M > 2: every modality above
  the mean, an extension), window test on the regulated modality's own trace
  (``window_modality="dominant"``); the code's CREMA-D constants 0.95 / 0.1 are the ``cremad``
  preset, 0.95 the default elsewhere. The cremad preset keeps ``window_modality="dominant"`` (on
  CREMA-D audio dominates, so it is the code's test in practice); set
  ``method.window_modality=audio`` for the literal code.
* The code's three extra ``backward(retain_graph=True)`` passes only log gradients and are
  dropped (cost about 1x joint plus one copy of the encoder parameters).
* ``T1 == 0`` gives ``k = 0`` (the code: division by zero, NaN, no regulation -- the same).
* Fisher layers: every ``nn.Linear`` and convolution (``_ConvNd``) inside an encoder, weight
  gradients only (the code: Conv2d / Linear of its ResNet encoders).
* Distributed (torchrun): the scores are summed over processes (one ``all_reduce_sum`` of the
  ``[M]`` vector), so every replica uses the global-batch coefficients (batch sums then scale
  with the global batch, as OGM's); the proximal term and the Fisher accumulation read the
  DDP-averaged gradients, so snapshot, traces and k are identical on every process.
* State (checkpointed): the snapshot (a tensor per encoder parameter -- doubles the encoder part
  of the checkpoint, spec gap K), the trace lists, the current Fisher accumulators and k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.inforeg import fisher_trace, regulation_coefficients, window_growth
from ..functional.scores import modality_scores
from ..registry import suggest
from .base import LossOutput, Method, register_method


@dataclass
class InfoRegOptions:
    gamma: float = 0.95
    gamma_modality: Dict[str, float] = field(default_factory=dict)  # per-modality overrides of gamma
    threshold: float = 0.05  # regulate while k > threshold
    window: int = 10  # epochs in the trace window
    window_modality: str = "dominant"  # dominant | a modality name (audio = the code)
    unimodal_weight: float = 1.0  # weight of the per-modality cross-entropies

    def validate(self):
        errs = []
        if self.gamma < 0:
            errs.append(f"gamma must be >= 0, got {self.gamma}")
        bad = {m: g for m, g in self.gamma_modality.items() if g < 0}
        if bad:
            errs.append(f"gamma_modality values must be >= 0, got {bad}")
        if self.window < 1:
            errs.append(f"window must be >= 1, got {self.window}")
        if self.unimodal_weight < 0:
            errs.append(f"unimodal_weight must be >= 0, got {self.unimodal_weight}")
        return errs


INFOREG_PRESETS = {"cremad": {"method": {"gamma_modality": {"audio": 0.95, "visual": 0.1}}}}


def fisher_layers(encoder: nn.Module) -> Dict[str, nn.Parameter]:
    """The weights whose squared gradients InfoReg accumulates: Linear and convolution layers."""
    return {name: mod.weight for name, mod in encoder.named_modules()
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and mod.weight.requires_grad}


@register_method("inforeg", paper="Huang et al., CVPR 2025", kind="optimisation", modalities=">=2",
                 description="InfoReg: proximal regulation of the dominant encoder during its prime learning window")
class InfoReg(Method):
    Options = InfoRegOptions
    presets = INFOREG_PRESETS
    modality_range = (2, None)
    state_attrs = ("snapshot", "traces", "fisher", "window_k")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        o = self.options
        unknown = [m for m in o.gamma_modality if m not in self.modalities]
        if o.window_modality != "dominant" and o.window_modality not in self.modalities:
            unknown.append(o.window_modality)
        if unknown:
            raise MethodSetupError(f"inforeg: unknown modality {unknown[0]!r}.{suggest(unknown[0], self.modalities)} "
                                   f"Modalities: {', '.join(self.modalities)}")
        self.gammas = [float(o.gamma_modality.get(m, o.gamma)) for m in self.modalities]
        self.snapshot: Dict[str, Dict[str, torch.Tensor]] = {}
        self.traces: Dict[str, List[float]] = {m: [0.0] * o.window for m in self.modalities}
        self.fisher: Dict[str, Dict[str, torch.Tensor]] = {m: {} for m in self.modalities}
        self.window_k: Dict[str, float] = {m: 1.0 for m in self.modalities}

    # ------------------------------------------------------------------------ epoch boundaries
    def on_epoch_start(self, model, ctx):
        o = self.options
        self.snapshot = {m: {n: p.detach().clone() for n, p in model.encoders[m].named_parameters()}
                         for m in self.modalities}
        self.fisher = {m: {} for m in self.modalities}
        if ctx.epoch == 0:
            self.window_k = {m: 1.0 for m in self.modalities}
        elif o.window_modality == "dominant":
            self.window_k = {m: window_growth(self.traces[m], o.window) for m in self.modalities}
        else:
            k = window_growth(self.traces[o.window_modality], o.window)
            self.window_k = {m: k for m in self.modalities}

    def on_epoch_end(self, model, ctx):
        logs = {}
        for m in self.modalities:
            tr = fisher_trace(self.fisher[m])
            self.traces[m].append(tr)
            logs[f"trace_{m}"] = tr
            logs[f"window_k_{m}"] = float(self.window_k[m])
        self.fisher = {m: {} for m in self.modalities}
        return logs

    # ------------------------------------------------------------------------ per batch
    def coefficients(self, modality_logits, labels):
        with torch.no_grad():
            feats = {m: modality_logits[m].detach().float() for m in self.modalities}
            scores = modality_scores(feats, labels)
            s = D.all_reduce_sum(torch.stack([scores[m] for m in self.modalities]))
            gam = torch.tensor(self.gammas, device=s.device, dtype=s.dtype)
            open_ = torch.tensor([self.window_k[m] > self.options.threshold for m in self.modalities], device=s.device)
            return regulation_coefficients(s, gam, open_), s

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        logits = model.modality_logits(out.features)
        fused = F.cross_entropy(out.logits, batch.labels)
        uni = {m: F.cross_entropy(logits[m], batch.labels) for m in self.modalities}
        loss = fused + self.options.unimodal_weight * sum(uni.values())
        beta, s = self.coefficients(logits, batch.labels)
        logs = {"loss_fused": fused.detach()}
        for i, m in enumerate(self.modalities):
            logs[f"coeff_{m}"], logs[f"score_{m}"], logs[f"loss_{m}"] = beta[i], s[i], uni[m].detach()
        return LossOutput(loss, out, logs)

    def after_backward(self, model, batch, result, ctx):
        with torch.no_grad():
            for m in self.modalities:
                beta = result.logs[f"coeff_{m}"]
                snap = self.snapshot.get(m, {})
                for n, p in model.encoders[m].named_parameters():
                    if p.grad is None or n not in snap:
                        continue
                    p.grad.add_(beta.to(p.grad.dtype) * (p.detach() - snap[n].to(p.device, p.dtype)))
                acc = self.fisher[m]
                for name, w in fisher_layers(model.encoders[m]).items():
                    if w.grad is None:
                        continue
                    sq = w.grad.detach().float() ** 2
                    acc[name] = sq if name not in acc else acc[name].to(sq.device) + sq

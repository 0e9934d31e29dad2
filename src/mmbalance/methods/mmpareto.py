"""MMPareto: multimodal learning with innocent unimodal assistance (Pareto gradient integration).

Paper: Wei, Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
ICML 2024 (arXiv 2405.17730). Code followed: GeWu-Lab/MMPareto_ICML2024@a339db3
(``code/MMPareto.py::train_epoch``, ``code/min_norm_solvers.py``, ``code/models/models.py``), as
specified in ``shared/specs/baselines.md`` §4.9. Math in ``functional/mmpareto.py``.

Model: the configured fusion plus one linear unimodal head per modality (``configure_model``
switches ``model.unimodal_heads`` on). Per batch (``training_step``):

* one forward; ``L_mm = CE(fused, y)``, ``L_m = CE(head_m(z_m), y)``;
* gradients kept apart (``per_loss_grads``, two backward passes: ``L_mm`` and ``sum_m L_m`` --
  ``L_m`` depends on encoder m only, so the second pass gives every ``g_u^m`` at once);
* every encoder m: ``cos(g_mm^m, g_u^m)`` over the whole encoder; weights (0.5, 0.5) if
  ``cos > 0``, else the two-vector MinNorm weights; ``new = 2 (k1 g_mm + k2 g_u)``, rescaled to at
  least the norm of ``g_mm + g_u`` per parameter tensor (``rescale="tensor"``, the code) and times
  ``gamma`` (1.5, hard-coded in the code);
* every other parameter (fusion, heads): the plain gradient of ``L_mm + sum_m L_m``;
* clipping (``train.grad_clip``, trainer-owned semantics) and the optimiser step.

Logged per batch: ``coeff_{m}`` (k1, the weight of the multimodal gradient: 0.5 without
conflict) and ``cos_{m}``; ``loss_fused`` and ``loss_{m}``.

Options: ``gamma=1.5`` (the code's constant), ``rescale="tensor"|"encoder"``,
``conflict="minnorm"|"sum"`` (``sum``: always (0.5, 0.5); with ``gamma=1`` the method is then
exactly ``multiloss``, the no-op configuration). No per-dataset values are known (the script uses
the same settings everywhere), so there are no presets.

Decisions and deviations:
* DECISION (spec): the code's per-tensor rescaling; ``rescale="encoder"`` is the paper's reading
  (recollection, unverified).
* MinNorm is :func:`mmbalance.functional.common.min_norm_2` (``gamma* = clamp((g_u - g_mm).g_u /
  ||g_mm - g_u||^2, 0, 1)``). It equals the code's ``_min_norm_element_from2`` whenever
  ``cos <= 0`` except in the degenerate case ``g_mm == 0`` (code: weight 0.999 on ``g_mm``,
  here 1.0); the result then differs by 0.001 g_u.
* Gradients computed with ``torch.autograd.grad`` (no ``.grad`` clobbering, no backward hooks):
  2 backward passes instead of the code's 3 + 1.
* Distributed (torchrun): ``torch.autograd.grad`` bypasses DDP's gradient all-reduce, so this
  method does NOT run its forward through ``ctx.run`` (which would make DDP expect a backward
  and all-reduce ``.grad``). It calls the model directly, computes the per-loss gradients
  locally, concatenates them into one flat vector per loss, sums it over processes with
  ``mmbalance.distributed.all_reduce_sum`` and divides by the world size (the DDP average),
  and only then computes cosines, MinNorm weights and norms and writes ``p.grad``. Every
  replica therefore combines identical gradients and takes an identical step. Consequence:
  DDP's buffer broadcast (BatchNorm running statistics) does not happen for this method; each
  process keeps its own running statistics (they are not parameters, and evaluation runs on
  rank 0's copy).
* Mixed precision: the combination runs in fp32 (spec §3.5); gradients are cast back to each
  parameter's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.grads import flatten, per_loss_grads, unflatten
from ..functional.mmpareto import integrate
from .base import LossOutput, Method, register_method


@dataclass
class MMParetoOptions:
    gamma: float = 1.5  # the code's hard-coded final scale
    rescale: str = "tensor"  # tensor (the code) | encoder
    conflict: str = "minnorm"  # minnorm (the code) | sum (always 0.5 / 0.5)

    def validate(self):
        errs = []
        if self.gamma < 0:
            errs.append(f"gamma must be >= 0, got {self.gamma}")
        if self.rescale not in ("tensor", "encoder"):
            errs.append(f"rescale must be tensor or encoder, got '{self.rescale}'")
        if self.conflict not in ("minnorm", "sum"):
            errs.append(f"conflict must be minnorm or sum, got '{self.conflict}'")
        return errs


@register_method("mmpareto", paper="Wei & Hu, ICML 2024", kind="optimisation", modalities=">=2",
                 description="MMPareto: per-encoder MinNorm integration of multimodal and unimodal-head gradients")
class MMPareto(Method):
    Options = MMParetoOptions
    modality_range = (2, None)

    def configure_model(self, model_cfg):
        model_cfg.unimodal_heads = True

    def _groups(self, model):
        enc: Dict[str, List[torch.nn.Parameter]] = {
            m: [p for p in model.encoders[m].parameters() if p.requires_grad] for m in self.modalities}
        ids = {id(p) for ps in enc.values() for p in ps}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return enc, rest

    def losses(self, model, batch):
        out = model(batch.inputs)
        if set(out.unimodal_logits) != set(self.modalities):
            raise MethodSetupError("mmpareto needs one unimodal head per modality (model.unimodal_heads); "
                                   "build the model through the method (prepare_model / Trainer)")
        fused = F.cross_entropy(out.logits, batch.labels)
        uni = {m: F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in self.modalities}
        return out, fused, uni

    def combined_grads(self, model, fused, uni):
        """``{param: gradient}`` to write (``None`` where no loss reaches the parameter) and the
        per-modality ``(k1, cos)``."""
        o = self.options
        enc, rest = self._groups(model)
        groups = {**{f"enc:{m}": ps for m, ps in enc.items()}, "rest": rest}
        g = per_loss_grads({"mm": fused, "uni": sum(uni.values())}, groups, retain_graph=False)
        like = [p for ps in groups.values() for p in ps]
        used = [a is not None or b is not None for k in groups for a, b in zip(g["mm"][k], g["uni"][k])]
        vec = torch.cat([flatten([x for k in groups for x in g[loss][k]], like).float() for loss in ("mm", "uni")])
        if D.is_distributed():  # the DDP average, by hand (autograd.grad bypasses DDP's reducer)
            vec = D.all_reduce_sum(vec) / D.world_size()
        n = vec.numel() // 2
        g_mm, g_u = vec[:n], vec[n:]
        out = torch.empty_like(g_mm)
        stats = {}
        start = 0
        for key, ps in groups.items():
            size = sum(p.numel() for p in ps)
            a, b = g_mm[start:start + size], g_u[start:start + size]
            if key == "rest":
                out[start:start + size] = a + b
            else:
                m = key[4:]
                new, k1, cos = integrate(a, b, [p.numel() for p in ps], o.gamma, o.rescale, o.conflict)
                out[start:start + size] = new
                stats[m] = (k1, cos)
            start += size
        grads = {p: (t if u else None) for p, t, u in zip(like, unflatten(out, like), used)}
        return grads, stats

    def training_step(self, model, batch, ctx):
        batch = self.transform_batch(batch, ctx)
        with ctx.autocast():
            out, fused, uni = self.losses(model, batch)  # NOT through ctx.run: see the module docstring
        ctx.optimizer.zero_grad(set_to_none=True)
        grads, stats = self.combined_grads(model, fused, uni)
        with torch.no_grad():
            for p, gp in grads.items():
                p.grad = None if gp is None else gp.to(p.dtype).clone()
        loss = (fused + sum(uni.values())).detach()
        logs = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in uni.items()}}
        for m, (k1, cos) in stats.items():
            logs[f"coeff_{m}"], logs[f"cos_{m}"] = k1, cos
        result = LossOutput(loss, out, logs)
        return self.finish_step(model, batch, result, ctx)

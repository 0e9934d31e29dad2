"""AMSS / AMSS+: Adaptively Masking Subnetworks (gradient masks over conv filters).

Paper: Yang Yang et al., "Learning to Rebalance Multi-Modal Optimization by Adaptively Masking
Subnetworks", TPAMI 2025 (arXiv 2404.08347). Code followed: njustkmg/TPAMI-AMSS@3161ecc --
``AMSS/train_test.py`` (``modal_caculate_MI``, ``calculate_outputs``, ``train_epoch``),
``AMSS/MaskModel.py``; spec ``baselines.md`` §4.23. Pure math in ``functional/amss.py``.

Per batch, after ``CE(fused).backward()`` (the loss is joint training's):

1. ``s_m = -CE(l_m, y)`` (batch mean) with the fusion's per-modality logits (W-split with
   ``b/M`` for concat), ``H_Y = CrossEntropyLoss(pi, pi)`` with ``pi`` the batch label
   frequencies, ``H_m = CrossEntropyLoss(z_m, softmax(z_m))`` (entropy of the softmaxed feature
   vector); all under ``no_grad`` in fp32;
2. ``rho_m = (s_m + H_Y + 0.5) / H_m``, ``t_m = rho_m / T``; M = 2: ``c_a = e^{t_v} / (e^{t_a} +
   e^{t_v})``, ``c_v = e^{t_a} / (...)`` (NaN -> 0.5), clamped to ``[0.1, 0.9]``; 0.5 for both
   when ``s_m + H_Y + 0.5 <= 0`` for some m. The more informative modality keeps fewer filters;
3. for every masked gradient of encoder m (the code: 4-D weights whose name contains ``layer``
   and ``conv`` -- ResNet stages 1-4, not the stem, not the downsample convs):
   ``g_f = sum grad_f^2`` per output filter, ``pi = g / sum g``, ``n = ceil(C_out c_m)`` filters
   sampled without replacement proportionally to ``pi`` (``sample_mode=adaptive``); the kept
   filters' gradients are multiplied by 1 (``amss``) or by ``1 / (pi_f + 1/C_out)`` (``amss_plus``,
   the code's ``--isbias 1``), the others by 0.

AMSS+ is a second registry name, ``amss_plus``, rather than a ``variant`` option: the paper
reports AMSS and AMSS+ as two methods side by side, and a registry name is what the CLI
(``--method``), sweeps, result folders and ``mmbalance list`` identify a method by; both share
every option.

Decisions and deviations (each a switch or named here):

* Spec DECISION on the head mask: the code computes ``mask_ffn`` for ``fc_out.weight`` but never
  applies it (and its AMSS+ scaling uses the sampled *indices* instead of importances). Default
  ``mask_head=false`` = the code's effective behaviour (the fusion head is not masked).
  ``mask_head=true`` applies the intended mask on the concat head: for each class row of
  modality m's column block, ``floor(d_m c_m)`` entries (the code's ``int(...)``) chosen by the
  same sample mode from the per-entry ``grad^2`` importances, scaled by 1 or (AMSS+)
  ``1 / (pi + 1/d_m)`` with the row's importances ``pi``; the bias is untouched.
* Spec DECISION on the code facts reproduced as the code does: ``H_Y`` passes probabilities as
  logits (``-sum pi log softmax(pi)``, not the label entropy), over classes ``0..max(label)`` of
  the batch (``bincount`` without ``minlength``); ``H_m`` is the entropy over feature
  dimensions; the temperature is a plain option (the code reads a global ``config``).
* Which gradients are masked (``params``): ``code`` = the code's rule; ``conv`` = every 4-D
  weight; ``weights`` = every weight with >= 2 dims (rows = output units); ``auto`` (default) =
  ``code`` where the encoder has such parameters, else ``conv``, else ``weights`` (MLP and
  transformer encoders have no ResNet stages, and the code's rule would mask nothing).
* AMSS+ scaling only in ``sample_mode=adaptive`` (the code: ``isbias == 1 and sample_mode ==
  'Adaptive'``); the other modes use 1. ``bernoulli`` keeps each filter with probability
  ``pi_f`` (ignoring ``c_m``), as the code. When fewer than ``n`` filters have a non-zero
  gradient (``torch.multinomial`` without replacement would fail) all of those are kept: the
  others' gradients are zero whatever their mask.
* M > 2 (extension, as the spec): ``c_m = sum_{j != m} e^{t_j} / ((M - 1) sum_j e^{t_j})`` (the
  ``c_m`` sum to 1; the code's pairing for M = 2); the fallback is ``1/M`` (0.5 for M = 2).
* Processes: ``s_m``, ``H_m`` and the label counts are sums over the global batch (one
  ``all_reduce_sum``), so every replica uses the same coefficients; the sampling generator is
  seeded from (seed, step) identically on every process (``amss_generator``), so replicas apply
  identical masks to their identical (DDP-averaged) gradients. The code samples from torch's
  global RNG.
* Clamp bounds are options (``coeff_min``, ``coeff_max``; the code's 0.1 and 0.9);
  ``coeff_min = coeff_max = 1`` keeps every filter (a no-op: joint training).
* Logs (per batch): ``coeff_{m}`` (kept fraction ``c_m``) and ``ratio_{m}`` (``rho_m``).
* Host syncs: the sample sizes ``ceil(C c_m)`` and each layer's selection statistics (is the
  importance positive, how many filters are non-zero) are needed on the host; they are computed
  on the device for every masked layer first and read back in one transfer per step, then the
  masks are sampled in the original order (same generator draws, same masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .. import distributed as D
from ..functional.amss import (
    GN_MODES,
    SAMPLE_MODES,
    amss_coefficients,
    amss_feature_entropy,
    amss_generator,
    amss_label_entropy_term,
    filter_importance,
    filter_mask,
    num_kept,
    select_filters,
    selection_stats,
)
from .base import Method, register_method
from .gradients import head_block

PARAM_RULES = ("auto", "code", "conv", "weights")


@dataclass
class AMSSOptions:
    temperature: float = 0.2  # T
    sample_mode: str = "adaptive"  # adaptive | topk | random | bernoulli
    gn_mode: str = "gn"  # gn | sqrt_gn | gn_wn
    params: str = "auto"  # auto | code | conv | weights
    coeff_min: float = 0.1
    coeff_max: float = 0.9
    mask_head: bool = False  # the code computes a head mask but never applies it

    def validate(self):
        errs = []
        if not self.temperature > 0:
            errs.append(f"temperature must be > 0, got {self.temperature}")
        if self.sample_mode not in SAMPLE_MODES:
            errs.append(f"sample_mode must be one of {', '.join(SAMPLE_MODES)}, got '{self.sample_mode}'")
        if self.gn_mode not in GN_MODES:
            errs.append(f"gn_mode must be one of {', '.join(GN_MODES)}, got '{self.gn_mode}'")
        if self.params not in PARAM_RULES:
            errs.append(f"params must be one of {', '.join(PARAM_RULES)}, got '{self.params}'")
        if not 0.0 <= self.coeff_min <= self.coeff_max <= 1.0:
            errs.append(f"need 0 <= coeff_min <= coeff_max <= 1, got {self.coeff_min}, {self.coeff_max}")
        return errs


def masked_parameters(encoder: torch.nn.Module, rule: str) -> List[Tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs whose gradients AMSS masks (see ``params``)."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    code = [(n, p) for n, p in named if p.dim() == 4 and "layer" in n and "conv" in n]
    conv = [(n, p) for n, p in named if p.dim() == 4]
    weights = [(n, p) for n, p in named if p.dim() >= 2]
    if rule == "code":
        return code
    if rule == "conv":
        return conv
    if rule == "weights":
        return weights
    return code or conv or weights


@register_method("amss", paper="Yang et al., TPAMI 2025", kind="optimisation",
                 description="AMSS: keep a coefficient-sized, importance-sampled subset of each encoder's filter gradients")
class AMSS(Method):
    Options = AMSSOptions
    plus = False

    def coefficients(self, model, features, labels) -> Dict[str, torch.Tensor]:
        """``{"coeff": [M], "ratio": [M]}`` from the global batch."""
        o = self.options
        M = len(self.modalities)
        feats = {m: features[m].detach().float() for m in self.modalities}
        with torch.no_grad(), torch.autocast(device_type=labels.device.type, enabled=False):
            logits = model.modality_logits(feats)
            ll = torch.stack([torch.log_softmax(logits[m].float(), 1).gather(1, labels.view(-1, 1)).sum()
                              for m in self.modalities])
            ent = torch.stack([amss_feature_entropy(feats[m], "sum") for m in self.modalities])
            counts = torch.bincount(labels, minlength=self.num_classes).float().to(ll.device)
            n = torch.tensor([float(labels.shape[0])], device=ll.device)
            vec = D.all_reduce_sum(torch.cat([ll, ent, counts, n]))
            total = vec[-1]
            s, h = vec[:M] / total, vec[M:2 * M] / total
            h_y = amss_label_entropy_term(vec[2 * M:-1])
            c, rho = amss_coefficients(s, h_y, h, o.temperature, o.coeff_min, o.coeff_max)
        return {"coeff": c, "ratio": rho}

    def after_backward(self, model, batch, result, ctx):
        o = self.options
        co = self.coefficients(model, result.output.features, batch.labels)
        coeff = co["coeff"]
        plus = self.plus and o.sample_mode == "adaptive"
        gens: Dict[torch.device, torch.Generator] = {}

        def gen(dev):
            if dev not in gens:
                gens[dev] = amss_generator(ctx.seed, ctx.global_step, dev)
            return gens[dev]

        with torch.no_grad():
            # pass 1, on the device: the importance of every masked gradient (encoders, then the
            # head's rows); the coefficients and every layer's selection statistics are read
            # back in ONE transfer (not two host reads per layer)
            layers = []  # (modality index, grad, importance)
            for i, m in enumerate(self.modalities):
                for _, p in masked_parameters(model.encoders[m], o.params):
                    if p.grad is not None:
                        layers.append((i, p.grad, filter_importance(p.grad, p, o.gn_mode)))
            head = self._head_importances(model) if o.mask_head else []
            imps = [imp for _, _, imp in layers] + [imp for _, _, imp in head]
            host = torch.cat([coeff.detach().float().view(-1)] + [selection_stats(imp) for imp in imps]).tolist()
            fractions, flat = host[:len(self.modalities)], host[len(self.modalities):]
            stats = [flat[2 * j: 2 * j + 2] for j in range(len(imps))]
            # pass 2: sample and mask in the original order (the generator is consumed identically)
            for (i, grad, imp), st in zip(layers, stats):
                sel = select_filters(imp, num_kept(imp.numel(), fractions[i]), o.sample_mode, gen(imp.device), st)
                mask = filter_mask(imp, sel, plus, bool(st[0]))
                grad.mul_(mask.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))))
            if o.mask_head:
                self._mask_head(model, fractions, plus, gen, head, stats[len(layers):])
        result.logs.update({f"coeff_{m}": coeff[i] for i, m in enumerate(self.modalities)})
        result.logs.update({f"ratio_{m}": co["ratio"][i] for i, m in enumerate(self.modalities)})

    def _head_importances(self, model):
        """``(modality index, row, importance)`` of every row of every modality's head block."""
        o = self.options
        fc = model.fusion.fc
        g = fc.weight.grad
        if g is None:
            return []
        out = []
        for i, m in enumerate(self.modalities):
            cols = head_block(model, m)
            block, w = g[:, cols], fc.weight[:, cols]
            d = block.shape[1]
            for k in range(block.shape[0]):
                out.append((i, k, filter_importance(block[k].reshape(d, 1), w[k].reshape(d, 1), o.gn_mode)))
        return out

    def _mask_head(self, model, fractions, plus, gen, head, stats):
        o = self.options
        g = model.fusion.fc.weight.grad
        if g is None:
            return
        for i, m in enumerate(self.modalities):
            cols = head_block(model, m)
            block = g[:, cols]
            d = block.shape[1]
            n = int(d * fractions[i])  # the code's int(): floor
            for (j, k, imp), st in zip(head, stats):
                if j != i:
                    continue
                sel = select_filters(imp, n, o.sample_mode, gen(imp.device), st)
                block[k] = block[k] * filter_mask(imp, sel, plus, bool(st[0])).to(block.dtype)
            g[:, cols] = block


@register_method("amss_plus", paper="Yang et al., TPAMI 2025", kind="optimisation",
                 description="AMSS+: AMSS with the kept filter gradients rescaled by 1/(pi_f + 1/C) (unbiased)")
class AMSSPlus(AMSS):
    plus = True

"""MCR: Multimodal Competition Regularizer.

Paper: Kontras, Strypsteen, Chatzichristos, Liang, Blaschko, De Vos, "Multimodal Fusion
Balancing through Game-Theoretic Regularization" (MCR; ``/work/shared/papers/mcr.txt``).
Code followed: ``kkontras/MCR`` -- the standalone ``MCR_Linear`` model plus
``Bias_Infusion_MCR`` / ``get_perturbed_gradients`` -- through the project spec
(``seed-methods.md`` §3.5), which is authoritative here.

Per batch (one encoder pass, features ``z_m`` re-used everywhere)::

    L = CE(y_hat, y) + lambda_uni * sum_m CE(h_m(z_m), y)             # separate unimodal heads
        + L_game                                                      # permutation game
        + con_weight * NTXent(cat_m z_m, cat_m y; temperature)        # shared information
        + ceb_weight * MSE(g(y_hat.detach()), cat_m z_m)              # reconstruction (CEB)

* Fusion: linear late fusion ``y_hat = sum_m z_m W_m^T + b`` = the W-split of the concat head
  (``model.fusion=concat``, the only fusion accepted; others raise ``MethodSetupError``).
* ``L_game``: ``P = num_samples`` random permutations of the batch (no filtering) applied in
  latent space to one modality (or one subset, below) at a time; the perturbed logits keep the
  bias; ``J_m`` = JSD (natural log, batchmean, [0, ln 2]) between perturbed and (non-detached)
  base logits. The game is realised by detach patterns only (spec §3.5.4): ``strategy=greedy``
  (default) ``lam_M * sum_m (-J_m^own + J_m^oth)``; ``independent`` ``-lam_M * sum_m J_m^own``;
  ``collaborative`` ``-lam_M * sum_m J_m^all``. With greedy the bias and the base logits get no
  gradient from the game (the weight blocks: see ``fusion_in_game``): encoder m maximises its
  own permutation importance, the other encoders minimise it.
* ``fusion_in_game`` -- what a detach covers. ``with_encoder`` (default; the authors'
  ``MCR_Model``): the product ``z_m W_m^T`` is detached, so the weight block ``W_m`` plays on its
  encoder's side (greedy: ``W_m`` ascends ``J_m`` with encoder m and descends every other
  ``J_j``; the bias and the base logits still cancel). ``none`` (mmbalance's first reading,
  spec §3.5.4's "features" wording): only the feature ``z_m`` is detached, the weight blocks'
  gradients from ``own`` and ``oth`` cancel and the fusion layer gets no game gradient. The
  encoders' gradients are identical in both. Default chosen on the synthetic sweep
  (``docs/mcr_game_sweep.md``, 4 points x 3 seeds): fused accuracy within the seed noise
  (-0.46 to +0.42 points) and a higher, far more stable zero-out accuracy of the weak modality
  x2 at every point (+3.1 to +7.7 points; std 0.2-1.2 instead of 3.8-10.2; S=0.6, U1=0.3:
  73.2 +- 0.5 vs 69.0 +- 5.5).
* M > 2 (paper App. A.5): for a permuted set S, ``own`` = S permuted (one permutation for all
  of S) with every feature outside S detached; ``oth`` = S permuted with S's features detached
  (gradient to all other encoders). ``subsets=singles`` (default, the paper's |S| = 1) uses the
  M single modalities; ``subsets=all`` every non-empty proper subset (2^M - 2 terms; the full
  set has no opponent and only reorders the batch, so it is left out). With two modalities the
  two are the same. The number of game terms is logged per step as ``game_terms`` (M under
  ``singles``: results are "singles only").
* ``L_Con``: supervised NT-Xent (pml ``NTXentLoss`` semantics) on the raw encoder features of all
  modalities with labels repeated; temperature 0.5, weight 1.
* ``L_CEB``: ``g = Linear(K, d, bias=False) -> ReLU -> Linear(d, sum_m d_m, bias=False)`` on the
  detached fused logits, MSE to the non-detached concatenated features; trained with the model
  (``model.extras["mcr_ceb"]``). Off by default (``ceb_weight=0``, as the ResNet runs).

DECISIONS / deviations (each with its switch):
* Bias in the perturbed logits: kept (the standalone drops it, the older model keeps it; spec
  decision). No switch.
* Extra eval-mode encoder pass of the older ``MCR_Model.shuffle_data``: not done (features
  re-used, as the standalone and the paper).
* Unequal feature sizes: NT-Xent needs one embedding size. When the encoders' sizes differ, a
  linear projection per modality to the largest size is added (``model.extras["mcr_proj"]``,
  trained with the model); ``con_projection=never`` refuses instead, ``always`` always projects.
  With equal sizes (default) the raw features are used, as the code.
* Defaults are the CREMA-D ResNet row of the authors' ``run.sh`` (lam_M 0.1, lambda_uni 0.01,
  P 32, con 1, CEB 0); per-dataset presets (``cremad``, ``ave``, ``ucf101``, ``mosi``, ``mosei``)
  take lam_M / lambda_uni / CEB from spec §3.5.7 (MOSI/MOSEI: the V-T-A rows). Only the method's
  own options are preset: the authors' optimiser (Adam 1e-4, wd 1e-4, bs 32, cosine + 780-step
  warm-up) and their unimodal pre-training of the encoders are left to the user's config, so
  that methods stay comparable under one optimiser. MOSI/MOSEI are regression (L1) in the
  authors' code; here they are whatever classification task the dataset loader defines.
* Permutations are drawn from torch's global RNG (seeded by the trainer each epoch).
* Logged diagnostics (not trained): ``jsd_<m>`` (``jsd_<m1>+<m2>`` for subsets) and
  ``perm_acc_<m>`` = accuracy of the fused prediction with m permuted divided by the accuracy
  of the fused prediction (single modalities only), ``game_terms``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodSetupError
from ..functional.mcr import (FUSION_IN_GAME, STRATEGIES, SUBSETS, mcr_game_loss, perturbed_logits, random_permutations,
                              supervised_nt_xent)
from ..models.fusion import ConcatFusion
from ..models.multimodal import ModelOutput
from ..models.resnet import ogm_init
from .base import LossOutput, Method, register_method


@dataclass
class MCROptions:
    tune_space = {"lam_M": ("log", 1e-3, 0.3), "lambda_uni": ("log", 1e-3, 0.3)}  # mmbalance tune (presets span 1e-3..0.1)
    lam_M: float = 0.1  # weight of the game term (run.sh --l)
    lambda_uni: float = 0.01  # weight of each unimodal head's CE (run.sh --multil)
    num_samples: int = 32  # P, permutations per batch (run.sh --num_samples)
    strategy: str = "greedy"  # greedy | independent | collaborative
    con_weight: float = 1.0  # supervised NT-Xent weight
    temperature: float = 0.5  # NT-Xent temperature
    con_projection: str = "auto"  # auto (only when feature sizes differ) | always | never
    ceb_weight: float = 0.0  # reconstruction (CEB) head weight
    start_epoch: int = 0  # game active from this epoch (code: starting_epoch 0)
    fusion_in_game: str = "with_encoder"  # with_encoder (authors' MCR_Model) | none (features only)
    subsets: str = "singles"  # singles (|S| = 1) | all (every non-empty proper subset; M > 2)

    def validate(self):
        errs = []
        if self.strategy not in STRATEGIES:
            errs.append(f"strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        if self.con_projection not in ("auto", "always", "never"):
            errs.append(f"con_projection must be auto, always or never, got '{self.con_projection}'")
        if self.fusion_in_game not in FUSION_IN_GAME:
            errs.append(f"fusion_in_game must be one of {', '.join(FUSION_IN_GAME)}, got '{self.fusion_in_game}'")
        if self.subsets not in SUBSETS:
            errs.append(f"subsets must be one of {', '.join(SUBSETS)}, got '{self.subsets}'")
        if self.start_epoch < 0:
            errs.append(f"start_epoch must be >= 0, got {self.start_epoch}")
        if self.num_samples < 1:
            errs.append(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature <= 0:
            errs.append(f"temperature must be > 0, got {self.temperature}")
        for k in ("lam_M", "lambda_uni", "con_weight", "ceb_weight"):
            if getattr(self, k) < 0:
                errs.append(f"{k} must be >= 0, got {getattr(self, k)}")
        return errs


@register_method("mcr", paper="Kontras et al., 2024 (MCR)", kind="objective",
                 description="MCR: permutation-importance game (greedy detach pattern) + unimodal heads + supervised NT-Xent (+ CEB)")
class MCR(Method):
    Options = MCROptions
    presets = {
        "cremad": {"method": {"lam_M": 0.1, "lambda_uni": 0.01, "num_samples": 32, "ceb_weight": 0.0}},
        "ave": {"method": {"lam_M": 0.01, "lambda_uni": 0.01, "num_samples": 32, "ceb_weight": 0.0}},
        "ucf101": {"method": {"lam_M": 0.001, "lambda_uni": 0.1, "num_samples": 32, "ceb_weight": 0.0}},
        "mosi": {"method": {"lam_M": 0.01, "lambda_uni": 0.01, "num_samples": 32, "ceb_weight": 0.0}},
        "mosei": {"method": {"lam_M": 0.001, "lambda_uni": 0.001, "num_samples": 32, "ceb_weight": 1.0}},
    }

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.project = False

    # ------------------------------------------------------------------------------ set-up
    def configure_model(self, model_cfg):
        if model_cfg.fusion != "concat":
            raise MethodSetupError(
                f"method 'mcr' needs linear late fusion with one shared bias (model.fusion=concat); "
                f"got model.fusion={model_cfg.fusion}. Remove the override or set model.fusion=concat")
        model_cfg.unimodal_heads = True

    def extra_modules(self, model):
        if not isinstance(model.fusion, ConcatFusion):
            raise MethodSetupError(f"method 'mcr' needs the concat fusion; the model has {type(model.fusion).__name__}")
        dims = model.feature_dims
        extras: Dict[str, nn.Module] = {}
        o = self.options
        unequal = len(set(dims.values())) > 1
        if o.con_weight > 0 and unequal and o.con_projection == "never":
            raise MethodSetupError(
                f"method 'mcr': the contrastive term needs equal feature sizes, got {dims}; set "
                f"method.con_projection=auto (linear projections), method.con_weight=0, or equal encoder sizes")
        self.project = o.con_weight > 0 and (o.con_projection == "always" or (unequal and o.con_projection == "auto"))
        if self.project:
            d = max(dims.values())
            extras["mcr_proj"] = nn.ModuleDict({m: nn.Linear(dm, d) for m, dm in dims.items()})
        if o.ceb_weight > 0:
            hidden = max(dims.values())
            extras["mcr_ceb"] = nn.Sequential(nn.Linear(self.num_classes, hidden, bias=False), nn.ReLU(),
                                              nn.Linear(hidden, sum(dims.values()), bias=False))
        for mod in extras.values():
            ogm_init(mod)
        return extras

    # ------------------------------------------------------------------------------ loss
    def compute_loss(self, model, batch, ctx):
        o = self.options
        y = batch.labels
        feats = model.encode(batch.inputs)
        heads = model.head_logits(feats)
        logits = model.fuse(feats)
        ce = F.cross_entropy(logits, y)
        uni = {m: F.cross_entropy(h, y) for m, h in heads.items()}
        loss = ce + o.lambda_uni * sum(uni.values())
        # logs: 0-d device tensors (the trainer reads them once per epoch; no host sync per batch)
        logs = {"loss_fused": ce.detach(), **{f"loss_{m}": v.detach() for m, v in uni.items()}}

        zs = [feats[m] for m in self.modalities]
        if o.lam_M > 0 and ctx.epoch >= o.start_epoch:
            blocks = model.fusion.weight_blocks()
            ws = [blocks[m] for m in self.modalities]
            bias = model.fusion.fc.bias
            perms = random_permutations(len(y), o.num_samples, device=logits.device)
            game, jsd = mcr_game_loss(zs, ws, bias, logits, perms, o.strategy, o.lam_M, o.fusion_in_game, o.subsets)
            loss = loss + game
            logs["loss_game"] = game.detach()
            logs["game_terms"] = float(len(jsd))
            with torch.no_grad():
                base_acc = (logits.argmax(1) == y).float().mean()
                yr = y.repeat(o.num_samples)
                for subset, v in jsd.items():
                    logs["jsd_" + "+".join(self.modalities[i] for i in subset)] = v.detach()
                for i, m in enumerate(self.modalities):
                    pert = perturbed_logits(zs, ws, bias, i, perms)
                    acc = (pert.argmax(1) == yr).float().mean()
                    logs[f"perm_acc_{m}"] = torch.where(base_acc > 0, acc / base_acc, torch.zeros_like(acc))
        if o.con_weight > 0:
            emb = [model.extras["mcr_proj"][m](z) for m, z in zip(self.modalities, zs)] if self.project else zs
            con = supervised_nt_xent(torch.cat(emb), y.repeat(len(emb)), o.temperature)
            loss = loss + o.con_weight * con
            logs["loss_con"] = con.detach()
        if o.ceb_weight > 0:
            rec = model.extras["mcr_ceb"](logits.detach())
            ceb = F.mse_loss(rec.float(), torch.cat(zs, dim=1).float())
            loss = loss + o.ceb_weight * ceb
            logs["loss_ceb"] = ceb.detach()
        return LossOutput(loss, ModelOutput(logits, feats, heads), logs)

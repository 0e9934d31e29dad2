"""The GMM-guided adaptive loss on the modality gap (spec §3.3), as pure functions.

* :func:`modality_gap` -- ``g_i = s^1_i[y_i] - s^2_i[y_i]`` (Eq. 6), differentiable.
* :func:`fit_gap_gmm` -- a 1-D, 2-component Gaussian mixture (sklearn EM) fitted to the gaps,
  components reordered so that index 0 is the *balanced* one (mean nearest 0).
* :func:`gmm_posteriors` -- Eq. 9 responsibilities of frozen GMM parameters, in log-space.
* :func:`warmup_loss` / :func:`adaptive_loss` -- Eq. 7 and Eq. 10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .scores import true_class_prob


def modality_gap(logits_1: Tensor, logits_2: Tensor, labels: Tensor) -> Tensor:
    """``g_i = softmax(l^1_i)[y_i] - softmax(l^2_i)[y_i]`` per row: [B] (keeps gradients)."""
    return true_class_prob(logits_1, labels) - true_class_prob(logits_2, labels)


@dataclass
class GapGMM:
    """A fitted two-component 1-D mixture; component 0 is the balanced one (|mean| smallest)."""

    weights: Tuple[float, float]
    means: Tuple[float, float]
    variances: Tuple[float, float]
    degenerate: bool = False  # the guard fired: every sample is treated as balanced

    @property
    def mu0(self) -> float:
        return self.means[0]

    def to_state(self) -> Dict[str, object]:
        """Plain Python values (loadable with ``torch.load(weights_only=True)``)."""
        return {"weights": list(self.weights), "means": list(self.means), "variances": list(self.variances),
                "degenerate": bool(self.degenerate)}

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "GapGMM":
        return cls(tuple(float(x) for x in state["weights"]), tuple(float(x) for x in state["means"]),
                   tuple(float(x) for x in state["variances"]), bool(state["degenerate"]))

    def as_logs(self) -> Dict[str, float]:
        return {"gmm_mu0": self.means[0], "gmm_mu1": self.means[1], "gmm_var0": self.variances[0],
                "gmm_var1": self.variances[1], "gmm_pi0": self.weights[0], "gmm_pi1": self.weights[1],
                "gmm_degenerate": float(self.degenerate)}


def order_components(weights, means, variances, min_separation: float = 0.05,
                     min_weight: float = 0.01, balanced_majority: bool = False) -> GapGMM:
    """Reorder two fitted components so that index 0 has the mean nearest 0 (ties: the first);
    flag the fit as degenerate when ``|mu_1 - mu_0| < min_separation`` or ``min(pi) < min_weight``,
    or, with ``balanced_majority``, when the balanced component holds less than half the mass."""
    w = [float(x) for x in weights]
    mu = [float(x) for x in means]
    var = [float(x) for x in variances]
    k0 = int(np.argmin(np.abs(mu)))
    order = [k0, 1 - k0]
    degenerate = (abs(mu[1] - mu[0]) < min_separation or min(w) < min_weight
                  or (balanced_majority and w[k0] < 0.5))
    return GapGMM(tuple(w[k] for k in order), tuple(mu[k] for k in order), tuple(var[k] for k in order),
                  degenerate)


def fit_gap_gmm(gaps: Tensor | np.ndarray, seed: int = 0, *, n_init: int = 3, max_iter: int = 100,
                tol: float = 1e-3, reg_covar: float = 1e-6, min_separation: float = 0.05,
                min_weight: float = 0.01, balanced_majority: bool = False) -> GapGMM:
    """EM fit of ``GaussianMixture(n_components=2, covariance_type="full")`` to the gaps (spec §3.3
    step 2), then :func:`order_components`. Fewer than 2 distinct values -> degenerate fit."""
    from sklearn.mixture import GaussianMixture

    x = (gaps.detach().double().cpu().numpy() if isinstance(gaps, Tensor) else np.asarray(gaps, np.float64))
    x = x.reshape(-1, 1)
    if x.shape[0] < 2 or np.unique(x).size < 2:
        m = float(x.mean()) if x.size else 0.0
        v = float(x.var()) + reg_covar if x.size else 1.0
        return GapGMM((1.0, 0.0), (m, m), (v, v), degenerate=True)
    gm = GaussianMixture(n_components=2, covariance_type="full", max_iter=max_iter, tol=tol,
                         reg_covar=reg_covar, random_state=seed, n_init=n_init)
    gm.fit(x)
    return order_components(gm.weights_, gm.means_.reshape(-1), gm.covariances_.reshape(-1),
                            min_separation, min_weight, balanced_majority)


def gmm_log_posteriors(g: Tensor, weights, means, variances) -> Tensor:
    """log responsibilities ``log pi_k N(g|mu_k, var_k) - logsumexp_k(...)``: [B, 2] (Eq. 9)."""
    w = torch.as_tensor(weights, dtype=torch.float64, device=g.device)
    mu = torch.as_tensor(means, dtype=torch.float64, device=g.device)
    var = torch.as_tensor(variances, dtype=torch.float64, device=g.device)
    x = g.detach().double().unsqueeze(1)
    logp = w.clamp_min(1e-300).log() - 0.5 * (math.log(2 * math.pi) + var.log()) - 0.5 * (x - mu) ** 2 / var
    return (logp - torch.logsumexp(logp, dim=1, keepdim=True)).to(g.dtype)


def gmm_posteriors(g: Tensor, gmm: GapGMM) -> Tuple[Tensor, Tensor]:
    """Detached ``(w_0, w_1)`` (balanced, imbalanced) for the current gaps; a degenerate fit gives
    ``w_0 = 1, w_1 = 0`` for every sample."""
    if gmm.degenerate:
        one = torch.ones_like(g.detach())
        return one, torch.zeros_like(one)
    post = gmm_log_posteriors(g, gmm.weights, gmm.means, gmm.variances).exp()
    return post[:, 0].detach(), post[:, 1].detach()


def warmup_loss(fused_logits: Tensor, modality_logits_1: Tensor, modality_logits_2: Tensor,
                labels: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Eq. 7: ``L_MM + L_a + L_v`` (batch-mean cross-entropies)."""
    parts = {"loss_mm": F.cross_entropy(fused_logits, labels),
             "loss_m1": F.cross_entropy(modality_logits_1, labels),
             "loss_m2": F.cross_entropy(modality_logits_2, labels)}
    return parts["loss_mm"] + parts["loss_m1"] + parts["loss_m2"], parts


def adaptive_loss(fused_logits: Tensor, labels: Tensor, gap: Tensor, w0: Tensor, w1: Tensor, mu0: float,
                  lam: float, alpha: float = 1.0, beta: float = 1.0,
                  gamma: float = 1.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Eq. 10: ``mean_i[alpha w0_i CE_i + lam (beta g_i^2 + gamma w1_i (g_i - mu0)^2)]``.
    ``w0, w1`` are used detached; ``gap`` keeps its gradient."""
    ce = F.cross_entropy(fused_logits, labels, reduction="none")
    w0, w1 = w0.detach(), w1.detach()
    task = alpha * w0 * ce
    gap_sq = beta * gap ** 2
    shift = gamma * w1 * (gap - float(mu0)) ** 2
    loss = (task + lam * (gap_sq + shift)).mean()
    return loss, {"loss_task": task.mean(), "loss_gap": gap_sq.mean(), "loss_shift": shift.mean()}


def anneal(decay: float, t: int) -> float:
    """``lambda_t = decay ** t`` (0.96 in the paper)."""
    return float(decay) ** max(0, int(t))

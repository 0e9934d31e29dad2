"""MCR's regularisers (Kontras et al., "Multimodal Competition Regularizer"), as pure functions.

* :func:`js_divergence` -- Jensen-Shannon divergence between the softmaxes of two logit tensors
  (natural log, ``batchmean`` over rows; range ``[0, ln 2]``), as ``get_perturbed_gradients``.
* :func:`random_permutations` / :func:`perturbed_logits` -- latent-space permutation of one
  modality's contribution to a linear late fusion ``y = sum_m z_m W_m^T + b`` (features re-used,
  no extra encoder pass; the bias is kept in the perturbed logits).
* :func:`perturbation_jsd` -- one JSD term in one of the three detach variants (``own``: only
  the permuted modality's feature carries gradient; ``oth``: the permuted modality's feature is
  detached, all others carry gradient; ``all``: nothing detached).
* :func:`mcr_game_loss` -- the game of spec §3.5.4 realised by those detach patterns.
* :func:`supervised_nt_xent` -- ``pytorch_metric_learning``'s ``NTXentLoss`` with labels
  (cosine similarity, every same-label pair except self a positive, every different-label pair a
  negative, mean over positive pairs).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

STRATEGIES = ("greedy", "independent", "collaborative")
VARIANTS = ("own", "oth", "all")


def js_divergence(logits_p: Tensor, logits_q: Tensor, clamp: float = 1e7) -> Tensor:
    """``0.5 * [KL(p || m) + KL(q || m)]``, ``p = softmax(logits_p)``, ``q = softmax(logits_q)``,
    ``m = (p + q) / 2`` clamped to >= 1e-20; natural log; summed over classes and averaged over
    rows (``batchmean``). Logits are clamped to +-``clamp`` first (as the authors' code)."""
    p = logits_p.clamp(-clamp, clamp).float().softmax(dim=-1)
    q = logits_q.clamp(-clamp, clamp).float().softmax(dim=-1)
    log_m = (0.5 * (p + q)).clamp_min(1e-20).log()
    return 0.5 * (F.kl_div(log_m, p, reduction="batchmean") + F.kl_div(log_m, q, reduction="batchmean"))


def random_permutations(batch_size: int, num: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """``num`` independent permutations of ``range(batch_size)`` as a ``[num, batch_size]`` long
    tensor. No filtering: identity positions and same-label partners are kept (MCR §3.3)."""
    r = torch.rand(num, batch_size, generator=generator, device="cpu" if generator is not None else device)
    return r.argsort(dim=1).to(device)


def _contribution(z: Tensor, w: Tensor, detach: bool) -> Tensor:
    return (z.detach() if detach else z) @ w.t()


def perturbed_logits(features: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
                     m: int, perms: Tensor, detach: Sequence[bool] = ()) -> Tensor:
    """Logits of the linear late fusion with modality ``m``'s feature permuted by each row of
    ``perms`` (``[P, B]``): row ``p * B + i`` is
    ``z_m[perms[p, i]] W_m^T + sum_{j != m} z_j[i] W_j^T + b`` (shape ``[P * B, K]``).
    ``detach[j]`` detaches feature ``j`` (the weights and bias always carry gradient)."""
    detach = list(detach) or [False] * len(features)
    num = perms.shape[0]
    out = None
    for j, (z, w) in enumerate(zip(features, weights)):
        c = _contribution(z, w, detach[j])
        c = c[perms.reshape(-1)] if j == m else c.repeat(num, 1)
        out = c if out is None else out + c
    if bias is not None:
        out = out + bias
    return out


def variant_detach(m: int, num_modalities: int, variant: str) -> Tuple[bool, ...]:
    """Which features are detached: ``own`` -- all but ``m`` (gradient to encoder m only);
    ``oth`` -- ``m`` only (gradient to every other encoder); ``all`` -- none."""
    if variant == "own":
        return tuple(j != m for j in range(num_modalities))
    if variant == "oth":
        return tuple(j == m for j in range(num_modalities))
    if variant == "all":
        return (False,) * num_modalities
    raise ValueError(f"variant must be one of {VARIANTS}, got '{variant}'")


def perturbation_jsd(features: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
                     base_logits: Tensor, perms: Tensor, m: int, variant: str = "all") -> Tensor:
    """``JSD(perturbed logits with m permuted, base logits repeated P times)``; the base logits
    are not detached (as the code)."""
    pert = perturbed_logits(features, weights, bias, m, perms, variant_detach(m, len(features), variant))
    return js_divergence(pert, base_logits.repeat(perms.shape[0], 1))


def mcr_game_loss(features: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
                  base_logits: Tensor, perms: Tensor, strategy: str = "greedy",
                  lam: float = 1.0) -> Tuple[Tensor, Dict[int, Tensor]]:
    """The MCR game term (spec §3.5.4), summed over modalities m:

    * ``greedy``: ``lam * sum_m (-J_m^own + J_m^oth)`` -- encoder m maximises its own
      permutation importance, every other encoder minimises it; the two terms have equal values
      and equal gradients w.r.t. the fusion layer and the base logits, which cancel exactly.
    * ``independent``: ``-lam * sum_m J_m^own`` (the fusion layer and the base get gradients).
    * ``collaborative``: ``-lam * sum_m J_m^all`` (every parameter).

    Returns ``(loss, {m: J_m value (detached)})``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got '{strategy}'")
    total = base_logits.new_zeros((), dtype=torch.float32)
    values: Dict[int, Tensor] = {}
    for m in range(len(features)):
        def jsd(variant: str) -> Tensor:
            return perturbation_jsd(features, weights, bias, base_logits, perms, m, variant)
        if strategy == "greedy":
            own = jsd("own")
            term = -own + jsd("oth")
        elif strategy == "independent":
            own = jsd("own")
            term = -own
        else:
            own = jsd("all")
            term = -own
        values[m] = own.detach()
        total = total + term
    return lam * total, values


def supervised_nt_xent(embeddings: Tensor, labels: Tensor, temperature: float = 0.5) -> Tensor:
    """Supervised NT-Xent as ``pytorch_metric_learning.losses.NTXentLoss`` with labels: cosine
    similarities ``s`` (embeddings are not pre-normalised; the loss normalises), positives = all
    same-label pairs ``(a, p)``, ``a != p``; negatives of ``a`` = all different-label ``n``;
    per positive pair ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_n e^{s_an/t}))``; mean over positive
    pairs (0 when there is none)."""
    z = F.normalize(embeddings.float(), dim=1)
    s = z @ z.t() / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not bool(pos.any()):
        return s.sum() * 0.0
    neg_lse = s.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)  # [N, 1], -inf if none
    per_pair = torch.logaddexp(s, neg_lse.expand_as(s)) - s  # -log(e^s / (e^s + sum e^neg))
    return per_pair[pos].mean()

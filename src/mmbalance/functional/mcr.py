"""MCR's regularisers (Kontras et al., "Multimodal Competition Regularizer"), as pure functions.

* :func:`js_divergence` (from :mod:`mmbalance.functional.common`, shared with other methods) --
  Jensen-Shannon divergence between the softmaxes of two logit tensors (natural log,
  ``batchmean`` over rows; range ``[0, ln 2]``), as ``get_perturbed_gradients``.
* :func:`random_permutations` / :func:`perturbed_logits` -- latent-space permutation of one
  modality's (or one subset's, jointly) contribution to a linear late fusion
  ``y = sum_m z_m W_m^T + b`` (features re-used, no extra encoder pass; the bias is kept in the
  perturbed logits).
* :func:`perturbation_jsd` -- one JSD term in one of the three detach variants (``own``: only
  the permuted modalities carry gradient; ``oth``: the permuted modalities are detached, all
  others carry gradient; ``all``: nothing detached).
* :func:`game_subsets` / :func:`mcr_game_loss` -- the game of spec §3.5.4 realised by those
  detach patterns, over single modalities or over every non-empty proper subset.

What a detach covers (``fusion_in_game``):

* ``"none"``: the *feature* ``z_m`` is detached and the product ``z_m W_m^T`` is recomputed, so
  the weight block ``W_m`` always carries gradient; under ``greedy`` its gradients from the
  ``own`` and ``oth`` terms are equal and opposite, so the fusion layer gets no game gradient.
* ``"with_encoder"``: the *product* ``z_m W_m^T`` is detached (the authors' ``MCR_Model``
  ``_forward_main``: ``pred_a = z_a W_0^T`` then ``pred_a.detach()``), so ``W_m`` receives
  exactly the game gradient its encoder receives: each weight block plays with its encoder.
  The encoders' gradients are the same in both readings (``W`` itself is never detached in
  ``none``, and ``z`` enters the product linearly).
* :func:`supervised_nt_xent` -- ``pytorch_metric_learning``'s ``NTXentLoss`` with labels
  (cosine similarity, every same-label pair except self a positive, every different-label pair a
  negative, mean over positive pairs).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import js_divergence

STRATEGIES = ("greedy", "independent", "collaborative")
VARIANTS = ("own", "oth", "all")
FUSION_IN_GAME = ("none", "with_encoder")
SUBSETS = ("singles", "all")


def random_permutations(batch_size: int, num: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """``num`` independent permutations of ``range(batch_size)`` as a ``[num, batch_size]`` long
    tensor. No filtering: identity positions and same-label partners are kept (MCR §3.3)."""
    r = torch.rand(num, batch_size, generator=generator, device="cpu" if generator is not None else device)
    return r.argsort(dim=1).to(device)


def _contribution(z: Tensor, w: Tensor, detach: bool, fusion_in_game: str = "none") -> Tensor:
    if not detach:
        return z @ w.t()
    if fusion_in_game == "none":
        return z.detach() @ w.t()
    if fusion_in_game == "with_encoder":
        return (z @ w.t()).detach()
    raise ValueError(f"fusion_in_game must be one of {FUSION_IN_GAME}, got '{fusion_in_game}'")


def _as_subset(m: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    return (int(m),) if isinstance(m, int) else tuple(sorted(int(i) for i in m))


def perturbed_logits(features: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
                     m: Union[int, Sequence[int]], perms: Tensor, detach: Sequence[bool] = (),
                     fusion_in_game: str = "none") -> Tensor:
    """Logits of the linear late fusion with modality ``m`` (or every modality of the subset
    ``m``, jointly -- one permutation for all of them) permuted by each row of ``perms``
    (``[P, B]``): row ``p * B + i`` is
    ``sum_{j in S} z_j[perms[p, i]] W_j^T + sum_{j not in S} z_j[i] W_j^T + b`` (``[P * B, K]``).
    ``detach[j]`` detaches feature ``j`` (``fusion_in_game="none"``: the weights keep gradient)
    or the product ``z_j W_j^T`` (``"with_encoder"``); the bias always carries gradient."""
    subset = _as_subset(m)
    detach = list(detach) or [False] * len(features)
    num = perms.shape[0]
    flat = perms.reshape(-1)
    out = None
    for j, (z, w) in enumerate(zip(features, weights)):
        c = _contribution(z, w, detach[j], fusion_in_game)
        c = c[flat] if j in subset else c.repeat(num, 1)
        out = c if out is None else out + c
    if bias is not None:
        out = out + bias
    return out


def variant_detach(m: Union[int, Sequence[int]], num_modalities: int, variant: str) -> Tuple[bool, ...]:
    """Which features are detached for the permuted modality (or subset) ``m``: ``own`` -- all
    outside it (gradient to its encoders only); ``oth`` -- those in it (gradient to every other
    encoder); ``all`` -- none."""
    subset = _as_subset(m)
    if variant == "own":
        return tuple(j not in subset for j in range(num_modalities))
    if variant == "oth":
        return tuple(j in subset for j in range(num_modalities))
    if variant == "all":
        return (False,) * num_modalities
    raise ValueError(f"variant must be one of {VARIANTS}, got '{variant}'")


def game_subsets(num_modalities: int, subsets: str = "singles") -> List[Tuple[int, ...]]:
    """The permuted sets of the game: ``singles`` -- ``(0,), (1,), ...`` (|S| = 1, the paper's
    default); ``all`` -- every non-empty *proper* subset, by size then lexicographically (paper
    App. A.5). The full set is left out: permuting every modality jointly leaves no opponent
    (the ``oth`` term would have no gradient but the base path) and only reorders the batch.
    With two modalities both give the two singles."""
    if subsets == "singles":
        return [(m,) for m in range(num_modalities)]
    if subsets == "all":
        return [c for r in range(1, num_modalities) for c in itertools.combinations(range(num_modalities), r)]
    raise ValueError(f"subsets must be one of {SUBSETS}, got '{subsets}'")


def perturbation_jsd(features: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
                     base_logits: Tensor, perms: Tensor, m: Union[int, Sequence[int]], variant: str = "all",
                     fusion_in_game: str = "none") -> Tensor:
    """``JSD(perturbed logits with m (a modality or a subset) permuted, base logits repeated P
    times)``; the base logits are not detached (as the code)."""
    pert = perturbed_logits(features, weights, bias, m, perms, variant_detach(m, len(features), variant),
                            fusion_in_game)
    return js_divergence(pert, base_logits.repeat(perms.shape[0], 1))


def mcr_game_loss(features: Sequence[Tensor], weights: Sequence[Tensor], bias: Optional[Tensor],
                  base_logits: Tensor, perms: Tensor, strategy: str = "greedy",
                  lam: float = 1.0, fusion_in_game: str = "none",
                  subsets: str = "singles") -> Tuple[Tensor, Dict[Tuple[int, ...], Tensor]]:
    """The MCR game term (spec §3.5.4), summed over the permuted sets S of
    :func:`game_subsets`:

    * ``greedy``: ``lam * sum_S (-J_S^own + J_S^oth)`` -- the encoders in S maximise S's
      permutation importance, every other encoder minimises it; the two terms have equal values
      and equal gradients w.r.t. the bias and the base logits, which cancel exactly (and w.r.t.
      the weight blocks too when ``fusion_in_game="none"``; with ``"with_encoder"`` each block
      ``W_m`` moves with its encoder).
    * ``independent``: ``-lam * sum_S J_S^own`` (the fusion layer and the base get gradients).
    * ``collaborative``: ``-lam * sum_S J_S^all`` (every parameter).

    Returns ``(loss, {S: J_S value (detached)})`` with ``S`` a sorted tuple of modality indices."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got '{strategy}'")
    if fusion_in_game not in FUSION_IN_GAME:
        raise ValueError(f"fusion_in_game must be one of {FUSION_IN_GAME}, got '{fusion_in_game}'")
    total = base_logits.new_zeros((), dtype=torch.float32)
    values: Dict[Tuple[int, ...], Tensor] = {}
    for s in game_subsets(len(features), subsets):
        def jsd(variant: str) -> Tensor:
            return perturbation_jsd(features, weights, bias, base_logits, perms, s, variant, fusion_in_game)
        if strategy == "greedy":
            own = jsd("own")
            term = -own + jsd("oth")
        elif strategy == "independent":
            own = jsd("own")
            term = -own
        else:
            own = jsd("all")
            term = -own
        values[s] = own.detach()
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

"""MIDAS's misaligned-sample math (Eqs. 1-10, App. A.2), as pure vectorised functions.

Conventions: a batch has ``B`` rows and ``M`` modalities (in the model's order). A misaligned
sample is described by a row of source indices ``src[n, m]`` (which batch row modality ``m``
comes from) and its anchor row ``anchor[n]`` (the row ``i`` it was generated for). Stateful use
lives in :mod:`mmbalance.methods.midas`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_partners(labels: Tensor, mode: str = "uniform",
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """One partner ``j`` per row with ``y_j != y_i``; returns ``(partner [B], valid [B] bool)``.

    ``uniform``: ``j`` uniform over ``{k : y_k != y_i}`` (``torch.multinomial`` on the B x B
    mask); rows with no such ``k`` are invalid (partner = the row itself).
    ``shuffle_mask``: one random permutation; pairs with equal labels are invalid.
    """
    b = labels.shape[0]
    dev = labels.device
    if mode == "uniform":
        mask = labels.view(-1, 1) != labels.view(1, -1)  # [B, B]
        valid = mask.any(1)
        w = mask.float()
        w[~valid] = 1.0  # any row; dropped below
        if generator is not None:
            w = w.cpu()
        partner = torch.multinomial(w, 1, generator=generator).view(-1).to(dev)
        partner = torch.where(valid, partner, torch.arange(b, device=dev))
        return partner, valid
    if mode == "shuffle_mask":
        partner = torch.randperm(b, generator=generator).to(dev)
        return partner, labels[partner] != labels
    raise ValueError(f"partner mode must be 'uniform' or 'shuffle_mask', got '{mode}'")


def sample_extra_sources(b: int, count: int, device: torch.device | str = "cpu",
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """For M > 2: ``count`` further source rows per row, uniform over the other rows ([B, count])."""
    if count <= 0 or b < 2:
        return torch.arange(b, device=device).view(-1, 1).expand(b, max(count, 0)).clone()
    off = torch.randint(1, b, (b, count), generator=generator).to(device)
    return (torch.arange(b, device=device).view(-1, 1) + off) % b


def random_assignments(b: int, m: int, device: torch.device | str = "cpu",
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """One random permutation of ``0..m-1`` per row ([B, M]); the identity when ``m == 2``
    (both of the two assignments are used anyway, see :func:`misaligned_sources`)."""
    if m <= 2:
        return torch.arange(m, device=device).view(1, -1).expand(b, m).clone()
    return torch.rand(b, m, generator=generator).argsort(dim=1).to(device)


def misaligned_sources(partner: Tensor, assign: Tensor, extra: Optional[Tensor] = None) -> Tensor:
    """Source rows of the two misaligned samples of every row: ``[2, B, M]``.

    The source set of row ``i`` is ``K_i = (i, partner_i, extra_i...)`` (App. A.2);
    sample A takes modality ``m`` from ``K_i[assign[i, m]]``, sample B from
    ``K_i[assign[i, (m + 1) mod M]]``. With M = 2 and the identity assignment, A = ``(x_i^1,
    x_j^2)`` and B = ``(x_j^1, x_i^2)`` (Sec. 3.2 and its symmetric counterpart, same j).
    """
    b, m = assign.shape
    cols = [torch.arange(b, device=partner.device), partner]
    if extra is not None and extra.numel():
        cols += list(extra.t())
    k = torch.stack(cols, 1)  # [B, M]
    if k.shape[1] != m:
        raise ValueError(f"need {m} sources per row (1 + partner + {m - 2} extra), got {k.shape[1]}")
    a = k.gather(1, assign)
    bb = k.gather(1, assign.roll(-1, dims=1))
    return torch.stack([a, bb])


def confidence_labels(conf: Tensor) -> Tensor:
    """Eq. 2 (and App. A.2): ``c~^m = conf_m / sum_l conf_l`` per misaligned sample ([N, M]).
    ``conf[n, m]`` is modality m's unimodal probability of its own source label."""
    return conf / conf.sum(dim=1, keepdim=True).clamp_min(1e-12)


def source_confidences(true_prob: Tensor, src: Tensor) -> Tensor:
    """``conf[n, m] = true_prob[src[n, m], m]`` where ``true_prob[b, m] = softmax(g_m(f^m_b))[y_b]``."""
    return true_prob.gather(0, src)


def hard_weights(features: Sequence[Tensor], src: Tensor, anchor: Tensor) -> Tensor:
    """Eq. 8 + Eq. 10's factor: ``w = 1 + (s~ + 1) / 2`` in [1, 2], with ``s~`` the cosine between
    the anchor's own feature and the swapped-in one, averaged over the replaced modalities
    (``src[n, m] != anchor[n]``, App. A.2). Detached."""
    with torch.no_grad():
        sims, counts = 0.0, 0.0
        for m, f in enumerate(features):
            f = f.detach().float()
            replaced = (src[:, m] != anchor).float()
            cos = F.cosine_similarity(f[anchor], f[src[:, m]], dim=1)
            sims = sims + cos * replaced
            counts = counts + replaced
        s = sims / counts.clamp_min(1.0)
        return 1.0 + (s.clamp(-1.0, 1.0) + 1.0) / 2.0


def misaligned_loss(logits: Tensor, src_labels: Tensor, c: Tensor, alpha: Tensor, w: Tensor) -> Tensor:
    """Eq. 10 per sample ([N]): ``w * -sum_m alpha_m c~^m log p~[y^(m)]`` (target not renormalised)."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, src_labels)  # [N, M]
    return -(w * (alpha.to(logp).view(1, -1) * c * logp).sum(1))


def normalised_multimodal_confidence(probs: Tensor, src_labels: Tensor) -> Tensor:
    """Eq. 6's ``(c~_i)_{y^(m)} = p~[y^(m)] / sum_l p~[y^(l)]`` for every modality m ([N, M])."""
    p = probs.gather(1, src_labels)
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def alpha_update_from_means(alpha: Tensor, mean_c: Tensor, mean_chat: Tensor, eta: float) -> Tuple[Tensor, int, float]:
    """Eqs. 5-7 from batch means: ``m^ = argmin_m mean(c~^m)``; ``Delta = sign(mean(c~^{m^}) -
    mean(c^_{m^}))``; ``alpha_{m^} <- max(1, alpha_{m^} + eta Delta)``; every other alpha <- 1.
    Returns ``(new alpha, m^, Delta)``."""
    m_hat = int(torch.argmin(mean_c))
    delta = float(torch.sign(mean_c[m_hat] - mean_chat[m_hat]))
    new = torch.ones_like(alpha)
    new[m_hat] = max(1.0, float(alpha[m_hat]) + eta * delta)
    return new, m_hat, delta


def alpha_update_tensor(alpha: Tensor, mean_c: Tensor, mean_chat: Tensor, eta: float) -> Tensor:
    """:func:`alpha_update_from_means` without leaving the device (no host sync): the same
    float64 arithmetic on ``alpha``'s device; returns only the new alpha."""
    m_hat = torch.argmin(mean_c).view(1)  # (index_select: a 0-d tensor index would be read on the host)
    delta = torch.sign(mean_c.index_select(0, m_hat) - mean_chat.index_select(0, m_hat)).to(alpha.dtype)
    value = (alpha.index_select(0, m_hat) + eta * delta).clamp_min(1.0)
    hot = torch.arange(alpha.numel(), device=alpha.device) == m_hat
    return torch.where(hot, value, torch.ones_like(alpha))


def alpha_update(alpha: Tensor, c: Tensor, probs: Tensor, src_labels: Tensor, eta: float) -> Tuple[Tensor, int, float]:
    """Eqs. 5-7 on one batch of misaligned samples (``c`` [N, M], ``probs`` = softmax of their
    fused logits [N, K], ``src_labels`` [N, M])."""
    chat = normalised_multimodal_confidence(probs, src_labels)
    return alpha_update_from_means(alpha, c.mean(0), chat.mean(0), eta)

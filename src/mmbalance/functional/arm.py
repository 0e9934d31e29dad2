"""ARM (Asymmetric Reinforcing, Gao et al. AAAI 2025) as pure functions (spec §3.4.3).

Histogram estimators of normalised mutual information on *flattened* tensors (every value of
``x`` paired with the value at the same position of ``y``), as the authors' code does, but in
torch and with correct conditional entropies ``H(X|Z) = H(X,Z) - H(Z)``. Each flattened tensor
is binned into ``bins`` equal-width bins over its own ``[min, max]`` (the last bin closed, as
``numpy.histogram``). Everything here is detached: the estimates carry no gradient.

Normalisations (``norm``):

* ``"sqrt"`` (paper Eqs. 2, 9): ``I / sqrt(H(X) H(Y))``, ``CMI / sqrt(H(X|Z) H(Y|Z))``;
* ``"arith"``: ``2 I / (H(X) + H(Y))``, ``2 CMI / (H(X|Z) + H(Y|Z))``;
* ``"code"``: the released code's ``2 I / (H(X) + H(Y))`` and ``CMI / (H(X|Z) + H(Y|Z))``.

A zero denominator gives 0.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

NORMS = ("sqrt", "arith", "code")


def bin_indices(x: Tensor, bins: int) -> Tensor:
    """Equal-width bin index in ``[0, bins)`` of every value of flattened ``x`` over its own
    ``[min, max]`` (a constant tensor falls into bin 0)."""
    x = x.detach().reshape(-1).double()
    lo, hi = x.min(), x.max()
    width = (hi - lo).clamp_min(1e-300)
    idx = torch.floor((x - lo) / width * bins).long()
    return idx.clamp_(0, bins - 1)


def joint_probs(*xs: Tensor, bins: int) -> Tensor:
    """Joint histogram probabilities of the flattened tensors: shape ``[bins] * len(xs)``."""
    n = xs[0].numel()
    for x in xs:
        if x.numel() != n:
            raise ValueError(f"histogram inputs need the same number of values, got {[t.numel() for t in xs]}")
    flat = torch.zeros(n, dtype=torch.long, device=xs[0].device)
    for x in xs:
        flat = flat * bins + bin_indices(x, bins)
    counts = torch.bincount(flat, minlength=bins ** len(xs)).double()
    return (counts / counts.sum()).view(*([bins] * len(xs)))


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) of a probability table (any shape)."""
    # xlogy: 0 log 0 = 0 (no boolean mask: a data-dependent shape would be a host sync)
    return -torch.special.xlogy(p.reshape(-1), p.reshape(-1)).sum()


def _normalise(value: Tensor, ha: Tensor, hb: Tensor, norm: str, conditional: bool) -> Tensor:
    if norm == "sqrt":
        den = (ha * hb).clamp_min(0).sqrt()
        scale = 1.0
    elif norm == "arith" or (norm == "code" and not conditional):
        den, scale = ha + hb, 2.0
    elif norm == "code":
        den, scale = ha + hb, 1.0
    else:
        raise ValueError(f"norm must be one of {NORMS}, got '{norm}'")
    # where, not ``if``: reading den on the host would be a sync per estimate
    return torch.where(den > 1e-12, scale * value / den, value.new_zeros(()))


def nmi(x: Tensor, y: Tensor, bins: int = 30, norm: str = "sqrt") -> Tensor:
    """Normalised mutual information of the flattened tensors (a detached float64 scalar)."""
    pxy = joint_probs(x, y, bins=bins)
    hx, hy = entropy(pxy.sum(1)), entropy(pxy.sum(0))
    mi = hx + hy - entropy(pxy)
    return _normalise(mi.clamp_min(0), hx, hy, norm, conditional=False)


def ncmi(x: Tensor, y: Tensor, z: Tensor, bins: int = 2, norm: str = "sqrt") -> Tensor:
    """Normalised conditional mutual information ``NCMI(X; Y | Z)`` (detached float64 scalar):
    ``CMI = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)``, normalised by ``H(X|Z)``, ``H(Y|Z)``."""
    p = joint_probs(x, y, z, bins=bins)  # [x, y, z]
    h_xyz = entropy(p)
    h_xz, h_yz, h_z = entropy(p.sum(1)), entropy(p.sum(0)), entropy(p.sum((0, 1)))
    cmi = (h_xz + h_yz - h_xyz - h_z).clamp_min(0)
    return _normalise(cmi, h_xz - h_z, h_yz - h_z, norm, conditional=True)


def information_terms(features: Tensor, fused: Tensor, nmi_bins: int = 30, ncmi_bins: int = 2,
                      norm: str = "sqrt") -> Tuple[Tensor, Tensor]:
    """For stacked modality features ``[M, B, d]`` and the fused feature ``[B, d]``:
    ``I[m] = NMI(z_m, f_Y)`` ([M]) and ``C[j, i] = NCMI(z_j; f_Y | z_i)`` ([M, M], diagonal 0)."""
    m = features.shape[0]
    info = torch.stack([nmi(features[k], fused, nmi_bins, norm) for k in range(m)])
    cond = torch.zeros(m, m, dtype=info.dtype, device=info.device)
    for j in range(m):
        for i in range(m):
            if i != j:
                cond[j, i] = ncmi(features[j], fused, features[i], ncmi_bins, norm)
    return info, cond


def contributions(p_fused: Tensor, p_modal: Tensor, info: Tensor, cond: Tensor,
                  interaction: str = "paper") -> Tensor:
    """Per-sample marginal contributions ``phi^CMI_m,i`` ([B, M]) (Eq. 11).

    ``p_fused`` [B]: true-class probability of the fused prediction; ``p_modal`` [B, M]: of each
    modality's (shared-head) prediction; ``info`` [M], ``cond`` [M, M] from
    :func:`information_terms`. ``interaction="paper"`` (Eq. 10-11):
    ``phi_i = p_Y I_i + sum_{j!=i} p_j (I_j - C[j, i])``; ``"code"`` (the released code):
    ``phi_i = p_Y I_i + sum_{j!=i} p_j (I_i - C[i, j])``. Gradients flow through the p's."""
    info = info.to(p_fused.dtype)
    cond = cond.to(p_fused.dtype)
    m = info.shape[0]
    off = 1.0 - torch.eye(m, dtype=p_fused.dtype, device=p_fused.device)
    if interaction == "paper":
        ii = (info.view(m, 1) - cond) * off  # ii[j, i] = I_j - C[j, i]
    elif interaction == "code":
        ii = (info.view(1, m) - cond.t()) * off  # ii[j, i] = I_i - C[i, j]
    else:
        raise ValueError(f"interaction must be 'paper' or 'code', got '{interaction}'")
    return p_fused.unsqueeze(1) * info.unsqueeze(0) + p_modal @ ii


def joint_contribution(phi: Tensor) -> Tensor:
    """``phi^CMI(X) = mean_m phi^CMI_m`` (Eq. 12): [B]."""
    return phi.mean(dim=1)


def lower_bound_contribution(p_fused: Tensor, info: Tensor) -> Tensor:
    """``phi^MI_i = p_Y,i * min_m I_m`` (Eq. 7) with the exact min (the estimates are detached,
    so Eq. 16's smooth approximation -- whose sign the paper slips -- is not needed)."""
    return p_fused * info.min().to(p_fused.dtype)


def smooth_min(values: Tensor, tau: float = 1.0, dim: int = -1) -> Tensor:
    """``min_i v_i ~= -tau log sum_i exp(-v_i / tau)`` (a lower bound of the min; Eq. 16 with
    its sign corrected). Provided for reference; the method uses the exact min."""
    return -tau * torch.logsumexp(-values / tau, dim=dim)


def phi_denominator(phi_x: Tensor, floor: float = 0.0, eps: float = 1e-8) -> Tensor:
    """Denominator of ``phi_m,i / phi_X,i`` (``L_phiCMI``, DFF ratios) with a batch-relative floor:

    ``den_i = max(|phi_X,i|, floor * mean_j |phi_X,j|, eps)`` (``[B]``), the mean over the rows
    of ``phi_x`` (one batch), the floor term detached. A sample whose joint contribution crosses
    0 would otherwise divide by ~1e-8 and dominate the batch; with the floor, no row's
    denominator is below ``floor`` times the batch's mean magnitude, so each row's term is at
    most ``sum_m |phi_m,i - phi_X,i| / (floor * mean |phi_X|)``. ``floor=0`` is the absolute
    guard alone (``|phi_X,i| + eps`` up to the eps placement: ``max(|phi_X,i|, eps)``)."""
    mag = phi_x.abs()
    ref = (floor * mag.detach().mean()) if floor > 0 else mag.new_zeros(())
    return torch.maximum(mag, ref.clamp_min(eps).expand_as(mag))


def bmml_losses(phi: Tensor, phi_mi: Tensor, eps: float = 1e-8, floor: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Balanced min-max losses: ``L_phiMI = mean_i (1 - phi^MI_i)`` (Eq. 14) and
    ``L_phiCMI = mean_i sum_m |phi_m,i - phi_X,i| / den_i`` (Eq. 15) with ``den_i`` of
    :func:`phi_denominator` (the absolute value only matters when interaction terms make
    ``phi_X`` negative; ``floor`` makes the guard relative to the batch)."""
    phi_x = joint_contribution(phi)
    l_mi = (1.0 - phi_mi).mean()
    l_cmi = ((phi - phi_x.unsqueeze(1)).abs().sum(1) / phi_denominator(phi_x, floor, eps)).mean()
    return l_mi, l_cmi


def contribution_ratios(phi: Tensor, eps: float = 1e-8, floor: float = 0.0) -> Tensor:
    """Per-sample paper fusion weights ``phi_m,i / phi_X,i`` (Eq. 13): [B, M] (detached); the
    sign of ``phi_X,i`` is kept, its magnitude floored by :func:`phi_denominator`."""
    phi = phi.detach()
    phi_x = joint_contribution(phi)
    sign = torch.where(phi_x >= 0, 1.0, -1.0).to(phi.dtype)
    return phi / (sign * phi_denominator(phi_x, floor, eps)).unsqueeze(1)


def inverse_ratio_weights(phi_batch: Tensor, eps: float = 1e-8) -> Tensor:
    """The released code's per-batch weights, generalised: ``FW_m = mean_{j!=m} phi_j / phi_m``
    from batch contributions ``phi_batch`` [M]; for two modalities ``FW_1 = phi_2/phi_1`` and
    ``FW_2 = phi_1/phi_2`` (the weaker modality is up-weighted). Detached."""
    phi = phi_batch.detach()
    m = phi.shape[0]
    others = (phi.sum() - phi) / max(m - 1, 1)
    den = torch.where(phi.abs() < eps, torch.full_like(phi, eps), phi)
    return others / den


NORMALISE = ("none", "rank", "minmax")


def normalise_contributions(phi_joint: Tensor, mode: str = "none", m: float = 2.0) -> Tensor:
    """Map the epoch's joint contributions onto ``[0, m]`` before DSR (NaN = not seen, kept NaN):

    * ``"none"``: unchanged (the paper as printed: it assumes ``phi_X`` already spans
      ``[0, m]``; the histogram estimates are ~0.03-0.16, so every sample gets ``round(-k m)``
      extra copies);
    * ``"minmax"``: ``m (phi - min) / (max - min)`` over the seen samples (all equal -> ``m``:
      no information, no extra copies);
    * ``"rank"``: ``m r / (n - 1)`` with ``r`` the 0-based rank among the ``n`` seen samples,
      ties sharing their average rank (one seen sample -> ``m``)."""
    phi = phi_joint.detach().double()
    if mode == "none":
        return phi
    seen = ~torch.isnan(phi)
    out = torch.full_like(phi, float("nan"))
    v = phi[seen]
    n = v.numel()
    if n == 0:
        return out
    if mode == "minmax":
        lo, hi = v.min(), v.max()
        out[seen] = torch.full_like(v, m) if float(hi - lo) <= 0 else m * (v - lo) / (hi - lo)
    elif mode == "rank":
        if n == 1:
            out[seen] = torch.full_like(v, m)
        else:
            uniq, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
            start = torch.cumsum(counts, 0) - counts
            avg = start.double() + (counts.double() - 1) / 2
            out[seen] = m * avg[inverse] / (n - 1)
    else:
        raise ValueError(f"mode must be one of {NORMALISE}, got '{mode}'")
    return out


def resample_counts(phi_joint: Tensor, k: float = -2.0, m: float = 2.0) -> Tensor:
    """DSR extra copies ``s(X) = max(0, round(k phi_X - k m))`` (Eq. 18, Table 5): long [N];
    a NaN (sample not seen) gets 0. ``torch.round`` rounds halves to even."""
    phi = phi_joint.detach()
    s = torch.round(k * phi - k * m)
    return torch.where(torch.isnan(s), torch.zeros_like(s), s).clamp_min(0).long()


def copies_histogram(counts: Tensor, max_copies: int) -> Tensor:
    """Number of samples with ``0, 1, ..., max_copies`` extra copies and, last, with more: long
    ``[max_copies + 2]``."""
    c = counts.detach().long().cpu()
    h = torch.bincount(c.clamp_max(max_copies + 1), minlength=max_copies + 2)
    return h


def resampled_order(counts: Tensor, generator: torch.Generator) -> Tensor:
    """``D ∪ {X repeated s(X) times}``, shuffled: every index once plus its extra copies."""
    n = counts.shape[0]
    idx = torch.arange(n)
    order = torch.cat([idx, torch.repeat_interleave(idx, counts.cpu().long())])
    return order[torch.randperm(order.shape[0], generator=generator)]

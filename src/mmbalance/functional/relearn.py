"""D&R's diagnosis and soft re-initialisation (Wei, Li, Feng, Hu, ECCV 2024), as pure functions.

* :func:`minmax_scale` -- sklearn's ``MinMaxScaler(feature_range=(-1, 1))`` fitted and applied on
  the same rows (a constant column maps to the lower bound, as sklearn);
* :func:`kmeans` -- Lloyd's k-means with greedy k-means++ seeding and ``n_init`` restarts, in
  plain torch, deterministic for a given ``seed`` (the random draws come from a CPU
  ``torch.Generator``, so the result does not depend on the device);
* :func:`cluster_purity` -- majority-vote accuracy of a clustering;
* :func:`kmeans_purity` -- purity of a k-means clustering (``K`` clusters) of min-max scaled
  features: the code's ``purity_score`` on ``KMeans(n_clusters=K, random_state=0)``;
* :func:`reinit_weight` -- ``tanh(lambda * |P_train - P_val|)``;
* :func:`soft_reinit` -- ``p <- w p0 + (1 - w) p``.

Spec: ``baselines.md`` §4.10 (code GeWu-Lab/Diagnosing_Relearning_ECCV2024@025085e,
``code/ours.py``). The code calls sklearn; this module re-implements the same algorithm (k-means++
with ``2 + floor(ln K)`` local trials per centre, Lloyd iterations until the squared centre shift
is at most ``tol`` times the mean per-feature variance, best inertia of ``n_init`` runs).
It does not reproduce sklearn's random stream, so the clusters can differ from sklearn's where
k-means has several local optima; ``tests/methods/test_relearn.py`` checks the purity against
sklearn on planted clusters.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Columns of ``x`` [N, d] mapped linearly onto [low, high] (min -> low, max -> high); a
    constant column (zero range) is treated as range 1, so it maps to ``low`` (sklearn)."""
    if x.dim() != 2:
        raise ValueError(f"minmax_scale expects [N, d] features, got shape {list(x.shape)}")
    lo = x.min(dim=0).values
    rng = x.max(dim=0).values - lo
    rng = torch.where(rng == 0, torch.ones_like(rng), rng)
    return (x - lo) / rng * (high - low) + low


def _sq_dist(x: Tensor, c: Tensor, x_sq: Tensor) -> Tensor:
    """Squared Euclidean distances [N, k] (clamped at 0 against rounding)."""
    return (x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator, x_sq: Tensor) -> Tensor:
    """Greedy k-means++ seeding (``2 + floor(ln k)`` candidates per centre, the one that
    lowers the potential most is kept), as sklearn's ``_kmeans_plusplus``."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    closest = _sq_dist(x, x[first:first + 1], x_sq)[:, 0]
    for _ in range(1, k):
        pot = closest.sum()
        if float(pot) <= 0:  # every point sits on a centre: take any not-yet-chosen rows
            cand = torch.randint(n, (1,), generator=gen)
            centers.append(x[int(cand)])
            continue
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * pot
        cand = torch.searchsorted(closest.cumsum(0), r.to(x.dtype)).clamp_max(n - 1)
        d = torch.minimum(closest[None, :], _sq_dist(x, x[cand], x_sq).T)  # [trials, N]
        best = int(d.sum(1).argmin())
        centers.append(x[int(cand[best])])
        closest = d[best]
    return torch.stack(centers)


def _lloyd(x: Tensor, centers: Tensor, max_iter: int, tol: float, x_sq: Tensor) -> tuple[Tensor, Tensor, float]:
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        d = _sq_dist(x, centers, x_sq)
        new_labels = d.argmin(1)
        counts = torch.bincount(new_labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, new_labels, x)
        new_centers = sums / counts.clamp_min(1.0)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # relocate empty clusters onto the points farthest from their centres
            far = d.gather(1, new_labels[:, None])[:, 0].argsort(descending=True)[: len(empty)]
            new_centers[empty] = x[far]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if labels is not None and torch.equal(labels, new_labels):
            break
        labels = new_labels
        if shift <= tol:
            break
    d = _sq_dist(x, centers, x_sq)
    labels = d.argmin(1)
    inertia = float(d.gather(1, labels[:, None]).sum())
    return labels, centers, inertia


def kmeans(x: Tensor, k: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """``(labels [N], centres [k, d], inertia)`` of the best of ``n_init`` k-means runs on ``x``
    [N, d] (float64 internally). ``tol`` is relative to the mean per-feature variance (sklearn).
    ``k`` larger than N is reduced to N."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects non-empty [N, d] features, got shape {list(x.shape)}")
    if k < 1 or n_init < 1 or max_iter < 1:
        raise ValueError(f"kmeans needs k >= 1, n_init >= 1, max_iter >= 1; got {k}, {n_init}, {max_iter}")
    x = x.detach().double()
    k = min(int(k), x.shape[0])
    abs_tol = float(x.var(dim=0, unbiased=False).mean()) * tol
    x_sq = (x * x).sum(1)
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(n_init):
        init = _kmeans_pp(x, k, gen, x_sq)
        run = _lloyd(x, init, max_iter, abs_tol, x_sq)
        if best is None or run[2] < best[2]:
            best = run
    return best


def cluster_purity(clusters: Tensor, labels: Tensor) -> float:
    """``sum_c max_k |{i : cluster_i = c, y_i = k}| / N`` (majority-vote accuracy)."""
    clusters, labels = clusters.long().flatten().cpu(), labels.long().flatten().cpu()
    if clusters.shape != labels.shape or clusters.numel() == 0:
        raise ValueError(f"cluster_purity needs equal-length non-empty inputs, got {clusters.numel()} clusters "
                         f"and {labels.numel()} labels")
    _, c = torch.unique(clusters, return_inverse=True)
    _, y = torch.unique(labels, return_inverse=True)
    table = torch.zeros(int(c.max()) + 1, int(y.max()) + 1, dtype=torch.long)
    table.index_put_((c, y), torch.ones_like(c), accumulate=True)
    return float(table.max(dim=1).values.sum()) / clusters.numel()


def kmeans_purity(features: Tensor, labels: Tensor, num_clusters: int, scale: str = "minmax",
                  n_init: int = 10, seed: int = 0) -> float:
    """Purity of ``KMeans(num_clusters)`` on ``features`` [N, d] against ``labels`` [N]:
    D&R's separability score of one modality's representation on one split.
    ``scale="minmax"`` (the code) maps every feature onto [-1, 1] first; ``"none"`` does not."""
    if scale not in ("minmax", "none"):
        raise ValueError(f"scale must be 'minmax' or 'none', got '{scale}'")
    x = features.detach().double()
    if scale == "minmax":
        x = minmax_scale(x)
    clusters, _, _ = kmeans(x, num_clusters, n_init=n_init, seed=seed)
    return cluster_purity(clusters, labels)


def reinit_weight(purity_train: float, purity_val: float, strength: float) -> float:
    """``w = tanh(lambda * |P_train - P_val|)`` (``strength`` = the code's ``move_lambda``)."""
    return math.tanh(strength * abs(float(purity_train) - float(purity_val)))


@torch.no_grad()
def soft_reinit(param: Tensor, initial: Tensor, weight: float) -> Tensor:
    """In place: ``param <- weight * initial + (1 - weight) * param``; returns ``param``."""
    param.mul_(1.0 - weight).add_(initial.to(param.device, param.dtype), alpha=weight)
    return param

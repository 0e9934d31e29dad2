"""The pure math of the diagnostics (no models, no files): Shapley values, the linear probe,
the conditional utilisation rate, the modality-gap summary and the verdict sentence.

Each function takes numbers or arrays and returns plain Python values, so it can be tested on
hand-made inputs (tests/test_diagnostics.py).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..functional.common import all_subsets, shapley_combine
from ..functional.gmm import fit_gap_gmm
from ..functional.greedy import conditional_utilisation_rate  # noqa: F401  (re-exported)

#: a modality counts as *used* when removing it (its features zeroed, the others kept) lowers the
#: fused accuracy by at least this many percentage points
USED_DROP_POINTS = 1.0
#: exact Shapley values over all 2^M subsets up to this many modalities; Monte-Carlo beyond
EXACT_SHAPLEY_MAX = 8


# ------------------------------------------------------------------------------------ Shapley
def shapley_exact(values: Mapping[FrozenSet[str], float], players: Sequence[str]) -> Dict[str, float]:
    """Exact Shapley values from the value of every subset (scalars or per-sample tensors, in
    which case the per-sample values are averaged). Sums to ``v(all) - v(∅)``."""
    vals = {s: (v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64))
            for s, v in values.items()}
    phi = shapley_combine(vals, players)
    return {m: float(p.double().mean()) for m, p in phi.items()}


def shapley_monte_carlo(value: Callable[[FrozenSet[str]], float], players: Sequence[str],
                        n_permutations: int = 200, seed: int = 0) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Permutation-sampling Shapley estimate: for each of ``n_permutations`` random orders, each
    player's marginal contribution ``v(prefix ∪ {m}) - v(prefix)``; returns ``(mean, standard
    error)`` per player (standard error = std of the contributions / sqrt(n_permutations)).
    Each permutation's contributions telescope to ``v(all) - v(∅)``, so efficiency holds exactly
    for the estimate too. ``value`` is called once per distinct subset (cached)."""
    players = list(players)
    cache: Dict[FrozenSet[str], float] = {}

    def v(s: FrozenSet[str]) -> float:
        if s not in cache:
            cache[s] = float(value(s))
        return cache[s]

    rng = random.Random(seed)
    contrib: Dict[str, list] = {m: [] for m in players}
    for _ in range(max(1, int(n_permutations))):
        order = players[:]
        rng.shuffle(order)
        prefix: FrozenSet[str] = frozenset()
        prev = v(prefix)
        for m in order:
            prefix = prefix | {m}
            cur = v(prefix)
            contrib[m].append(cur - prev)
            prev = cur
    mean = {m: float(np.mean(c)) for m, c in contrib.items()}
    n = len(next(iter(contrib.values())))
    se = {m: (float(np.std(c, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")) for m, c in contrib.items()}
    return mean, se


def permutation_subsets(players: Sequence[str], n_permutations: int = 200, seed: int = 0) -> set:
    """The subsets :func:`shapley_monte_carlo` with the same arguments will ask for (to compute
    their values in one pass beforehand)."""
    players = list(players)
    rng = random.Random(seed)
    need = {frozenset()}
    for _ in range(max(1, int(n_permutations))):
        order = players[:]
        rng.shuffle(order)
        prefix: FrozenSet[str] = frozenset()
        for m in order:
            prefix = prefix | {m}
            need.add(prefix)
    return need


def shapley_subsets(players: Sequence[str], n_permutations: int = 200, seed: int = 0) -> Tuple[bool, list]:
    """``(exact, subsets needed)``: every subset for ``M <= EXACT_SHAPLEY_MAX``, else those of the
    sampled permutations."""
    if len(players) <= EXACT_SHAPLEY_MAX:
        return True, all_subsets(players)
    return False, sorted(permutation_subsets(players, n_permutations, seed), key=len)


# --------------------------------------------------------------------------------- probe
def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0, max_iter: int = 1000) -> float:
    """Accuracy on ``(test_x, test_y)`` of a multinomial logistic regression fitted on
    standardised ``train_x`` (sklearn ``StandardScaler`` + ``LogisticRegression(lbfgs,
    max_iter, random_state=seed)``; lbfgs is multinomial for more than two classes)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    train_x, test_x = _np(train_x), _np(test_x)
    train_y, test_y = _np(train_y).astype(np.int64), _np(test_y).astype(np.int64)
    if np.unique(train_y).size < 2:  # one class only: the probe predicts it
        return float(np.mean(test_y == train_y[0])) if len(train_y) else float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
    return float(np.mean(clf.predict(test_x) == test_y))


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------- CUR
# ``conditional_utilisation_rate`` (Greedy's CUR) lives in functional/greedy.py (the method logs it
# too); imported above and re-exported here.


# ----------------------------------------------------------------------------------- gap
def gap_summary(gaps, bins: int = 20, seed: int = 0) -> Dict[str, object]:
    """Mean, std, a ``bins``-bin histogram on [-1, 1] and a 2-component GMM (functional/gmm's
    ``fit_gap_gmm``; component 0 = *balanced*, its mean nearest 0; ``balanced_share`` = its
    weight) of per-sample modality gaps."""
    g = _np(gaps).astype(np.float64).reshape(-1)
    counts, edges = np.histogram(np.clip(g, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
    gm = fit_gap_gmm(g, seed=seed)
    return {"mean": float(g.mean()) if g.size else float("nan"),
            "std": float(g.std()) if g.size else float("nan"),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
            "gmm": {"weights": [float(w) for w in gm.weights], "means": [float(m) for m in gm.means],
                    "variances": [float(v) for v in gm.variances], "balanced_share": float(gm.weights[0]),
                    "degenerate": bool(gm.degenerate)}}


# ------------------------------------------------------------------------------- ensemble
def averaged_softmax_accuracy(logits: Mapping[str, Tensor], labels: Tensor) -> float:
    """Accuracy of the mean of the softmax probabilities of several classifiers."""
    return averaged_probability_accuracy({m: l.float().softmax(dim=1) for m, l in logits.items()}, labels)


def averaged_probability_accuracy(probs: Mapping[str, Tensor], labels: Tensor) -> float:
    """Accuracy of the mean of several classifiers' class probabilities."""
    mean = torch.stack([p.float() for p in probs.values()]).mean(0)
    return float((mean.argmax(1) == labels).double().mean())


# -------------------------------------------------------------------------------- verdict
def verdict(modality: str, drop: float, zero_out: Optional[float] = None, probe: Optional[float] = None,
            reference: Optional[float] = None, shapley: Optional[float] = None,
            threshold_points: float = USED_DROP_POINTS) -> str:
    """One plain sentence. ``drop``: fused accuracy minus the accuracy with ``modality`` removed
    (fractions); used when ``100 * drop >= threshold_points``."""
    pts = 100.0 * drop
    used = pts >= threshold_points
    parts = [f"{modality}: {'used' if used else 'not used'}"]
    if pts >= 0:
        parts.append(f"removing it costs {pts:.1f} points")
    else:
        parts.append(f"removing it gains {-pts:.1f} points")
    if shapley is not None and math.isfinite(shapley):
        parts.append(f"its Shapley share of accuracy is {100.0 * shapley:.1f} points")
    if probe is not None and reference is not None and reference > 0:
        parts.append(f"its probe reaches {probe / reference:.2f} of its standalone accuracy "
                     f"({probe:.3f} vs {reference:.3f})")
    elif probe is not None:
        parts.append(f"its linear probe reaches {probe:.3f} (no standalone run given)")
    if zero_out is not None:
        parts.append(f"the fused classifier on it alone reaches {zero_out:.3f}")
    return "; ".join(parts) + "."

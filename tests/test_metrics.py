import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from mmbalance.evaluation.metrics import accuracy, confusion_matrix, macro_f1


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    y = rng.integers(0, k, 60)
    p = np.where(rng.random(60) < 0.6, y, rng.integers(0, k, 60))
    if seed % 2:  # a class never predicted and one never present
        p[p == 1] = 2
        y[y == 4] = 3
    yt, pt = torch.tensor(y), torch.tensor(p)
    assert accuracy(pt, yt) == pytest.approx(accuracy_score(y, p))
    assert macro_f1(pt, yt, k) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_confusion_matrix_hand():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]

"""CML (Ma, Zhang et al., ICML 2023): ranking loss, nested masks, loss wiring, training."""
import math

import pytest
import torch
import torch.nn.functional as F
from utils import (
    assert_same_step,
    batch_of,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.functional.cml import (
    nested_keep_masks,
    random_removal_positions,
    ranking_loss,
)
from mmbalance.methods.cml import CMLOptions
from mmbalance.training.trainer import Trainer


def _logits(*probs):
    return torch.tensor([[math.log(p) for p in probs]])


# ------------------------------------------------------------------------------- ranking loss
def test_ranking_loss_hand_case_trick1():
    # spec §4.19: conf_full = 0.7 (correct), conf_without = 0.9 -> trick-1 term 0.2
    full, without = _logits(0.7, 0.3), _logits(0.9, 0.1)
    y = torch.tensor([0])
    assert float(ranking_loss([full, without], y)) == pytest.approx(0.2, abs=1e-6)
    assert float(ranking_loss([full, without], y, trick2=False)) == pytest.approx(0.2, abs=1e-6)
    assert float(ranking_loss([full, without], y, trick1=False)) == pytest.approx(0.0, abs=1e-7)
    assert float(ranking_loss([full, without], y, epsilon=0.05)) == pytest.approx(0.15, abs=1e-6)
    # confidence dropping is never penalised
    assert float(ranking_loss([without, full], y)) == pytest.approx(0.0, abs=1e-7)


def test_ranking_loss_wrong_full_right_reduced_is_zero():
    # full predicts 0 (wrong, conf 0.7); reduced predicts 1 = y (right, conf 0.9): both terms 0
    full, reduced = _logits(0.7, 0.3), _logits(0.1, 0.9)
    assert float(ranking_loss([full, reduced], torch.tensor([1]))) == pytest.approx(0.0, abs=1e-7)


def test_ranking_loss_trick2_both_wrong_and_detached():
    # y = 1, both predict class 0: conf 0.7 -> 0.9 is penalised by trick 2 only (0.2)
    full = _logits(0.7, 0.3).requires_grad_(True)
    reduced = _logits(0.9, 0.1).requires_grad_(True)
    y = torch.tensor([1])
    loss = ranking_loss([full, reduced], y)
    assert float(loss.detach()) == pytest.approx(0.2, abs=1e-6)
    assert float(ranking_loss([full, reduced], y, trick2=False).detach()) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.equal(full.grad, torch.zeros_like(full.grad))  # conf_k detached in trick 2
    assert reduced.grad.abs().sum() > 0
    # trick 1 is not detached: both ends get gradients
    f2, r2 = _logits(0.7, 0.3).requires_grad_(True), _logits(0.9, 0.1).requires_grad_(True)
    ranking_loss([f2, r2], torch.tensor([0])).backward()
    assert f2.grad.abs().sum() > 0 and r2.grad.abs().sum() > 0


def test_ranking_loss_sums_over_batch_and_chain():
    # two rows, each 0.7 -> 0.9 correct (0.2 each), chain of 3 with a second step 0.9 -> 0.6 (0)
    full = torch.cat([_logits(0.7, 0.3), _logits(0.3, 0.7)])
    mid = torch.cat([_logits(0.9, 0.1), _logits(0.1, 0.9)])
    last = torch.cat([_logits(0.6, 0.4), _logits(0.4, 0.6)])
    y = torch.tensor([0, 1])
    assert float(ranking_loss([full, mid, last], y)) == pytest.approx(0.4, abs=1e-6)
    last2 = torch.cat([_logits(0.95, 0.05), _logits(0.4, 0.6)])  # row 0 gains 0.05 more
    assert float(ranking_loss([full, mid, last2], y)) == pytest.approx(0.45, abs=1e-6)


# ------------------------------------------------------------------------------- nested masks
def test_nested_masks_hand_case():
    # row 0 removes m2 then m0 (m1 last); row 1 removes m0 then m1 (m2 last)
    pos = torch.tensor([[1, 2, 0], [0, 1, 2]])
    k0, k1, k2 = nested_keep_masks(pos)
    assert k0.all()
    assert k1.tolist() == [[True, True, False], [False, True, True]]
    assert k2.tolist() == [[False, True, False], [False, False, True]]


def test_random_positions_are_permutations_and_seeded():
    g = torch.Generator().manual_seed(0)
    pos = random_removal_positions(64, 3, g)
    assert torch.equal(pos.sort(1).values, torch.arange(3).expand(64, 3))
    assert len({tuple(r) for r in pos.tolist()}) == 6  # every order occurs
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(random_removal_positions(64, 3, g2), pos)


def test_options_validate():
    assert CMLOptions().validate() == []
    o = CMLOptions()
    assert o.beta == 10.0 and o.epsilon == 0.0 and o.cls_loss == "nested" and o.trick1 and o.trick2
    assert any("beta" in e for e in CMLOptions(beta=-1).validate())
    assert any("epsilon" in e for e in CMLOptions(epsilon=-0.1).validate())
    assert any("cls_loss" in e for e in CMLOptions(cls_loss="x").validate())


# ------------------------------------------------------------------------------- wiring
def _trainer(overrides=(), mods=2):
    return Trainer(tiny_config("cml", ["train.epochs=1"] + list(overrides)), None, quiet=True, bundle=tiny_bundle(mods))


@pytest.mark.parametrize("mods", [2, 3])
def test_compute_loss_matches_hand_composition(mods):
    tr = _trainer(["method.beta=30", "method.epsilon=0.01"], mods=mods)
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    batch = batch_of(tr.bundle)
    ctx.global_step = 5
    res = method.compute_loss(model, batch, ctx)
    pos = method.removal_positions(batch.labels.shape[0], ctx)  # same step -> same orders
    assert torch.equal(pos, method.removal_positions(batch.labels.shape[0], ctx))
    ctx.global_step = 6
    assert not torch.equal(pos, method.removal_positions(batch.labels.shape[0], ctx))
    with torch.no_grad():
        feats = model.encode(batch.inputs)
        mods_ = model.modalities
        chain = []
        for k in range(mods):
            rows = []
            for i in range(batch.labels.shape[0]):
                f = {m: (feats[m][i:i + 1] if int(pos[i, j]) >= k else torch.zeros_like(feats[m][i:i + 1]))
                     for j, m in enumerate(mods_)}
                rows.append(model.fuse(f))
            chain.append(torch.cat(rows))
        y = batch.labels
        cls = sum(F.cross_entropy(l, y) for l in chain) / mods
        # ranking by hand (loops)
        rank = 0.0
        for k in range(mods - 1):
            p0, p1 = chain[k].softmax(1), chain[k + 1].softmax(1)
            for i in range(len(y)):
                c0, c1 = float(p0[i].max()), float(p1[i].max())
                r0, r1 = int(p0[i].argmax()), int(p1[i].argmax())
                if r0 == int(y[i]):
                    rank += max(0.0, c1 - c0 - 0.01)
                if r0 != int(y[i]) and r1 != int(y[i]):
                    rank += max(0.0, c1 - c0 - 0.01)
    assert torch.allclose(res.output.logits, chain[0], atol=1e-6)
    assert float(res.logs["loss_cls"]) == pytest.approx(float(cls), abs=1e-5)
    assert float(res.logs["loss_rank"]) == pytest.approx(rank, abs=1e-5)
    assert float(res.loss.detach()) == pytest.approx(float(cls) + 0.3 * rank, abs=1e-5)
    # every chain step removes one more modality
    for k in range(mods):
        assert (nested_keep_masks(pos)[k].sum(1) == mods - k).all()


def test_cls_loss_full_uses_only_the_fused_ce():
    tr = _trainer(["method.cls_loss=full", "method.beta=0"])
    batch = batch_of(tr.bundle)
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    ce = F.cross_entropy(tr.model(batch.inputs).logits, batch.labels)
    assert float(res.loss.detach()) == pytest.approx(float(ce.detach()), abs=1e-6)


# ------------------------------------------------------------------------------ harness
def test_state_round_trip_reproduces_next_step():
    state_round_trip_reproduces_next_step("cml", ["method.beta=50"])


def test_noop_is_joint():
    assert_same_step("cml", ["method.beta=0", "method.cls_loss=full"], base="joint")


def test_default_differs_from_joint():
    with pytest.raises(AssertionError):
        assert_same_step("cml", [], base="joint")


def test_three_modalities_fit():
    assert _trainer(mods=3).fit() is not None


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "cml", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

"""QMF (Zhang et al., ICML 2023): energy weights, ranking loss, history, state, M=3, no-op, CLI."""
import math

import pytest
import torch
import torch.nn.functional as F
from utils import (
    batch_of,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.functional.qmf import (
    energy_weights,
    minmax_normalise,
    qmf_fuse,
    rank_loss,
)
from mmbalance.methods.qmf import QMFFusion
from mmbalance.training.trainer import Trainer


def test_energy_weights_and_fusion_hand_case():
    # spec §4.18: l_a = [2, 0], l_v = [0, 0] -> w_a = 0.1 ln(e^2 + 1) = 0.212693, w_v = 0.1 ln 2 = 0.069315
    la, lv = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert float(energy_weights(la)) == pytest.approx(0.212693, abs=1e-6)
    assert float(energy_weights(lv)) == pytest.approx(0.069315, abs=1e-6)
    fused, w = qmf_fuse({"a": la, "v": lv})
    assert torch.allclose(fused, torch.tensor([[0.425386, 0.0]]), atol=1e-6)
    assert w["a"].shape == (1, 1)


def test_rank_loss_hand_cases():
    h = torch.tensor([1.0, 0.0])  # row 0 has the larger cumulative loss: it is the less reliable one
    # pairs (0, 1) and (1, 0) (roll by -1); slack: max(0, 0.3 - 1) = 0 both ways
    assert float(rank_loss(torch.tensor([0.5, 0.2]), h)) == pytest.approx(0.0)
    # w_0 = 1.5: max(0, 1.3 - 1) = 0.3 for both pairs
    assert float(rank_loss(torch.tensor([1.5, 0.2]), h)) == pytest.approx(0.3, abs=1e-6)
    # CRL margin: max(0, 0.3 + 1) = 1.3
    assert float(rank_loss(torch.tensor([0.5, 0.2]), h, margin="crl")) == pytest.approx(1.3, abs=1e-6)
    # the more reliable row more confident: no loss with either margin
    assert float(rank_loss(torch.tensor([0.2, 0.5]), h, margin="slack")) == 0.0
    assert float(rank_loss(torch.tensor([0.2, 0.5]), h, margin="crl")) == pytest.approx(0.7, abs=1e-6)
    # ties contribute 0
    assert float(rank_loss(torch.tensor([5.0, 0.0]), torch.tensor([0.3, 0.3]), margin="crl")) == 0.0
    # 3 rows: pairs (0,1), (1,2), (2,0); h = [0, 0.5, 1], w = [1, 0, 0]
    # (0,1): t=-1: -(1-0) - 0.5 -> 0; (1,2): t=-1: -(0-0) - 0.5 -> 0; (2,0): t=1: (0-1) - 1 -> 0 (slack)
    # crl: (0,1): -1 + 0.5 -> 0; (1,2): 0 + 0.5 = 0.5; (2,0): -1 + 1 = 0  -> mean 0.5/3
    w3, h3 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.5, 1.0])
    assert float(rank_loss(w3, h3)) == 0.0
    assert float(rank_loss(w3, h3, margin="crl")) == pytest.approx(0.5 / 3, abs=1e-6)


def test_minmax_normalise():
    assert torch.allclose(minmax_normalise(torch.tensor([2.0, 4.0, 6.0])), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(minmax_normalise(torch.zeros(4)), torch.zeros(4))


def _trainer(overrides=(), mods=2, out=None, seed=0):
    return Trainer(tiny_config("qmf", ["train.epochs=1", f"train.seed={seed}"] + list(overrides)), out, quiet=True,
                   bundle=tiny_bundle(mods))


def _by_hand(model, batch, hist, lam, margin="slack"):
    feats = model.encode(batch.inputs)
    logits = {m: model.fusion.branches[m](feats[m]) for m in model.modalities}
    w = {m: 0.1 * torch.logsumexp(l, 1) for m, l in logits.items()}
    fused = sum(w[m].unsqueeze(1) * logits[m] for m in logits)
    loss = F.cross_entropy(fused, batch.labels) + sum(F.cross_entropy(l, batch.labels) for l in logits.values())
    B = len(batch)
    for i, m in enumerate(model.modalities):
        hm = hist[i]
        hn = (hm - hm.min()) / (hm.max() - hm.min())
        h = hn[batch.index]
        terms = []
        for r in range(B):
            j = (r + 1) % B
            t = (h[r] > h[j]).float() - (h[r] < h[j]).float()
            gap = (h[r] - h[j]).abs()
            raw = t * (w[m][r] - w[m][j]) + (-gap if margin == "slack" else gap)
            terms.append(torch.clamp(raw, min=0.0) if t != 0 else raw * 0)
        loss = loss + lam * torch.stack(terms).mean()
    return loss, logits


@pytest.mark.parametrize("margin", ["slack", "crl"])
def test_loss_wiring_with_planted_history(margin):
    tr = _trainer([f"method.margin={margin}", "method.lam=1"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    assert isinstance(model.fusion, QMFFusion)
    g = torch.Generator().manual_seed(1)
    # batch rows close together (small normalised gaps, so the slack version is active too);
    # rows 46/47 (not in the batch) set the min and max
    hist = 1.5 + 0.01 * torch.rand(2, len(tr.bundle.train), generator=g)
    hist[:, 46], hist[:, 47] = 0.0, 3.0
    method.history = hist.clone()
    batch = batch_of(tr.bundle, n=16)
    res = method.compute_loss(model, batch, ctx)
    expect, _ = _by_hand(model, batch, hist, 1.0, margin)
    assert float(res.loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    assert float(res.logs["rank_m1"]) > 0  # not vacuous


def test_history_accumulates_per_sample_losses_after_the_step():
    tr = _trainer()
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    batch = batch_of(tr.bundle, n=16)
    with torch.no_grad():
        feats = model.encode(batch.inputs)
        ce1 = torch.stack([F.cross_entropy(model.fusion.branches[m](feats[m]), batch.labels, reduction="none")
                           for m in model.modalities])
    method.training_step(model, batch, ctx)
    h = method.history
    assert h.shape == (2, len(tr.bundle.train))
    assert torch.allclose(h[:, batch.index], ce1, atol=1e-6)  # losses from BEFORE the step
    others = torch.ones(h.shape[1], dtype=torch.bool)
    others[batch.index] = False
    assert torch.equal(h[:, others], torch.zeros_like(h[:, others]))
    with torch.no_grad():
        feats = model.encode(batch.inputs)
        ce2 = torch.stack([F.cross_entropy(model.fusion.branches[m](feats[m]), batch.labels, reduction="none")
                           for m in model.modalities])
    method.training_step(model, batch, ctx)
    assert torch.allclose(method.history[:, batch.index], ce1 + ce2, atol=1e-5)  # cumulative


def test_state_round_trip():
    state_round_trip_reproduces_next_step("qmf", ["method.lam=1"], steps=2)


def test_three_modalities_train(tmp_path):
    res = _trainer([], mods=3, out=tmp_path).fit()
    assert math.isfinite(res["test"]["loss"])
    row = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert '"rank_m3"' in row


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lam_zero_is_the_multiloss_objective():
    """lam = 0 with a non-constant history: the step equals plain SGD on sum_m CE(l_m) + CE(fused)."""
    g = torch.Generator().manual_seed(2)
    hist = torch.rand(2, 48, generator=g)
    steps = {}
    for name, lam in (("noop", 0.0), ("active", 0.5)):
        tr = _trainer([f"method.lam={lam}"])
        tr.method.history = hist.clone()
        tr.model.train()
        tr.method.training_step(tr.model, batch_of(tr.bundle, n=16), tr.ctx)
        steps[name] = _params(tr.model)
    tr = _trainer()
    tr.model.train()
    batch = batch_of(tr.bundle, n=16)
    loss, _ = _by_hand(tr.model, batch, hist, 0.0)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    base = _params(tr.model)
    for n, p in base.items():
        assert torch.allclose(steps["noop"][n], p, atol=1e-6), n
    assert any(not torch.allclose(steps["active"][n], p, atol=1e-6) for n, p in base.items())


def test_options_validated():
    for bad in ("method.lam=-1", "method.margin=x", "method.weight_scale=0"):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "qmf", None, [bad])


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "qmf", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

"""MIDAS: the misaligned-sample math on hand-computed tensors, and the method through the trainer."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError
from mmbalance.functional.midas import (alpha_update, alpha_update_from_means, confidence_labels, hard_weights,
                                        misaligned_loss, misaligned_sources, normalised_multimodal_confidence,
                                        random_assignments, sample_extra_sources, sample_partners,
                                        source_confidences)
from mmbalance.methods import midas as midas_mod
from mmbalance.methods.midas import MIDAS
from mmbalance.training.trainer import Trainer
from utils import batch_of, tiny_bundle, tiny_config, two_steps


# ----------------------------------------------------------------------------- partners
def test_partner_never_has_equal_label_and_is_uniform():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        y = torch.randint(0, 3, (9,), generator=g)
        p, valid = sample_partners(y, "uniform", generator=g)
        assert torch.equal(valid, (y.view(-1, 1) != y.view(1, -1)).any(1))
        assert (y[p][valid] != y[valid]).all()
    y = torch.tensor([0, 1, 1, 1])
    counts = torch.zeros(4)
    for _ in range(3000):
        p, _ = sample_partners(y, "uniform", generator=g)
        counts[p[0]] += 1
        assert p[1] == 0 and p[2] == 0 and p[3] == 0
    assert counts[0] == 0 and (counts[1:] / 3000 - 1 / 3).abs().max() < 0.04


def test_rows_without_valid_partner_are_invalid():
    p, valid = sample_partners(torch.tensor([2, 2, 2, 2]), "uniform")
    assert not valid.any()
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    for _ in range(50):
        p, valid = sample_partners(y, "shuffle_mask", generator=g)
        assert torch.equal(valid, y[p] != y)
        assert sorted(p.tolist()) == list(range(6))  # one permutation


def test_misaligned_sources_two_and_three_modalities():
    partner = torch.tensor([2, 0, 1])
    src = misaligned_sources(partner, random_assignments(3, 2))
    # type A = (x_i^1, x_j^2), type B = (x_j^1, x_i^2)
    assert src[0].tolist() == [[0, 2], [1, 0], [2, 1]]
    assert src[1].tolist() == [[2, 0], [0, 1], [1, 2]]
    extra = torch.tensor([[1], [2], [0]])
    assign = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    src3 = misaligned_sources(partner, assign, extra)  # K = [[0,2,1],[1,0,2],[2,1,0]]
    assert src3[0].tolist() == [[0, 2, 1], [2, 1, 0], [1, 0, 2]]
    assert src3[1].tolist() == [[2, 1, 0], [1, 0, 2], [0, 2, 1]]
    # every misaligned sample uses all M sources: >= 2 distinct labels when y_j != y_i
    e = sample_extra_sources(5, 2, generator=torch.Generator().manual_seed(0))
    assert (e != torch.arange(5).view(-1, 1)).all()


# ----------------------------------------------------------------------------- labels, weights
def test_confidence_labels_paper_example():
    c = confidence_labels(torch.tensor([[0.9, 0.3]]))
    assert torch.allclose(c, torch.tensor([[0.75, 0.25]]))
    # conf[n, m] = true_prob[src[n, m], m]
    true_prob = torch.tensor([[0.9, 0.1], [0.5, 0.3], [0.2, 0.6]])
    src = torch.tensor([[0, 1], [1, 0]])
    conf = source_confidences(true_prob, src)
    assert torch.allclose(conf, torch.tensor([[0.9, 0.3], [0.5, 0.1]]))
    assert torch.allclose(confidence_labels(conf), torch.tensor([[0.75, 0.25], [0.5 / 0.6, 0.1 / 0.6]]))


def test_hard_weight_range_and_values():
    f1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    f2 = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    # modality 2 replaced from row 1, 2, 3 for anchor 0: cos(f2_0, f2_j) = 1, 1/sqrt2, 1/sqrt2
    src = torch.tensor([[0, 1], [0, 2], [3, 0]])
    anchor = torch.tensor([0, 0, 0])
    w = hard_weights([f1, f2], src, anchor)
    # third: modality 1 replaced by row 3: cos((1,0), (-1,0)) = -1 -> w = 1
    assert torch.allclose(w, torch.tensor([2.0, 1 + (2 ** -0.5 + 1) / 2, 1.0]), atol=1e-6)
    # M = 3: mean cosine over the replaced modalities (1 and -1 -> 0 -> 1.5)
    f3 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    w3 = hard_weights([f1, f2, f3], torch.tensor([[3, 1, 0]]), torch.tensor([0]))
    assert torch.allclose(w3, torch.tensor([1.5]))
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(32, 5, generator=g) for _ in range(2)]
    src = torch.randint(0, 32, (200, 2), generator=g)
    w = hard_weights(feats, src, torch.randint(0, 32, (200,), generator=g))
    assert (w >= 1).all() and (w <= 2).all() and w.std() > 0


def test_misaligned_loss_hand_computed():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    loss = misaligned_loss(probs.log(), torch.tensor([[0, 2]]), torch.tensor([[0.75, 0.25]]),
                           torch.tensor([1.0, 1.05]), torch.tensor([1.5]))
    expected = 1.5 * (0.75 * math.log(2) + 1.05 * 0.25 * math.log(4))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_alpha_update_direction_and_floor():
    # least confident modality: 1 (mean c = 0.25); model's normalised confidence 0.1 < 0.25 -> up
    c = torch.tensor([[0.75, 0.25]])
    probs = torch.tensor([[0.45, 0.05, 0.5]])  # p[y1=0] = 0.45, p[y2=1] = 0.05 -> c^ = 0.1
    src_labels = torch.tensor([[0, 1]])
    assert torch.allclose(normalised_multimodal_confidence(probs, src_labels), torch.tensor([[0.9, 0.1]]))
    new, m_hat, delta = alpha_update(torch.tensor([1.1, 1.0]), c, probs, src_labels, 0.05)
    assert m_hat == 1 and delta == 1.0
    assert torch.allclose(new, torch.tensor([1.0, 1.05]))  # other modality reset to 1
    # over-predicted -> down, floored at 1
    probs_hi = torch.tensor([[0.3, 0.6, 0.1]])  # c^ for modality 1 = 2/3 > 0.25
    new, _, delta = alpha_update(torch.tensor([1.0, 1.02]), c, probs_hi, src_labels, 0.05)
    assert delta == -1.0 and torch.allclose(new, torch.tensor([1.0, 1.0]))
    new, _, _ = alpha_update(torch.tensor([1.0, 1.2]), c, probs_hi, src_labels, 0.05)
    assert torch.allclose(new, torch.tensor([1.0, 1.15]))
    new, m_hat, _ = alpha_update_from_means(torch.ones(3), torch.tensor([0.5, 0.2, 0.3]),
                                            torch.tensor([0.5, 0.1, 0.3]), 0.05)
    assert m_hat == 1 and torch.allclose(new, torch.tensor([1.0, 1.05, 1.0]))


# ----------------------------------------------------------------------------- method
def _trainer(m=2, extra=(), out=None):
    torch.manual_seed(0)
    cfg = tiny_config("midas", ["train.epochs=2"] + list(extra))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(m))


def test_warmup_trains_only_unimodal_heads():
    tr = _trainer(extra=["method.warmup_epochs=1"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    assert model.heads is not None
    batch = batch_of(tr.bundle, n=16)
    ctx.epoch = 0
    res = method.compute_loss(model, batch, ctx)
    feats = res.output.features
    uni = sum(F.cross_entropy(model.heads[m](feats[m]), batch.labels) for m in model.modalities)
    assert res.loss.item() == pytest.approx(uni.item(), abs=1e-6)
    model.zero_grad(set_to_none=True)
    res.loss.backward()
    assert all(p.grad is None for p in model.fusion.parameters())
    assert all(p.grad is not None for p in model.encoders.parameters())


def test_loss_assembly_with_fixed_partner(monkeypatch):
    tr = _trainer(extra=["method.warmup_epochs=0", "method.lam=2.0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=6)  # labels 0,1,2,0,1,2
    y = batch.labels
    partner = torch.tensor([1, 0, 0, 2, 2, 3])
    valid = torch.tensor([True, True, True, True, True, False])  # pretend row 5 has no partner
    monkeypatch.setattr(midas_mod, "sample_partners", lambda labels, mode="uniform", generator=None: (partner, valid))
    method.alpha = [1.0, 1.1]
    res = method.compute_loss(model, batch, ctx)
    with torch.no_grad():
        f = model.encode(batch.inputs)
        h = model.head_logits(f)
        q = torch.stack([h[m].softmax(1)[torch.arange(6), y] for m in ("m1", "m2")], 1)
        total = 0.0
        for i in range(5):
            j = int(partner[i])
            for a, b in ((i, j), (j, i)):  # type A (f_i^1, f_j^2), type B (f_j^1, f_i^2)
                c1, c2 = q[a, 0] / (q[a, 0] + q[b, 1]), q[b, 1] / (q[a, 0] + q[b, 1])
                rep = "m2" if a == i else "m1"
                cos = F.cosine_similarity(f[rep][i:i + 1], f[rep][j:j + 1]).item()
                w = 1 + (cos + 1) / 2
                lp = model.fuse({"m1": f["m1"][a:a + 1], "m2": f["m2"][b:b + 1]}).log_softmax(1)[0]
                total += -w * (1.0 * c1 * lp[y[a]] + 1.1 * c2 * lp[y[b]])
        expected = F.cross_entropy(model.fuse(f), y) + sum(F.cross_entropy(h[m], y) for m in h) + 2.0 * total / 6
    assert res.loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert res.logs["valid_fraction"] == pytest.approx(5 / 6)


def test_single_class_batch_drops_all_misaligned_rows():
    tr = _trainer(extra=["method.warmup_epochs=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=12)
    batch = batch.select(batch.labels == 1)
    res = method.compute_loss(model, batch, ctx)
    f = res.output.features
    ref = F.cross_entropy(model.fuse(f), batch.labels) + sum(
        F.cross_entropy(model.heads[m](f[m]), batch.labels) for m in model.modalities)
    assert res.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert res.logs["loss_mis"] == 0.0 and res.logs["valid_fraction"] == 0.0


@pytest.mark.parametrize("m", [2, 3])
def test_two_steps_update_alpha_and_are_finite(m):
    tr = _trainer(m, extra=["method.warmup_epochs=0", "method.eta=0.5"])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = two_steps(tr)
    assert all(math.isfinite(float(r.loss.detach())) for r in res)
    assert all(r.logs["loss_mis"] > 0 for r in res)
    a = tr.method.alpha
    assert len(a) == m and min(a) >= 1.0 and sum(v == 1.0 for v in a) >= m - 1
    for mod in tr.model.modalities:
        assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items()
                   if k.startswith(f"encoders.{mod}."))
    assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items() if k.startswith("fusion."))


def test_alpha_reset_each_epoch_switch():
    for reset, expect in ((True, [1.0, 1.0]), (False, [1.0, 1.3])):
        tr = _trainer(extra=["method.warmup_epochs=0", f"method.reset_alpha_each_epoch={str(reset).lower()}"])
        tr.method.alpha = [1.0, 1.3]
        tr.method.on_epoch_start(tr.model, tr.ctx)
        assert tr.method.alpha == expect


def test_fit_three_modalities_and_state_round_trip(tmp_path):
    tr = _trainer(3, extra=["method.warmup_epochs=1", "method.reset_alpha_each_epoch=false"], out=tmp_path / "run")
    result = tr.fit()
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_mis" not in rows[0] and rows[1]["loss_mis"] > 0
    tr.method.alpha = [1.0, 1.25, 1.0]
    torch.save(tr.method.state_dict(), tmp_path / "s.pt")
    fresh = _trainer(3).method
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    assert fresh.alpha == [1.0, 1.25, 1.0]
    assert MIDAS.presets["kinetics_sounds"]["method"]["lam"] == 5.0


def test_options_validation():
    with pytest.raises(ConfigError, match="partner"):
        tiny_config("midas", ["method.partner=random"])


def test_confidence_labels_and_hard_weights_are_detached():
    """Unimodal heads get gradient only from L_uni (c~ are detached targets); the encoders get
    gradient from the misaligned loss (features are not detached)."""
    tr = _trainer(extra=["method.warmup_epochs=0", "method.lam=3.0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=12)
    torch.manual_seed(3)
    res = method.compute_loss(model, batch, ctx)
    model.zero_grad(set_to_none=True)
    res.loss.backward()
    g_heads = [p.grad.clone() for p in model.heads.parameters()]
    g_enc = [p.grad.clone() for p in model.encoders.parameters()]
    model.zero_grad(set_to_none=True)
    f = model.encode(batch.inputs)
    ref = F.cross_entropy(model.fuse(f), batch.labels) + sum(
        F.cross_entropy(model.heads[m](f[m]), batch.labels) for m in model.modalities)
    ref.backward()
    for a, b in zip(g_heads, model.heads.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6)
    assert any(not torch.allclose(a, b.grad, atol=1e-5) for a, b in zip(g_enc, model.encoders.parameters()))

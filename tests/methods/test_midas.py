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


@pytest.mark.parametrize("reduction,per_row", [("sum", 1), ("mean", 2)])
def test_loss_assembly_with_fixed_partner(monkeypatch, reduction, per_row):
    tr = _trainer(extra=["method.warmup_epochs=0", "method.lam=2.0", f"method.mis_reduction={reduction}"])
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
        expected = F.cross_entropy(model.fuse(f), y) + sum(F.cross_entropy(h[m], y) for m in h) + 2.0 * total / (6 * per_row)
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
    tr = _trainer(m, extra=["method.warmup_epochs=0", "method.eta=0.5", "method.reset_alpha_each_epoch=false"])
    method = tr.method
    method.alpha = [2.0] * m  # away from the floor, so either sign of Delta moves alpha
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    seen = []
    orig = method.after_step

    def spy(model, batch, result, ctx):
        pending, alpha_before = method._pending.clone(), list(method.alpha)
        orig(model, batch, result, ctx)
        seen.append((pending, alpha_before, list(method.alpha)))

    method.after_step = spy
    res = two_steps(tr)
    assert all(math.isfinite(float(r.loss.detach())) for r in res)
    assert all(r.logs["loss_mis"] > 0 for r in res)
    assert len(seen) == 2
    for (pending, a0, a1), r in zip(seen, res):
        n = float(pending[-1])
        assert n == 2 * round(float(r.logs["valid_fraction"]) * 16)  # two misaligned samples per valid row
        # c~ and c^ are normalised over the modalities of each misaligned sample
        assert float(pending[:m].sum()) == pytest.approx(n) and float(pending[m:2 * m].sum()) == pytest.approx(n)
        mean_c, mean_chat = (pending[:m] / n).tolist(), (pending[m:2 * m] / n).tolist()
        k = min(range(m), key=lambda i: mean_c[i])  # Eq. 5
        step = 0.5 if mean_c[k] > mean_chat[k] else -0.5  # Eq. 6 (no ties on real data)
        expect = [1.0] * m
        expect[k] = max(1.0, a0[k] + step)  # Eq. 7, the others reset to 1
        assert a1 == pytest.approx(expect)
    assert seen[0][1] == [2.0] * m and sorted(seen[0][2])[-1] in (1.5, 2.5)
    assert tr.method.on_epoch_end(tr.model, tr.ctx) == {f"alpha_m{i + 1}": a for i, a in enumerate(seen[-1][2])}
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
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
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


# ----------------------------------------------------------------------------- planted model
def _planted(monkeypatch, q, f1, f2, extra=()):
    """Two rows with labels 0, 1 (so the partners are forced: 0 <-> 1) and 3 classes. The
    features are given (leaf tensors), the fusion is ``f^1 + f^2`` (features live in logit
    space) and the unimodal heads give modality m of row b the true-class probability
    ``q[b][m]`` (the rest spread evenly). Misaligned pairs: P = (f_0^1, f_1^2) with source
    labels (0, 1) -- type A of row 0, type B of row 1 -- and Q = (f_1^1, f_0^2) with (1, 0)."""
    tr = _trainer(extra=["method.warmup_epochs=0"] + list(extra))
    model = tr.model
    batch = batch_of(tr.bundle, n=2)
    assert batch.labels.tolist() == [0, 1]
    feats = {"m1": torch.tensor(f1, requires_grad=True), "m2": torch.tensor(f2, requires_grad=True)}
    heads = {}
    for k, m in enumerate(("m1", "m2")):
        rows = []
        for b in range(2):
            p = [(1 - q[b][k]) / 2] * 3
            p[b] = q[b][k]  # label of row b is b
            rows.append(p)
        heads[m] = torch.tensor(rows).log()
    monkeypatch.setattr(model, "encode", lambda inputs, modalities=None: dict(feats))
    monkeypatch.setattr(model, "head_logits", lambda f: {m: heads[m] + 0 * f[m].sum() for m in f})
    monkeypatch.setattr(model, "fuse", lambda f: f["m1"] + f["m2"])
    return tr, batch


Q_M2_WEAK = [[0.9, 0.6], [0.8, 0.3]]  # P: c~ = (0.9, 0.3)/1.2 = (3/4, 1/4); Q: (0.8, 0.6)/1.4 = (4/7, 3/7)
Q_M1_WEAK = [[0.6, 0.9], [0.3, 0.8]]  # P: (0.6, 0.8)/1.4 = (3/7, 4/7); Q: (0.3, 0.9)/1.2 = (1/4, 3/4)
F_M1_LOUD = ([[2.0, 0, 0], [0, 0, 1.0]], [[0, 1.0, 0], [1.0, 0, 0]])  # P logits [3,0,0], Q logits [0,1,1]
F_M2_LOUD = ([[0, 0, 1.0], [0, 0, 0.5]], [[3.0, 0, 0], [0, 3.0, 0]])  # P logits [0,3,1], Q logits [3,0,.5]


@pytest.mark.parametrize("q,f,alpha0,expect", [
    # mean c~ = ((3/4 + 4/7)/2, (1/4 + 3/7)/2) = (0.661, 0.339) -> m^ = m2. The model's normalised
    # confidence for m2's label: P 1/(e^3+1) = 0.047, Q 1/(1+e) = 0.269, mean 0.158 < 0.339
    # -> Delta = +1 -> alpha_m2 = 1.2 + 0.1
    (Q_M2_WEAK, F_M1_LOUD, [1.0, 1.2], [1.0, 1.3]),
    # m2 over-predicted: P e^3/(1+e^3) = 0.953, Q e^3/(e^3+1) = 0.953 > 0.339 -> Delta = -1
    (Q_M2_WEAK, F_M2_LOUD, [1.0, 1.2], [1.0, 1.1]),
    # mean c~ = ((3/7 + 1/4)/2, ...) = (0.339, 0.661) -> m^ = m1; model's confidence for m1's label:
    # P e^3/(e^3+1) = 0.953, Q e/(e+1) = 0.731, mean 0.842 > 0.339 -> Delta = -1 -> alpha_m1 = 1.1,
    # alpha_m2 reset to 1
    (Q_M1_WEAK, F_M1_LOUD, [1.2, 1.3], [1.1, 1.0]),
])
def test_training_step_alpha_step_planted(monkeypatch, q, f, alpha0, expect):
    tr, batch = _planted(monkeypatch, q, *f, extra=["method.eta=0.1"])
    tr.method.alpha = list(alpha0)
    tr.model.train()
    res = tr.method.training_step(tr.model, batch, tr.ctx)
    assert tr.method.alpha == pytest.approx(expect, abs=1e-9)
    assert tr.method.on_epoch_end(tr.model, tr.ctx) == {"alpha_m1": pytest.approx(expect[0]),
                                                        "alpha_m2": pytest.approx(expect[1])}
    assert math.isfinite(float(res.loss.detach()))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mis_reduction_hand_values(monkeypatch, reduction):
    tr, batch = _planted(monkeypatch, Q_M2_WEAK, *F_M1_LOUD,
                         extra=["method.lam=2.0", f"method.mis_reduction={reduction}"])
    tr.method.alpha = [1.0, 1.2]
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    e = math.e
    # every swap is between orthogonal features: cos = 0 -> w = 1.5 for all four samples
    lse_p, lse_q = math.log(e ** 3 + 2), math.log(2 * e + 1)  # P logits [3,0,0], Q logits [0,1,1]
    loss_p = 1.5 * (1.0 * 0.75 * (lse_p - 3) + 1.2 * 0.25 * lse_p)  # labels (0, 1)
    loss_q = 1.5 * (1.0 * 4 / 7 * (lse_q - 1) + 1.2 * 3 / 7 * lse_q)  # labels (1, 0)
    four = 2 * (loss_p + loss_q)  # P and Q each appear twice (type A of one row, type B of the other)
    l_mis = four / 2 / (2 if reduction == "mean" else 1)  # mean over |B| = 2 rows
    l_align = (math.log(e ** 2 + e + 1) - 2 + math.log(2 * e + 1)) / 2  # aligned logits [2,1,0], [1,0,1]
    l_uni = (-math.log(0.9) - math.log(0.8)) / 2 + (-math.log(0.6) - math.log(0.3)) / 2
    assert res.logs["loss_mis"] == pytest.approx(l_mis, rel=1e-5)
    assert float(res.loss.detach()) == pytest.approx(l_align + l_uni + 2.0 * l_mis, rel=1e-5)


def test_options_reject_bad_values():
    for bad, word in (("method.mis_reduction=max", "mis_reduction"), ("method.lam=-1", "lam"),
                      ("method.eta=-0.1", "eta")):
        with pytest.raises(ConfigError, match=word):
            tiny_config("midas", [bad])
    assert tiny_config("midas").method_options.mis_reduction == "mean"


def test_state_loads_weights_only_and_restores_behaviour(tmp_path):
    tr = _trainer(extra=["method.warmup_epochs=0"])
    batch = batch_of(tr.bundle, n=12)
    tr.method.alpha = [1.0, 1.4]
    torch.save(tr.method.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    loaded, plain = (_trainer(extra=["method.warmup_epochs=0"]).method for _ in range(2))
    loaded.load_state_dict(state)
    assert loaded.alpha == [1.0, 1.4]
    losses = []
    for meth in (tr.method, loaded, plain):
        torch.manual_seed(7)  # same partners
        losses.append(float(meth.compute_loss(tr.model, batch, tr.ctx).logs["loss_mis"]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[2] != pytest.approx(losses[0], rel=1e-3)  # alpha matters: the state was restored


def _alpha_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from mmbalance.methods import build_method
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method = build_method("midas", None, ["m1", "m2"], 3)
        # [sum c~ (M), sum c^ (M), count] of this process's batch
        method._pending = torch.tensor([[1.5, 0.5, 1.9, 0.1, 2.0], [1.0, 5.0, 0.2, 5.8, 6.0]][rank],
                                       dtype=torch.float64)
        method.after_step(None, None, None, None)
        torch.save(method.alpha, f"{out_dir}/alpha{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_alpha_statistics_reduced_over_processes(tmp_path):
    """Rank 0 alone would pick m2 (mean c~ 0.25, c^ 0.05 -> alpha_m2 up); the global batch has
    mean c~ = (2.5, 5.5)/8 -> m1, mean c^_1 = 2.1/8 = 0.2625 < 0.3125 -> alpha_m1 = 1.05 on both."""
    import torch.multiprocessing as mp
    mp.spawn(_alpha_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert torch.load(tmp_path / f"alpha{r}.pt") == pytest.approx([1.05, 1.0])

"""arm: histogram NMI/NCMI (with orientation), contributions, the relative floor, DSR
normalisation and re-sample counts on planted cases, the exact min, DFF timing, the code mode,
the DSR logs, steps, options and checkpoints."""
import copy
import io
import json
import math

import pytest
import torch

from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.functional import arm as A
from mmbalance.methods import build_method
from mmbalance.methods.arm import ARMFusion
from mmbalance.training.trainer import Trainer
from utils import tiny_bundle, tiny_config


@pytest.mark.parametrize("norm", A.NORMS)
def test_nmi_identical_is_one_and_independent_is_near_zero(norm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 50, generator=g)
    assert abs(float(A.nmi(x, x, 30, norm)) - 1.0) < 1e-9
    assert abs(float(A.nmi(x, 3 * x + 1, 30, norm)) - 1.0) < 1e-9  # same bins after an affine map
    y = torch.randn(400, 50, generator=g)
    assert 0.0 <= float(A.nmi(x, y, 30, norm)) < 0.03


def test_histogram_known_answers():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    p = A.joint_probs(x, y, bins=2)
    assert torch.allclose(p, torch.full((2, 2), 0.25, dtype=torch.float64))
    assert abs(float(A.entropy(p)) - math.log(4)) < 1e-12
    assert float(A.nmi(x, y, bins=2)) == 0.0
    # the maximum lands in the last bin (closed right edge) and a constant tensor in bin 0
    assert A.bin_indices(torch.tensor([0.0, 0.5, 1.0]), 2).tolist() == [0, 1, 1]
    assert A.bin_indices(torch.ones(3), 5).tolist() == [0, 0, 0]
    # NCMI(X; Y | Z): X = Y independent of Z -> H(X|Z) = H(Y|Z) = CMI = log 2 -> 1
    xs = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    zs = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    assert abs(float(A.ncmi(xs, xs, zs)) - 1.0) < 1e-12
    assert abs(float(A.ncmi(xs, xs, zs, norm="code")) - 0.5) < 1e-12  # the code's CMI/(H+H)
    # X = Z: nothing left to share given Z -> 0; X independent of Y given Z -> 0
    assert float(A.ncmi(zs, xs, zs)) == 0.0
    ys = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert abs(float(A.ncmi(xs, ys, zs))) < 1e-12


def _planted():
    p_fused = torch.tensor([0.5, 1.0])
    p_modal = torch.tensor([[0.2, 0.4], [1.0, 1.0]])
    info = torch.tensor([0.6, 0.3])
    cond = torch.tensor([[0.0, 0.1], [0.2, 0.0]])  # C[j, i] = NCMI(z_j; f | z_i)
    return p_fused, p_modal, info, cond


def test_contributions_losses_and_resample_counts_planted():
    p_fused, p_modal, info, cond = _planted()
    phi = A.contributions(p_fused, p_modal, info, cond, "paper")
    assert torch.allclose(phi, torch.tensor([[0.34, 0.25], [0.7, 0.8]]))
    phi_code = A.contributions(p_fused, p_modal, info, cond, "code")
    assert torch.allclose(phi_code, torch.tensor([[0.5, 0.17], [1.1, 0.4]]))
    phi_x = A.joint_contribution(phi)
    assert torch.allclose(phi_x, torch.tensor([0.295, 0.75]))
    phi_mi = A.lower_bound_contribution(p_fused, info)
    l_mi, l_cmi = A.bmml_losses(phi, phi_mi)
    assert abs(float(l_mi) - 0.775) < 1e-6
    assert abs(float(l_cmi) - (0.09 / 0.295 + 0.1 / 0.75) / 2) < 1e-6
    r = A.contribution_ratios(phi)  # phi / phi_X by hand: 0.34/0.295, 0.25/0.295, 0.7/0.75, 0.8/0.75
    assert torch.allclose(r, torch.tensor([[68 / 59, 50 / 59], [14 / 15, 16 / 15]]))
    w = A.inverse_ratio_weights(torch.tensor([0.2, 0.4]))
    assert torch.allclose(w, torch.tensor([2.0, 0.5]))  # the weaker modality up-weighted

    counts = A.resample_counts(torch.tensor([0.0, 0.3, 1.0, 1.6, 2.2, 2.4]), k=-2.0, m=2.0)
    assert counts.tolist() == [4, 3, 2, 1, 0, 0]
    order = A.resampled_order(counts, torch.Generator().manual_seed(0))
    assert len(order) == 16 and torch.bincount(order, minlength=6).tolist() == [5, 4, 3, 2, 1, 1]


def test_min_not_max():
    p = torch.tensor([0.5, 1.0])
    info = torch.tensor([0.6, 0.3])
    assert torch.allclose(A.lower_bound_contribution(p, info), torch.tensor([0.15, 0.3]))
    v = torch.tensor([0.2, 0.9])
    sm = A.smooth_min(v, tau=0.01)
    assert abs(float(sm) - 0.2) < 1e-3 and float(A.smooth_min(v)) <= 0.2
    assert float(A.smooth_min(v)) < float(v.max())


def _trainer(tmp_path=None, extra=(), bundle=None):
    cfg = tiny_config("arm", list(extra))
    return Trainer(cfg, tmp_path, quiet=True, bundle=bundle or tiny_bundle(2))


def test_dff_weights_take_effect_from_next_epoch(tmp_path):
    torch.manual_seed(0)
    tr = _trainer(tmp_path, ["train.epochs=4", "method.warmup_epochs=2", "method.dsr=false"])
    used = {}
    orig = tr.method.compute_loss

    def spy(model, batch, ctx):
        used.setdefault(ctx.epoch, []).append(model.fusion.fw.clone())
        return orig(model, batch, ctx)

    tr.method.compute_loss = spy
    tr.fit()
    import json
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if l]
    ones = torch.ones(2)
    for e in range(4):  # constant within an epoch
        assert all(torch.equal(w, used[e][0]) for w in used[e])
    assert torch.equal(used[0][0], ones) and torch.equal(used[1][0], ones)  # warm-up
    assert rows[0]["fw_next_m1"] == 1.0  # end of epoch 0: next epoch still warm-up
    for e in (2, 3):  # weights averaged over epoch e-1 are used in epoch e
        expect = torch.tensor([rows[e - 1]["fw_next_m1"], rows[e - 1]["fw_next_m2"]])
        assert torch.allclose(used[e][0], expect) and not torch.equal(used[e][0], ones)
        assert abs(float(used[e][0].sum()) - 2.0) < 1e-4  # ratios phi_m / phi_X sum to M


@pytest.mark.parametrize("norm, copies", [("none", [4, 3, 2, 1, 0, 0]),
                                          # ranks 0..5 -> phi' = 2r/5 -> round(4 - 4r/5) = 4, 3, 2, 2, 1, 0
                                          ("rank", [4, 3, 2, 2, 1, 0]),
                                          # phi' = 2 phi / 2.4 -> round(4 - phi/0.6) = 4, 4, 2, 1, 0, 0
                                          ("minmax", [4, 4, 2, 1, 0, 0])])
def test_dsr_sampler_after_warmup_only(norm, copies):
    o = tiny_config("arm", [f"method.dsr_normalise={norm}"]).method_options
    m = build_method("arm", o, ["a", "b"], 3)
    assert m.sampler(6, 5, torch.Generator().manual_seed(0)) is None  # no statistics yet
    m.phi_table = torch.tensor([0.0, 0.3, 1.0, 1.6, 2.2, 2.4])
    assert m.sampler(6, 3, torch.Generator()) is None  # warm-up (10 epochs)
    order = m.sampler(6, 10, torch.Generator().manual_seed(0))
    assert torch.bincount(torch.tensor(order), minlength=6).tolist() == [1 + c for c in copies]
    assert len(order) == 6 + sum(copies)


def _steps(tr, epoch=0, n=2):
    tr.model.train()
    ctx = tr.ctx
    ctx.epoch = epoch
    tr.method.on_epoch_start(tr.model, ctx)
    out = []
    for i, b in enumerate(list(tr._batches(tr.bundle.train, range(16 * n), 16))):
        ctx.batch_idx = i
        out.append(tr.method.training_step(tr.model, b, ctx))
    return out


def test_two_steps_finite_and_state_round_trip():
    torch.manual_seed(0)
    tr = _trainer()
    res = _steps(tr)
    assert all(math.isfinite(float(r.loss.detach())) for r in res)
    assert {"loss_phi_mi", "loss_phi_cmi", "nmi_m1"} <= set(res[0].logs)
    tr.ctx.train_size = 32
    tr.method.on_epoch_end(tr.model, tr.ctx)
    assert tr.method.phi_table.shape == (32,)
    state = copy.deepcopy(tr.method.state_dict())
    other = build_method("arm", tr.cfg.method_options, ["m1", "m2"], 3)
    other.load_state_dict(state)
    assert torch.equal(other.phi_table, tr.method.phi_table) and other.fw_history == tr.method.fw_history
    assert "fusion.fw" in tr.model.state_dict()


def test_code_mode_weights_same_step(monkeypatch):
    """Planted estimates (info [0.6, 0.3], C[v|a] = 0.2, C[a|v] = 0.1) and a zero classifier
    (every probability 1/3): phi_a = (0.6 + 0.3 - 0.2)/3, phi_v = (0.3 + 0.6 - 0.1)/3, so the
    code's weights are FW_a = phi_v/phi_a = 8/7 and FW_v = 7/8, used in the same step."""
    torch.manual_seed(0)
    tr = _trainer(extra=["method.fw_mode=code_inverse_batch", "method.warmup_epochs=0"])
    assert tr.model.fusion.proj_est is not None
    monkeypatch.setattr(A, "information_terms", lambda *a, **k: (torch.tensor([0.6, 0.3], dtype=torch.float64),
                                                                 torch.tensor([[0.0, 0.1], [0.2, 0.0]], dtype=torch.float64)))
    with torch.no_grad():
        tr.model.fusion.classifier.weight.zero_()
        tr.model.fusion.classifier.bias.zero_()
    b = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    t = tr.method.forward_terms(tr.model, b, tr.ctx)
    assert torch.allclose(t["phi"].detach(), torch.tensor([0.7 / 3, 0.8 / 3]).expand(16, 2))
    assert torch.allclose(t["weights"].float(), torch.tensor([8 / 7, 7 / 8]))
    with torch.no_grad():  # with a live classifier, the step's logits use that step's weights
        torch.nn.init.normal_(tr.model.fusion.classifier.weight)
    t = tr.method.forward_terms(tr.model, b, tr.ctx)
    w = t["weights"].detach()
    assert float((w - 1).abs().max()) > 1e-3
    with torch.no_grad():
        f, feats = tr.model.fusion, t["features"]
        expect = f.classifier(f.proj(torch.cat([feats["m1"] * w[0], feats["m2"] * w[1]], 1)))
        plain = f.classifier(f.proj(torch.cat([feats["m1"], feats["m2"]], 1)))
        assert torch.allclose(t["logits"], expect, atol=1e-6) and not torch.allclose(t["logits"], plain, atol=1e-4)
    monkeypatch.undo()
    res = _steps(tr)
    assert all(math.isfinite(float(r.loss.detach())) for r in res)


def test_unequal_dims_refused_and_three_modalities_run():
    with pytest.raises(MethodSetupError, match="feature dimension"):
        ARMFusion({"a": 4, "b": 6}, 3)
    torch.manual_seed(0)
    tr = _trainer(bundle=tiny_bundle(3))
    res = _steps(tr)
    assert all(math.isfinite(float(r.loss.detach())) for r in res)
    assert tr.model.fusion.proj.in_features == 3 * 8


def test_default_options_and_invalid_ones_rejected():
    o = tiny_config("arm").method_options
    assert (o.dsr_normalise, o.phi_floor, o.k, o.m) == ("rank", 0.1, -2.0, None)
    for override, match in (("method.lambda1=-1", "lambda1"), ("method.lambda2=-0.5", "lambda2"),
                            ("method.phi_floor=-0.1", "phi_floor"), ("method.k=1", "k must be"),
                            ("method.m=0", "m must be"), ("method.dsr_normalise=zscore", "dsr_normalise")):
        with pytest.raises(ConfigError, match=match):
            tiny_config("arm", [override])


def test_information_terms_orientation():
    """z_a equals the fused feature, z_v is independent of it (2 bins, 8 values each):
    I = [NMI(z_a, f), NMI(z_v, f)] = [1, 0]; C[a, v] = NCMI(z_a; f | z_v) = 1 (z_v says nothing
    about f, z_a says everything) and C[v, a] = NCMI(z_v; f | z_a) = 0 (H(f | z_a) = 0). Swapping
    the modalities swaps both tables."""
    f = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]).view(4, 2)
    za = f.clone()
    zv = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).view(4, 2)
    info, cond = A.information_terms(torch.stack([za, zv]), f, nmi_bins=2, ncmi_bins=2)
    assert info.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    assert cond.flatten().tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-12)
    info2, cond2 = A.information_terms(torch.stack([zv, za]), f, nmi_bins=2, ncmi_bins=2)
    assert info2.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    assert cond2.flatten().tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0], abs=1e-12)
    # and the contributions follow: with all p = 1, phi_a = I_a + (I_v - C[v,a]) = 1, phi_v = I_v + (I_a - C[a,v]) = 0
    ones = torch.ones(1)
    phi = A.contributions(ones, torch.ones(1, 2), info.float(), cond.float(), "paper")
    assert phi.flatten().tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    phi2 = A.contributions(ones, torch.ones(1, 2), info2.float(), cond2.float(), "paper")
    assert phi2.flatten().tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_phi_floor_relative_to_batch():
    """phi = [[0.3, 0.1], [0.001, -0.001]]: phi_X = [0.2, 0]; numerators 0.2 and 0.002; the batch
    mean |phi_X| = 0.1, so the 0.1 floor is 0.01: L = (0.2/0.2 + 0.002/0.01)/2 = 0.6. Without the
    floor the second row divides by 1e-8: L = (1 + 2e5)/2."""
    phi = torch.tensor([[0.3, 0.1], [0.001, -0.001]], dtype=torch.float64)
    phi_mi = torch.zeros(2, dtype=torch.float64)
    assert A.phi_denominator(A.joint_contribution(phi), 0.1).tolist() == pytest.approx([0.2, 0.01])
    _, l_floor = A.bmml_losses(phi, phi_mi, floor=0.1)
    assert float(l_floor) == pytest.approx(0.6, rel=1e-9)
    _, l_abs = A.bmml_losses(phi, phi_mi, floor=0.0)
    assert float(l_abs) == pytest.approx((1.0 + 0.002 / 1e-8) / 2, rel=1e-6)
    # the DFF ratios use the same denominator: row 2 = [0.001, -0.001] / 0.01
    r = A.contribution_ratios(phi, floor=0.1)
    assert r.flatten().tolist() == pytest.approx([1.5, 0.5, 0.1, -0.1])
    # gradient: the floored row's denominator is a constant; an unfloored row's is not
    p = phi.clone().requires_grad_()
    _, l = A.bmml_losses(p, phi_mi, floor=0.1)
    g = torch.autograd.grad(l, p)[0]
    # row 2: d/dphi of (|a - (a+b)/2| + |b - (a+b)/2|) / 0.01 / 2 = (+-1/2 +- ...) -> [50, -50]
    assert g[1].tolist() == pytest.approx([50.0, -50.0])


def test_normalise_contributions_hand_values():
    nan = float("nan")
    phi = torch.tensor([0.1, 0.2, 0.3, nan, 0.2])
    mm = A.normalise_contributions(phi, "minmax", 2.0)
    assert mm[[0, 1, 2, 4]].tolist() == pytest.approx([0.0, 1.0, 2.0, 1.0]) and math.isnan(mm[3])
    # ranks among the 4 seen: 0, 1.5 (tie), 3, 1.5 -> 2 r / 3
    rk = A.normalise_contributions(phi, "rank", 2.0)
    assert rk[[0, 1, 2, 4]].tolist() == pytest.approx([0.0, 1.0, 2.0, 1.0]) and math.isnan(rk[3])
    assert A.resample_counts(rk, -2.0, 2.0).tolist() == [4, 2, 0, 0, 2]  # unseen: 0 copies
    assert torch.equal(A.normalise_contributions(phi, "none", 2.0)[:3], phi[:3].double())
    const = A.normalise_contributions(torch.full((3,), 0.07), "minmax", 2.0)
    assert const.tolist() == [2.0, 2.0, 2.0]  # no spread: no extra copies
    assert A.normalise_contributions(torch.tensor([0.5]), "rank", 2.0).tolist() == [2.0]
    with pytest.raises(ValueError, match="mode"):
        A.normalise_contributions(phi, "zscore", 2.0)


def test_paper_as_printed_copies_everyone_four_times():
    """The issue: estimator-scale contributions 0.03..0.16 give round(4 - 2 phi) = 4 for all."""
    phi = torch.tensor([0.03, 0.05, 0.08, 0.11, 0.16])
    assert A.resample_counts(phi, -2.0, 2.0).tolist() == [4, 4, 4, 4, 4]
    assert A.copies_histogram(A.resample_counts(phi, -2.0, 2.0), 4).tolist() == [0, 0, 0, 0, 5, 0]
    assert A.copies_histogram(torch.tensor([0, 2, 2, 7, 4]), 4).tolist() == [1, 0, 2, 0, 1, 1]  # last: > 4
    rk = A.resample_counts(A.normalise_contributions(phi, "rank", 2.0), -2.0, 2.0)
    assert rk.tolist() == [4, 3, 2, 1, 0]


def test_dsr_logs_match_rows_trained(tmp_path):
    """48 training samples, warm-up 1 epoch, rank normalisation: epoch 0 trains 48 rows; epochs 1
    and 2 train 48 + extra copies. With 48 distinct phi_X the ranks r = 0..47 give
    round(4 - 4 r / 47) = 4 (r <= 5), 3 (6..17), 2 (18..29), 1 (30..41), 0 (42..47): a histogram
    [6, 12, 12, 12, 6] and 48 + 96 = 144 rows."""
    torch.manual_seed(0)
    tr = _trainer(tmp_path, ["train.epochs=3", "method.warmup_epochs=1", "method.dsr_normalise=rank"])
    seen = {}
    orig = tr.method.compute_loss

    def spy(model, batch, ctx):
        seen[ctx.epoch] = seen.get(ctx.epoch, 0) + len(batch)
        return orig(model, batch, ctx)

    tr.method.compute_loss = spy
    tr.fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if l]
    assert [rows[0][f"dsr_copies_{j}"] for j in range(5)] == [48, 0, 0, 0, 0] and rows[0]["effective_samples"] == 48
    assert seen[0] == 48
    for e in (1, 2):
        assert [rows[e][f"dsr_copies_{j}"] for j in range(5)] == [6, 12, 12, 12, 6]
        assert rows[e]["dsr_copies_more"] == 0 and rows[e]["effective_samples"] == 144 and seen[e] == 144
    assert all(0.0 <= r["phi_floored"] <= 1.0 for r in rows)


def test_state_dict_loads_with_weights_only():
    torch.manual_seed(0)
    tr = _trainer()
    _steps(tr, n=1)  # 16 of the 48 training rows: the others are NaN (not seen)
    tr.ctx.train_size = 48
    tr.method.on_epoch_end(tr.model, tr.ctx)
    state = tr.method.state_dict()
    assert int(torch.isnan(state["phi_table"]).sum()) == 32
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = build_method("arm", tr.cfg.method_options, ["m1", "m2"], 3)
    other.load_state_dict(loaded)
    assert torch.allclose(other.phi_table, state["phi_table"], equal_nan=True)
    assert other.fw_history == state["fw_history"]
    counts = other.dsr_counts()  # unseen rows get no copies; the 16 seen ones spread over 0..4
    assert int(counts[torch.isnan(state["phi_table"])].sum()) == 0 and int(counts.max()) == 4

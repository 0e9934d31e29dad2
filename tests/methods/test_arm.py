"""arm: histogram NMI/NCMI, contributions and re-sample counts on planted cases, the exact min,
DFF timing, the code mode, steps and checkpoints."""
import copy
import math

import pytest
import torch

from mmbalance.errors import MethodSetupError
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
    r = A.contribution_ratios(phi)
    assert torch.allclose(r, phi / phi_x.unsqueeze(1)) and torch.allclose(r.sum(1), torch.full((2,), 2.0))
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


def test_dsr_sampler_after_warmup_only():
    m = build_method("arm", None, ["a", "b"], 3)
    assert m.sampler(6, 5, torch.Generator().manual_seed(0)) is None  # no statistics yet
    m.phi_table = torch.tensor([0.0, 0.3, 1.0, 1.6, 2.2, 2.4])
    assert m.sampler(6, 3, torch.Generator()) is None  # warm-up (10 epochs)
    order = m.sampler(6, 10, torch.Generator().manual_seed(0))
    assert sorted(order) == sorted([0] * 5 + [1] * 4 + [2] * 3 + [3] * 2 + [4, 5])


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


def test_code_mode_weights_same_step():
    torch.manual_seed(0)
    tr = _trainer(extra=["method.fw_mode=code_inverse_batch", "method.warmup_epochs=0"])
    assert tr.model.fusion.proj_est is not None
    b = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    t = tr.method.forward_terms(tr.model, b, tr.ctx)
    expect = A.inverse_ratio_weights(t["phi"].detach().mean(0))
    assert torch.allclose(t["weights"], expect)
    with torch.no_grad():
        assert torch.allclose(t["logits"], tr.model.fusion(t["features"], expect))
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

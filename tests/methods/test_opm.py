"""OPM and OPM+OGM (Wei et al., TPAMI 2024): drop probabilities, feature drop, wiring, state."""
import math

import pytest
import torch
from utils import (
    assert_same_step,
    batch_of,
    one_step_params,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.functional.opm import (
    opm_apply_drop,
    opm_discrepancy,
    opm_drop_probabilities,
    opm_masks,
    opm_theta,
)
from mmbalance.training.trainer import Trainer

ACTIVE = ["method.warmup_epochs=0"]


# ------------------------------------------------------------------------------ hand case (spec §4.7)
def test_drop_probabilities_hand_case():
    s = torch.tensor([40.0, 20.0])
    r = opm_discrepancy(s)
    assert r.tolist() == pytest.approx([0.761594, 0.0], abs=1e-6)  # tanh(40/20 - 1) = tanh(1)
    q = opm_drop_probabilities(s, q_base=0.5, lam=0.5)
    assert q.tolist() == pytest.approx([0.690399, 0.0], abs=1e-6)  # 0.5 * (1 + 0.5 * 0.761594)
    theta = opm_theta([512, 512], q)
    assert float(theta) == pytest.approx(0.345199, abs=1e-6)
    assert 1 / (1 - float(theta)) == pytest.approx(1.527182, abs=1e-6)
    # clip at 1: q_base 0.9, lam 1 -> 0.9 * 1.761594 > 1
    assert opm_drop_probabilities(s, 0.9, 1.0).tolist() == pytest.approx([1.0, 0.0])
    # equal scores: nobody is dropped
    assert opm_drop_probabilities(torch.tensor([3.0, 3.0]), 0.5, 0.5).tolist() == [0.0, 0.0]


def test_apply_drop_hand_case_global_rescale():
    q = torch.tensor([0.690399, 0.0])
    za = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    zv = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    masks = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # a dropped for sample 0
    out, keep = opm_apply_drop({"a": za, "v": zv}, masks, q)  # d = [2, 2]: theta = 0.345199
    c = 1.527182
    assert torch.allclose(out["a"], torch.tensor([[0.0, 0.0], [3 * c, 4 * c]]), atol=1e-5)
    assert torch.allclose(out["v"], torch.tensor([[5 * c, 6 * c], [7 * c, 8 * c]]), atol=1e-5)
    assert keep.tolist() == [True, True]
    _, keep = opm_apply_drop({"a": za, "v": zv}, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), q)
    assert keep.tolist() == [False, True]


def test_apply_drop_per_modality_and_unequal_dims():
    q = torch.tensor([0.5, 0.2, 0.0])
    z = {"a": torch.ones(1, 1), "b": torch.ones(1, 3), "c": torch.ones(1, 4)}
    # theta = (1*0.5 + 3*0.2 + 0) / 8 = 0.1375 -> 1 / 0.8625
    assert float(opm_theta([1, 3, 4], q)) == pytest.approx(0.1375)
    out, _ = opm_apply_drop(z, torch.ones(3, 1), q)
    assert torch.allclose(out["c"], torch.full((1, 4), 1 / 0.8625))
    out, _ = opm_apply_drop(z, torch.ones(3, 1), q, rescale="per_modality")
    assert out["a"].item() == pytest.approx(2.0) and out["b"][0, 0].item() == pytest.approx(1.25)
    assert out["c"][0, 0].item() == pytest.approx(1.0)
    # q = 1 is dropped without a division by zero
    out, keep = opm_apply_drop({"a": torch.ones(1, 2), "b": torch.ones(1, 2)}, torch.tensor([[0.0], [1.0]]),
                               torch.tensor([1.0, 0.0]), rescale="per_modality")
    assert out["a"].tolist() == [[0.0, 0.0]] and out["b"].tolist() == [[1.0, 1.0]] and keep.tolist() == [True]


def test_three_modality_discrepancy_and_mask_rate():
    s = torch.tensor([3.0, 3.0, 1.0])  # others' mean: 2, 2, 3
    assert opm_discrepancy(s).tolist() == pytest.approx([math.tanh(0.5), math.tanh(0.5), 0.0])
    masks = opm_masks(torch.tensor([0.3, 0.0]), 20000, torch.Generator().manual_seed(0))
    assert masks[1].eq(1).all() and abs(float(masks[0].mean()) - 0.7) < 0.02


# --------------------------------------------------------------------------------------- wiring
def _trainer(name="opm", overrides=(), mods=2):
    return Trainer(tiny_config(name, ["train.epochs=1"] + ACTIVE + list(overrides)), None, quiet=True,
                   bundle=tiny_bundle(mods))


def _concat_trainer(name="opm", overrides=()):
    tr = _trainer(name, ["model.fusion=concat", "method.p_exe=1"] + list(overrides))
    assert type(tr.model.fusion).__name__ == "ConcatFusion"
    return tr


def test_loss_uses_fixed_masks_rescaled_and_removes_rows():
    tr = _concat_trainer()
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=4)
    fixed = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    method.draw_masks = lambda q, b, g: fixed
    with torch.no_grad():
        feats = model.encode(batch.inputs)
        s = method.scores(model, feats, batch.labels)
        q = opm_drop_probabilities(s, 0.5, 0.5)
        res = method.compute_loss(model, batch, ctx)
    assert torch.equal(res.labels, batch.labels[[1, 2, 3]])  # sample 0 lost both modalities
    theta = float((q * 8).sum() / 16)  # feature_dim 8 for both
    c = 1 / (1 - theta)
    m1, m2 = model.modalities
    z1 = feats[m1][[1, 2, 3]] * torch.tensor([1.0, 0.0, 1.0])[:, None] * c
    z2 = feats[m2][[1, 2, 3]] * c
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    expected = torch.cat([z1, z2], 1) @ w.t() + b
    assert torch.allclose(res.output.logits, expected, atol=1e-5)
    assert torch.allclose(res.loss, torch.nn.functional.cross_entropy(expected, batch.labels[[1, 2, 3]]), atol=1e-6)
    # the dominant modality alone has q > 0, logged under its own name
    assert (q > 0).sum() == 1 and float(res.logs["kept_fraction"]) == pytest.approx(0.75)
    strong = int(torch.argmax(s))
    assert float(res.logs[f"drop_prob_{model.modalities[strong]}"]) > 0
    assert float(res.logs[f"drop_prob_{model.modalities[1 - strong]}"]) == 0
    assert float(res.logs[f"ratio_{model.modalities[strong]}"]) == pytest.approx(float(s[strong] / s[1 - strong]))


def test_no_row_kept_skips_the_step():
    tr = _concat_trainer()
    tr.method.draw_masks = lambda q, b, g: torch.zeros(2, b)
    before = [p.detach().clone() for p in tr.model.parameters()]
    batch = batch_of(tr.bundle, n=4)
    tr.method.training_step(tr.model, batch, tr.ctx)
    assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))


def test_warmup_and_p_exe_zero_are_joint():
    assert_same_step("opm", [], base="joint")  # default warm-up: 6 joint epochs
    assert_same_step("opm", ["method.warmup_epochs=0", "method.p_exe=0"], base="joint")
    assert_same_step("opm", ["method.warmup_epochs=0", "method.q_base=0"], base="joint")
    assert_same_step("opm_ogm", ["method.warmup_epochs=0", "method.p_exe=0", "method.alpha=0", "method.ge=false"],
                     base="joint")
    assert_same_step("opm_ogm", ["method.warmup_epochs=0", "method.p_exe=0", "method.end_epoch=-1",
                                 "method.start_epoch=-1"], base="joint", epoch=0)


def test_active_drop_changes_the_step():
    a = one_step_params("opm", ACTIVE + ["method.p_exe=1", "method.q_base=0.9"])
    b = one_step_params("joint")
    assert any(not torch.allclose(a[n], b[n], atol=1e-6) for n in b)


def test_opm_ogm_scales_only_the_dominant_encoder():
    # OPM off (p_exe = 0), OGM on without noise: the step equals OGM's with the same alpha
    a = one_step_params("opm_ogm", ACTIVE + ["method.p_exe=0", "method.alpha=0.7", "method.ge=false"])
    b = one_step_params("ogm", ["method.alpha=0.7"])
    for n in b:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    a = one_step_params("opm_ogm", ACTIVE + ["method.p_exe=0", "method.alpha=0.7", "method.ge=true"])
    b = one_step_params("ogm_ge", ["method.alpha=0.7"])
    for n in b:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


def test_opm_ogm_coefficients_logged_and_ogm_off_in_warmup():
    tr = _trainer("opm_ogm", ["method.warmup_epochs=1", "method.ge=false", "method.alpha=2"])
    batch = batch_of(tr.bundle, n=16)
    res = tr.method.training_step(tr.model, batch, tr.ctx)  # epoch 0: warm-up
    assert not any(k.startswith("coeff_") for k in res.logs)
    tr.ctx.epoch = 1
    res = tr.method.training_step(tr.model, batch, tr.ctx)
    k = torch.stack([torch.as_tensor(res.logs[f"coeff_{m}"]) for m in tr.model.modalities])
    assert (k == 1).sum() >= 1 and bool((k <= 1).all())
    assert all(f"drop_prob_{m}" in res.logs and f"ratio_{m}" in res.logs for m in tr.model.modalities)


def test_state_round_trip():
    state_round_trip_reproduces_next_step("opm", ACTIVE + ["method.p_exe=1"])
    state_round_trip_reproduces_next_step("opm_ogm", ACTIVE + ["method.p_exe=1"])


@pytest.mark.parametrize("name", ["opm", "opm_ogm"])
def test_three_modalities_fit(name):
    tr = _trainer(name, ["method.p_exe=1"], mods=3)
    res = tr.fit()
    assert res["test"]["accuracy"] >= 0


def test_bad_options():
    for bad in ["method.q_base=1.5", "method.lam=-1", "method.p_exe=2", "method.rescale=x"]:
        with pytest.raises(ConfigError):
            tiny_config("opm", [bad])
    with pytest.raises(ConfigError, match="alpha"):
        tiny_config("opm_ogm", ["method.alpha=-1"])


def test_defaults_follow_the_code():
    o = resolve_config("synthetic", "opm", None, []).method_options
    assert (o.q_base, o.lam, o.p_exe, o.warmup_epochs, o.rescale) == (0.5, 0.5, 0.7, 6, "global")
    o = resolve_config("synthetic", "opm_ogm", None, []).method_options
    assert (o.alpha, o.start_epoch, o.end_epoch, o.ge) == (1.0, 0, 80, True)


@pytest.mark.parametrize("name", ["opm", "opm_ogm"])
def test_cli_end_to_end(name, tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", name, "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                 "method.warmup_epochs=0"]) == 0

"""MLB (Kontras et al., BMVC 2024): coefficients, gradient scaling wiring, state, M=3, no-op, CLI."""
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
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.functional.mlb import mlb_coefficients, mlb_ratios
from mmbalance.training.trainer import Trainer


def test_coefficients_hand_case():
    # spec §4.17: s_a = 0.6, s_v = 0.3, alpha = 0.8 -> r_a = 0.5, r_v = 2
    s = torch.tensor([0.6, 0.3])
    assert torch.allclose(mlb_ratios(s), torch.tensor([0.5, 2.0]))
    k = mlb_coefficients(s, 0.8)
    assert torch.allclose(k, torch.tensor([0.620051, 1.664037]), atol=1e-6)
    k2 = mlb_coefficients(s, 0.8, tanh_mode=2, beta=1.5)
    assert torch.allclose(k2, torch.tensor([0.620051, 1.332018]), atol=1e-6)  # damping unchanged


def test_coefficients_three_modalities_and_alpha_zero():
    # r_1 = mean(0.4, 0.2) / 0.6 = 0.5; r_2 = 0.4 / 0.4 = 1; r_3 = 0.5 / 0.2 = 2.5
    s = torch.tensor([0.6, 0.4, 0.2])
    assert torch.allclose(mlb_ratios(s), torch.tensor([0.5, 1.0, 2.5]))
    k = mlb_coefficients(s, 1.0)
    assert torch.allclose(k, torch.tensor([1 + math.tanh(-0.5), 1.0, 1 + math.tanh(1.5)]), atol=1e-6)
    assert torch.equal(mlb_coefficients(s, 0.0), torch.ones(3))


def _trainer(overrides=(), mods=2):
    return Trainer(tiny_config("mlb", ["train.epochs=1"] + list(overrides)), None, quiet=True,
                   bundle=tiny_bundle(mods))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_after_backward_scales_encoder_head_and_fusion_block_by_k():
    tr = _trainer()
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    batch = batch_of(tr.bundle, n=16)
    res = method.compute_loss(model, batch, ctx)
    # the loss is fused CE + the sum of the heads' CEs (weights 1)
    out = res.output
    expect = F.cross_entropy(out.logits, batch.labels) + sum(
        F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in ("m1", "m2"))
    assert torch.allclose(res.loss, expect)
    model.zero_grad(set_to_none=True)
    res.loss.backward()
    before = _grads(model)
    method.after_backward(model, batch, res, ctx)
    after = _grads(model)
    # coefficients by hand from the heads' true-class probabilities
    s = {m: float(out.unimodal_logits[m].detach().softmax(1)[torch.arange(16), batch.labels].mean()) for m in ("m1", "m2")}
    k = {"m1": 1 + math.tanh(0.8 * (s["m2"] / s["m1"] - 1)), "m2": 1 + math.tanh(0.8 * (s["m1"] / s["m2"] - 1))}
    assert float(res.logs["coeff_m1"]) == pytest.approx(k["m1"], rel=1e-5)
    assert float(res.logs["ratio_m2"]) == pytest.approx(s["m1"] / s["m2"], rel=1e-5)
    assert abs(k["m1"] - 1) > 1e-3  # the test is not vacuous
    d1 = model.feature_dims["m1"]
    for n, g in before.items():
        if n.startswith(("encoders.m1.", "heads.m1.")):
            assert torch.allclose(after[n], g * k["m1"], atol=1e-7), n
        elif n.startswith(("encoders.m2.", "heads.m2.")):
            assert torch.allclose(after[n], g * k["m2"], atol=1e-7), n
        elif n == "fusion.fc.weight":
            assert torch.allclose(after[n][:, :d1], g[:, :d1] * k["m1"], atol=1e-7)
            assert torch.allclose(after[n][:, d1:], g[:, d1:] * k["m2"], atol=1e-7)
        else:  # the shared bias
            assert n == "fusion.fc.bias"
            assert torch.equal(after[n], g)


def test_weak_modality_is_boosted():
    tr = _trainer()
    batch = batch_of(tr.bundle, n=16)
    # planted head logits: m1 confident and right, m2 uniform -> m2 is weak (k > 1), m1 damped
    heads = {"m1": F.one_hot(batch.labels, 3).float() * 5.0, "m2": torch.zeros(16, 3)}
    k, r = tr.method.coefficients(heads, batch.labels)
    assert float(k[0]) < 1 < float(k[1])
    assert float(r[1]) > 1 > float(r[0])


def test_state_round_trip():
    state_round_trip_reproduces_next_step("mlb", [])


def test_three_modalities_train(tmp_path):
    tr = Trainer(tiny_config("mlb", ["train.epochs=1"]), tmp_path, quiet=True, bundle=tiny_bundle(3))
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])
    row = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert '"coeff_m3"' in row and '"ratio_m3"' in row


def test_noop_is_multiloss():
    assert_same_step("mlb", ["method.alpha=0"], base="multiloss")
    assert_same_step("mlb", ["method.start_epoch=3", "method.end_epoch=5"], base="multiloss")


def test_active_differs_from_multiloss():
    with pytest.raises(AssertionError):
        assert_same_step("mlb", [], base="multiloss", atol=1e-9)


def test_options_validated_and_fusion_refused():
    for bad in ("method.alpha=-1", "method.tanh_mode=3", "method.beta=0.5", "method.unimodal_weight=-1",
                "method.params=x", "method.start_epoch=4"):
        extra = ["method.end_epoch=2"] if bad == "method.start_epoch=4" else []
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "mlb", None, [bad] + extra)
    with pytest.raises(MethodSetupError, match="concat"):
        _trainer(["model.fusion=sum"])
    tr = _trainer(["model.fusion=sum", "method.head_blocks=false"])
    assert tr.model.heads is not None


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "mlb", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


def test_tanh_mode_two_caps_the_boost_in_the_method():
    tr = _trainer(["method.tanh_mode=2", "method.beta=1.5"])
    batch = batch_of(tr.bundle, n=16)
    heads = {"m1": F.one_hot(batch.labels, 3).float() * 5.0, "m2": torch.zeros(16, 3)}
    k, _r = tr.method.coefficients(heads, batch.labels)
    s1 = float(torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[0])
    s2 = 1 / 3
    assert float(k[1]) == pytest.approx(1 + 0.5 * math.tanh(0.8 * (s1 / s2 - 1)), rel=1e-5)
    assert float(k[0]) == pytest.approx(1 + math.tanh(0.8 * (s2 / s1 - 1)), rel=1e-5)
    assert float(k[1]) <= 1.5

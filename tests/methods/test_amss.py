"""AMSS / AMSS+ (Yang et al., TPAMI 2025): coefficients, filter masks, wiring, state."""
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
from mmbalance.errors import ConfigError
from mmbalance.functional.amss import (
    amss_coefficients,
    amss_feature_entropy,
    amss_label_entropy_term,
    filter_importance,
    filter_mask,
    num_kept,
    select_filters,
)
from mmbalance.methods.amss import masked_parameters
from mmbalance.models.encoders import ResNet18Encoder
from mmbalance.training.trainer import Trainer


# ------------------------------------------------------------------------------ hand case (spec §4.23)
def test_coefficients_hand_case():
    c, rho = amss_coefficients(torch.tensor([-0.5, -1.5]), 1.79, torch.tensor([6.0, 6.0]), temperature=0.2)
    assert rho.tolist() == pytest.approx([0.298333, 0.131667], abs=1e-6)  # (s + 1.79 + 0.5) / 6
    assert c.tolist() == pytest.approx([0.302941, 0.697059], abs=1e-6)  # e^{t_v} / (e^{t_a} + e^{t_v}), ...
    # the stronger modality (larger rho) keeps fewer filters; clamp to [0.1, 0.9]
    c, _ = amss_coefficients(torch.tensor([-0.1, -2.2]), 1.79, torch.tensor([1.0, 1.0]), temperature=0.2)
    assert c.tolist() == pytest.approx([0.1, 0.9])
    # fallback: some s + H_Y + 0.5 <= 0
    c, rho = amss_coefficients(torch.tensor([-0.5, -3.0]), 1.79, torch.tensor([6.0, 6.0]))
    assert c.tolist() == [0.5, 0.5] and rho.tolist() == [1.0, 1.0]


def test_three_modality_coefficients_sum_to_one():
    # rho = s + 1.79 + 0.5 = [0.2, 0.1, 0.01], t = rho / 0.2 = [1, 0.5, 0.05]
    c, _ = amss_coefficients(torch.tensor([-2.09, -2.19, -2.28]), 1.79, torch.ones(3), 0.2, 0.0, 1.0)
    e = [math.exp(1.0), math.exp(0.5), math.exp(0.05)]
    z = sum(e)
    assert c.tolist() == pytest.approx([(z - x) / (2 * z) for x in e], abs=1e-5)
    assert float(c.sum()) == pytest.approx(1.0, abs=1e-6)


def test_code_entropy_terms_hand_case():
    # labels [0, 0, 1] -> pi = [2/3, 1/3]: -(2/3 log s0 + 1/3 log s1), s = softmax([2/3, 1/3])
    s1 = 1 / (1 + math.exp(1 / 3))
    s0 = 1 - s1
    hy = -(2 / 3 * math.log(s0) + 1 / 3 * math.log(s1))
    assert float(amss_label_entropy_term(torch.tensor([2.0, 1.0, 0.0, 0.0]))) == pytest.approx(hy, abs=1e-6)
    # classes above the largest label present are not counted (bincount without minlength)
    assert float(amss_label_entropy_term(torch.tensor([2.0, 1.0]))) == pytest.approx(hy, abs=1e-6)
    # a feature row [0, 0] -> entropy log 2; [log 3, 0] -> p = [3/4, 1/4]
    h = amss_feature_entropy(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]), "none")
    assert h.tolist() == pytest.approx([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))], abs=1e-6)


def test_filter_mask_hand_case():
    g = torch.zeros(4, 2, 3, 3)
    for f, v in enumerate([1.0, 2.0, 3.0, 4.0]):
        g[f] = v
    imp = filter_importance(g)
    assert imp.tolist() == pytest.approx([18.0, 72.0, 162.0, 288.0])  # 18 v^2
    n = num_kept(4, 0.5)
    assert n == 2 and num_kept(4, 0.3) == 2 and num_kept(4, 0.25) == 1  # ceil
    for seed in range(5):
        sel = select_filters(imp, n, "adaptive", torch.Generator().manual_seed(seed))
        mask = filter_mask(imp, sel)
        assert int((mask != 0).sum()) == 2 and set(mask.tolist()) <= {0.0, 1.0}
    assert sorted(select_filters(imp, 2, "topk").tolist()) == [2, 3]
    # AMSS+: pi_f = 0.4, C = 4 -> 1 / (0.4 + 0.25)
    imp = torch.tensor([0.1, 0.4, 0.2, 0.3])
    mask = filter_mask(imp, torch.tensor([1]), plus=True)
    assert mask.tolist() == pytest.approx([0.0, 1.538462, 0.0, 0.0], abs=1e-6)


def test_adaptive_sampling_prefers_important_filters_and_survives_zero_grads():
    imp = torch.tensor([100.0, 1.0, 1.0, 1.0])
    hits = sum(0 in select_filters(imp, 1, "adaptive", torch.Generator().manual_seed(s)).tolist() for s in range(200))
    assert hits > 170  # p = 100 / 103
    sel = select_filters(torch.tensor([0.0, 0.0, 5.0, 0.0]), 3, "adaptive", torch.Generator().manual_seed(0))
    assert sel.tolist() == [2]


def test_code_parameter_rule_on_resnet():
    names = [n for n, _ in masked_parameters(ResNet18Encoder(1), "code")]
    assert names and all("layer" in n and "conv" in n for n in names)
    assert not any("downsample" in n for n in names)
    all_conv = [n for n, _ in masked_parameters(ResNet18Encoder(1), "conv")]
    assert len(all_conv) > len(names)  # the stem and the downsample convs are left alone


# --------------------------------------------------------------------------------------- wiring
def _trainer(name="amss", overrides=(), mods=2):
    return Trainer(tiny_config(name, ["train.epochs=1", "model.fusion=concat"] + list(overrides)), None,
                   quiet=True, bundle=tiny_bundle(mods))


def _masked_grads(name, overrides=()):
    tr = _trainer(name, overrides)
    batch = batch_of(tr.bundle, n=16)
    out = tr.model(batch.inputs)
    loss = torch.nn.functional.cross_entropy(out.logits, batch.labels)
    tr.optimizer.zero_grad()
    loss.backward()
    raw = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    from mmbalance.methods.base import LossOutput
    res = LossOutput(loss, out)
    tr.method.after_backward(tr.model, batch, res, tr.ctx)
    return tr, raw, res


def test_after_backward_masks_the_right_number_of_rows_per_modality():
    tr, raw, res = _masked_grads("amss")
    for m in tr.model.modalities:
        c = float(res.logs[f"coeff_{m}"])
        for n, p in masked_parameters(tr.model.encoders[m], "auto"):
            full = f"encoders.{m}.{n}"
            kept = (p.grad.reshape(p.shape[0], -1).abs().sum(1) != 0)
            nonzero_before = (raw[full].reshape(p.shape[0], -1).abs().sum(1) != 0)
            assert int(kept.sum()) == min(math.ceil(p.shape[0] * c - 1e-9), int(nonzero_before.sum())), full
            # kept rows are untouched (AMSS), dropped rows are zero
            assert torch.equal(p.grad[kept], raw[full][kept])
    # the fusion head is not masked (the code's effective behaviour)
    assert torch.equal(tr.model.fusion.fc.weight.grad, raw["fusion.fc.weight"])
    # coefficients match the functional computation on this batch
    batch = batch_of(tr.bundle, n=16)
    with torch.no_grad():
        feats = tr.model.encode(batch.inputs)
        lg = tr.model.modality_logits(feats)
        mods = tr.model.modalities
        s = torch.stack([-torch.nn.functional.cross_entropy(lg[m], batch.labels) for m in mods])
        h = torch.stack([amss_feature_entropy(feats[m]) for m in mods])
        hy = amss_label_entropy_term(torch.bincount(batch.labels).float())
        c, rho = amss_coefficients(s, hy, h)
    assert torch.allclose(torch.stack([torch.as_tensor(res.logs[f"coeff_{m}"]) for m in mods]), c, atol=1e-6)
    assert torch.allclose(torch.stack([torch.as_tensor(res.logs[f"ratio_{m}"]) for m in mods]), rho, atol=1e-6)


def test_amss_plus_scales_kept_rows_by_importance():
    tr, raw, res = _masked_grads("amss_plus")
    m = tr.model.modalities[0]
    n, p = masked_parameters(tr.model.encoders[m], "auto")[0]
    g0 = raw[f"encoders.{m}.{n}"]
    imp = (g0 ** 2).reshape(g0.shape[0], -1).sum(1)
    pi = imp / imp.sum()
    kept = p.grad.reshape(p.shape[0], -1).abs().sum(1) != 0
    scale = 1 / (pi + 1 / p.shape[0])
    assert torch.allclose(p.grad[kept], g0[kept] * scale[kept].view(-1, 1), atol=1e-6)


def test_mask_head_option_masks_head_blocks():
    tr, raw, res = _masked_grads("amss", ["method.mask_head=true"])
    g, g0 = tr.model.fusion.fc.weight.grad, raw["fusion.fc.weight"]
    assert torch.equal(tr.model.fusion.fc.bias.grad, raw["fusion.fc.bias"])
    start = 0
    for m in tr.model.modalities:
        d = tr.model.feature_dims[m]
        block, block0 = g[:, start:start + d], g0[:, start:start + d]
        n = int(d * float(res.logs[f"coeff_{m}"]))
        for k in range(block.shape[0]):
            assert int((block[k] != 0).sum()) == min(n, int((block0[k] != 0).sum()))
        start += d


def test_noop_is_joint():
    assert_same_step("amss", ["method.coeff_min=1", "method.coeff_max=1"], base="joint")
    assert_same_step("amss", ["method.coeff_min=1", "method.coeff_max=1", "method.sample_mode=topk"], base="joint")


def test_active_masks_change_the_step():
    a = one_step_params("amss")
    b = one_step_params("joint")
    assert any(not torch.allclose(a[n], b[n], atol=1e-6) for n in b if n.startswith("encoders."))
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in b if n.startswith("fusion."))


@pytest.mark.parametrize("name", ["amss", "amss_plus"])
def test_state_round_trip(name):
    state_round_trip_reproduces_next_step(name, [])


@pytest.mark.parametrize("name", ["amss", "amss_plus"])
def test_three_modalities_fit(name):
    res = _trainer(name, [], mods=3).fit()
    assert res["test"]["accuracy"] >= 0


def test_bad_options():
    for bad in ["method.temperature=0", "method.sample_mode=x", "method.gn_mode=x", "method.params=x",
                "method.coeff_min=0.95", "method.coeff_max=1.5", "method.coeff_min=-0.1"]:
        with pytest.raises(ConfigError):
            tiny_config("amss", [bad])


@pytest.mark.parametrize("name", ["amss", "amss_plus"])
def test_cli_end_to_end(name, tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", name, "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

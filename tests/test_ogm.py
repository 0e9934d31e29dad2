import math

import pytest
import torch

from mmbalance.functional.ogm import (discrepancy_ratios, modulate_gradient, ogm_coefficients,
                                      ogm_coefficients_from_scores)
from mmbalance.methods.gradients import modulated_parameters
from mmbalance.methods.ogm import OGMOptions


def reference_ogm(out_a, out_v, label, alpha):
    """The GeWu-Lab OGM-GE main.py computation, written as a plain loop."""
    sm = torch.nn.Softmax(dim=1)
    score_v = sum(sm(out_v)[i][label[i]] for i in range(out_v.size(0)))
    score_a = sum(sm(out_a)[i][label[i]] for i in range(out_a.size(0)))
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * float(torch.relu(ratio_v)))
    return 1 - math.tanh(alpha * float(torch.relu(ratio_a))), 1.0


def test_coefficients_hand_case():
    # score_a = 1.5, score_v = 0.5 -> rho_a = 3 -> k_a = 1 - tanh(0.3), k_v = 1
    k = ogm_coefficients_from_scores({"a": 1.5, "v": 0.5}, alpha=0.1)
    assert k["a"] == pytest.approx(1 - math.tanh(0.3))
    assert k["v"] == 1.0
    assert discrepancy_ratios({"a": 1.5, "v": 0.5}) == pytest.approx({"a": 3.0, "v": 1 / 3})


def test_coefficients_from_logits_hand_case():
    # two samples; softmax of [ln 3, 0] = [0.75, 0.25]
    la = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    lv = torch.zeros(2, 2)  # 0.5 each
    y = torch.tensor([0, 0])
    k = ogm_coefficients({"a": la, "v": lv}, y, alpha=1.0)  # score_a 1.5, score_v 1.0, rho_a 1.5
    assert k["a"] == pytest.approx(1 - math.tanh(1.5))
    assert k["v"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_coefficients_match_reference_code(seed):
    g = torch.Generator().manual_seed(seed)
    la, lv = torch.randn(8, 4, generator=g) * 2, torch.randn(8, 4, generator=g) * 2
    y = torch.randint(0, 4, (8,), generator=g)
    ka, kv = reference_ogm(la, lv, y, 0.5)
    k = ogm_coefficients({"a": la, "v": lv}, y, 0.5)
    assert k["a"] == pytest.approx(ka) and k["v"] == pytest.approx(kv)


def test_modulate_gradient_scale_and_noise():
    g = torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert torch.equal(modulate_gradient(g, 0.5, noise=False), g * 0.5)
    gen = torch.Generator().manual_seed(0)
    noisy = modulate_gradient(g, 0.5, noise=True, generator=gen)
    gen = torch.Generator().manual_seed(0)
    expected = g * 0.5 + torch.randn(4, generator=gen) * (float(g.std()) + 1e-8)
    assert torch.allclose(noisy, expected)


def test_parameter_rule():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert [p.dim() for p in modulated_parameters(conv, "auto")] == [4]
    assert [p.dim() for p in modulated_parameters(mlp, "auto")] == [2, 2]
    assert modulated_parameters(mlp, "conv") == []
    assert len(modulated_parameters(conv, "all")) == 6
    assert OGMOptions(params="bogus").validate()


def _setup(noise_name, epoch, start=0, end=50):
    from utils import tiny_bundle, tiny_config
    from mmbalance.training.trainer import Trainer
    cfg = tiny_config(noise_name, [f"method.start_epoch={start}", f"method.end_epoch={end}", "method.alpha=1.0"])
    tr = Trainer(cfg, None, quiet=True, bundle=tiny_bundle(2))
    tr.ctx.epoch = epoch
    return tr


@pytest.mark.parametrize("epoch,active", [(0, False), (1, True), (3, True), (4, False)])
def test_ogm_scales_dominant_encoder_within_window(epoch, active):
    from utils import batch_of
    tr = _setup("ogm", epoch, start=1, end=3)
    model, method = tr.model, tr.method
    batch = batch_of(tr.bundle)
    res = method.compute_loss(model, batch, tr.ctx)
    res.loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    feats = {m: z.detach() for m, z in res.output.features.items()}
    k = ogm_coefficients(model.modality_logits(feats), batch.labels, 1.0)
    method.after_backward(model, batch, res, tr.ctx)
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        m = n.split(".")[1] if n.startswith("encoders.") else None
        expect = raw[n] * (k[m] if (active and m is not None and p.dim() >= 2) else 1.0)
        assert torch.allclose(p.grad, expect), n
    if active:
        assert min(k.values()) < 1.0


# ------------------------------------------------------------------------------ presets (alpha)
@pytest.mark.parametrize("dataset,alpha", [("cremad", 0.8), ("vggsound", 0.1), ("kinetics_sounds", 0.8),
                                           ("ave", 0.6), ("ucf101", 0.8), ("synthetic", 0.1)])
def test_alpha_presets_resolve(dataset, alpha):
    from mmbalance.config import resolve_config
    for name in ("ogm_ge", "ogm"):
        assert resolve_config(dataset, name).method_options.alpha == pytest.approx(alpha)
    # an explicit value wins over the preset
    assert resolve_config(dataset, "ogm_ge", overrides=["method.alpha=0.3"]).method_options.alpha == 0.3


# -------------------------------------------------------------------------- coefficient tensor
def test_coefficient_tensor_hand_cases():
    from mmbalance.functional.ogm import ogm_coefficient_tensor
    # score_a = 1.5, score_v = 0.5 -> rho_a = 3 -> k_a = 1 - tanh(0.3), k_v = 1
    k = ogm_coefficient_tensor(torch.tensor([1.5, 0.5]), alpha=0.1)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.3), 1.0])
    # three modalities: rho = [4 / 1.5, 2 / 2.5, 1 / 3] -> only the first is damped
    k3 = ogm_coefficient_tensor(torch.tensor([4.0, 2.0, 1.0]), alpha=0.5)
    assert k3.tolist() == pytest.approx([1 - math.tanh(0.5 * 4 / 1.5), 1.0, 1.0])
    # the other score 0: rho = inf -> k = 1 - tanh(inf) = 0 (as the float form)
    assert ogm_coefficient_tensor(torch.tensor([1.0, 0.0]), alpha=0.1).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="two"):
        ogm_coefficient_tensor(torch.tensor([1.0]), alpha=0.1)


# ------------------------------------------------------------------------------------ GE noise
def test_ge_noise_hand_value():
    from mmbalance.functional.ogm import ge_generator, ge_seed
    # ge_seed(7, 3) = 7 * 1_000_003 + 3 * 7919 + 101 = 7_023_879
    assert ge_seed(7, 3) == 7_023_879
    g = torch.tensor([1.0, -2.0, 3.0, 0.0])  # mean 0.5, squared deviations 13, sample std sqrt(13/3)
    out = modulate_gradient(g, 0.0, noise=True, generator=ge_generator(7, 3))  # k = 0: the noise alone
    z = torch.randn(4, generator=torch.Generator().manual_seed(7_023_879))
    assert torch.allclose(out, z * (math.sqrt(13 / 3) + 1e-8), atol=1e-6)
    # a tensor coefficient: grad * k + the same noise
    out2 = modulate_gradient(g, torch.tensor(0.5), noise=True, generator=ge_generator(7, 3))
    assert torch.allclose(out2, 0.5 * g + z * (math.sqrt(13 / 3) + 1e-8), atol=1e-6)
    # a one-element gradient: noise std 1e-8 (no NaN)
    one = modulate_gradient(torch.tensor([2.0]), 1.0, noise=True, generator=ge_generator(7, 3))
    assert torch.isfinite(one).all() and abs(float(one) - 2.0) < 1e-6


def _ge_grads(tr, batch, res, raw, seed, step):
    tr.ctx.seed, tr.ctx.global_step = seed, step
    for n, p in tr.model.named_parameters():
        p.grad = raw[n].clone() if n in raw else None
    tr.method.after_backward(tr.model, batch, res, tr.ctx)
    return {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def test_ge_noise_reproducible_per_seed_and_step():
    from utils import batch_of
    tr = _setup("ogm_ge", 1)
    batch = batch_of(tr.bundle)
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    res.loss.backward()
    raw = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    a = _ge_grads(tr, batch, res, raw, 0, 5)
    b = _ge_grads(tr, batch, res, raw, 0, 5)
    c = _ge_grads(tr, batch, res, raw, 0, 6)
    d = _ge_grads(tr, batch, res, raw, 1, 5)
    enc = [n for n in a if n.startswith("encoders.") and raw[n].dim() >= 2]
    assert enc
    assert all(torch.equal(a[n], b[n]) for n in a)  # same (seed, step): identical
    assert all(not torch.equal(a[n], c[n]) for n in enc)  # next step: new noise
    assert all(not torch.equal(a[n], d[n]) for n in enc)  # other seed: new noise
    # the noise of each modulated parameter has the hand std of its raw gradient: recover it from
    # a with k (the same for all seeds/steps): a - k * raw = std * z
    k = ogm_coefficients(tr.model.modality_logits({m: z.detach() for m, z in res.output.features.items()}),
                         batch.labels, 1.0)
    n0 = enc[0]
    gen = torch.Generator().manual_seed(0 * 1_000_003 + 5 * 7919 + 101)
    z0 = torch.randn(raw[n0].shape, generator=gen)  # the first draw of the step's generator
    r = raw[n0]
    hand_std = math.sqrt(float(((r - r.mean()) ** 2).sum()) / (r.numel() - 1))
    assert torch.allclose(a[n0], r * k[n0.split(".")[1]] + z0 * (hand_std + 1e-8), atol=1e-6)


def test_after_backward_makes_no_host_sync(monkeypatch):
    from utils import batch_of
    tr = _setup("ogm_ge", 1)
    batch = batch_of(tr.bundle)
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    res.loss.backward()
    raw = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}

    def sync(*a, **k):
        raise AssertionError("host synchronisation in OGM-GE's after_backward")

    for attr in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, sync)
    tr.method.after_backward(tr.model, batch, res, tr.ctx)
    monkeypatch.undo()
    assert any(not torch.equal(p.grad, raw[n]) for n, p in tr.model.named_parameters() if n in raw)


def test_scores_are_summed_over_processes(monkeypatch):
    """A simulated second process whose scores make the other modality dominant: the
    coefficients follow the summed scores, not this process's."""
    import mmbalance.distributed as dist_mod
    from mmbalance.functional.scores import modality_scores
    from utils import batch_of
    tr = _setup("ogm", 1)
    batch = batch_of(tr.bundle)
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    feats = {m: z.detach() for m, z in res.output.features.items()}
    with torch.no_grad():
        local = modality_scores(tr.model.modality_logits(feats), batch.labels)
    mods = tr.model.modalities
    weak = min(mods, key=lambda m: float(local[m]))
    remote = torch.tensor([20.0 if m == weak else 0.0 for m in mods])  # the weak one now dominates
    calls = []

    def fake(x):
        calls.append(x.clone())
        return x.detach().clone() + remote

    monkeypatch.setattr(dist_mod, "all_reduce_sum", fake)
    k = tr.method.coefficients(tr.model, res.output.features, batch.labels)
    assert len(calls) == 1 and calls[0].shape == (len(mods),)
    total = {m: float(local[m]) + float(remote[i]) for i, m in enumerate(mods)}
    expect = ogm_coefficients_from_scores(total, 1.0)
    assert {m: float(v) for m, v in k.items()} == pytest.approx(expect, abs=1e-6)
    assert expect[weak] < 1.0 and float(k[weak]) < 1.0

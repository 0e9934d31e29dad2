import math

import pytest
import torch

from mmbalance.functional.ogm import (discrepancy_ratios, modulate_gradient, ogm_coefficients,
                                      ogm_coefficients_from_scores)
from mmbalance.methods.ogm import OGMOptions, modulated_parameters


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

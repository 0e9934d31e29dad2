"""MMPareto (Wei & Hu, ICML 2024; spec baselines §4.9): integration math, wiring, harness."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import MethodSetupError
from mmbalance.functional.mmpareto import integrate, pareto_weights
from mmbalance.methods import build_method
from mmbalance.training.trainer import Trainer
from utils import (assert_same_step, batch_of, one_step_params, state_round_trip_reproduces_next_step, tiny_bundle,
                   tiny_config)


# ------------------------------------------------------------------------------ hand cases (spec)
def test_conflict_minnorm_hand_case():
    out, k1, cos = integrate(torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0]), [2])
    assert float(k1) == pytest.approx(0.538462, abs=1e-6)
    assert float(cos) < 0
    assert torch.allclose(out, torch.tensor([0.930261, 1.395391]), atol=1e-6)
    # ill-conditioned (2 (k1 - 0.667) cancels): checked in float64, as the spec's numbers
    d = torch.float64
    out, k1, _ = integrate(torch.tensor([1.0, 0.0], dtype=d), torch.tensor([-2.0, 0.1], dtype=d), [2])
    assert float(k1) == pytest.approx(0.667037, abs=1e-6)
    assert torch.allclose(out, torch.tensor([0.050221, 1.506645], dtype=d), atol=1e-6)


def test_no_conflict_hand_case():
    out, k1, cos = integrate(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0]), [2])
    assert float(k1) == 0.5 and float(cos) > 0
    assert torch.allclose(out, torch.tensor([2.25, 1.5]), atol=1e-6)


def test_per_tensor_vs_encoder_rescale():
    # two 1-element tensors: g_mm = (1, 0), g_u = (-0.5, 1); new = (0.615385, 0.923077),
    # tot = (0.5, 1). Per tensor: |0.5| / |0.615385| < 1 -> kept; 1 / 0.923077 > 1 -> 1.0.
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])
    out, _, _ = integrate(g_mm, g_u, [1, 1], scale=1.0)
    assert torch.allclose(out, torch.tensor([0.615385, 1.0]), atol=1e-6)
    out, _, _ = integrate(g_mm, g_u, [1, 1], scale=1.0, rescale="encoder")  # r = 1.007782 over the encoder
    assert torch.allclose(out, torch.tensor([0.620174, 0.930261]), atol=1e-6)
    # conflict="sum": always 0.5 / 0.5 -> g_mm + g_u
    out, k1, _ = integrate(g_mm, g_u, [2], scale=1.0, conflict="sum")
    assert float(k1) == 0.5 and torch.allclose(out, torch.tensor([0.5, 1.0]))
    k1, k2, _ = pareto_weights(g_mm, g_u)
    assert float(k1 + k2) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- wiring
def _trainer(mods=2, overrides=(), out=None):
    cfg = tiny_config("mmpareto", ["train.epochs=1", "optim.momentum=0", "optim.weight_decay=0"] + list(overrides))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(mods))


def _expected_grads(model, batch, gamma=1.5):
    """An independent replay with the code's MinNorm branches (v11, v12, v22)."""
    out = model(batch.inputs)
    fused = F.cross_entropy(out.logits, batch.labels)
    uni = {m: F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in model.modalities}
    exp = {}
    for m in model.modalities:
        ps = list(model.encoders[m].parameters())
        a = torch.autograd.grad(fused, ps, retain_graph=True)
        b = torch.autograd.grad(uni[m], ps, retain_graph=True)
        fa, fb = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
        v11, v12, v22 = fa.dot(fa), fa.dot(fb), fb.dot(fb)
        if v12 > 0:
            k1 = 0.5
        elif v12 >= v11:
            k1 = 0.999
        elif v12 >= v22:
            k1 = 0.001
        else:
            k1 = float((v22 - v12) / (v11 + v22 - 2 * v12))
        for p, ga, gb in zip(ps, a, b):
            new = 2 * (k1 * ga + (1 - k1) * gb)
            r = (ga + gb).norm() / new.norm()
            exp[p] = gamma * (r * new if r > 1 else new)
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoders.")]
    total = fused + sum(uni.values())
    for p, g in zip(rest, torch.autograd.grad(total, rest)):
        exp[p] = g
    return exp


@pytest.mark.parametrize("mods", [2, 3])
def test_written_gradients_match_an_independent_replay(mods):
    torch.manual_seed(0)
    tr = _trainer(mods)
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.eval()  # no dropout: the replay and the step see the same forward
    batch = batch_of(tr.bundle, n=16)
    ref = copy.deepcopy(model)
    exp = _expected_grads(ref, batch)
    res = method.training_step(model, batch, ctx)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, exp[q], atol=1e-6), n
    for m in model.modalities:
        assert f"coeff_{m}" in res.logs and f"cos_{m}" in res.logs
    # the step used these gradients: p = p_ref - lr * grad
    lr = ctx.optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q - lr * exp[q], atol=1e-6)


def test_needs_unimodal_heads():
    tr = _trainer()
    tr.model.heads = None
    with pytest.raises(MethodSetupError, match="unimodal head"):
        tr.method.training_step(tr.model, batch_of(tr.bundle, n=8), tr.ctx)


def test_distributed_average_is_applied(monkeypatch):
    """Under torchrun the flat per-loss gradients are summed over processes and divided by the
    world size before the combination: with a fake 2-process reduce that doubles the vector the
    written gradients are unchanged (average of two identical replicas)."""
    import mmbalance.distributed as D
    torch.manual_seed(0)
    tr = _trainer()
    tr.model.eval()
    batch = batch_of(tr.bundle, n=16)
    ref = copy.deepcopy(tr.model)
    exp = _expected_grads(ref, batch)
    calls = []
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "all_reduce_sum", lambda x: calls.append(x.numel()) or x.detach() * 2)
    tr.method.training_step(tr.model, batch, tr.ctx)
    assert len(calls) == 1
    for p, q in zip(tr.model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, exp[q], atol=1e-6)


# ------------------------------------------------------------------------------ harness
def test_state_round_trip():
    state_round_trip_reproduces_next_step("mmpareto")


def test_noop_is_multiloss():
    assert_same_step("mmpareto", ["method.gamma=1", "method.conflict=sum"], base="multiloss")


def test_default_differs_from_multiloss():
    a = one_step_params("mmpareto")
    b = one_step_params("multiloss")
    assert any(not torch.allclose(a[n], b[n], atol=1e-6) for n in b if n.startswith("encoders."))


def test_three_modalities_fit(tmp_path):
    tr = _trainer(3, out=tmp_path)
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])


def test_validate():
    o = build_method("mmpareto", None, ["a", "b"], 2).Options
    assert o(gamma=-1).validate() and o(rescale="x").validate() and o(conflict="x").validate()
    assert not o().validate()


def test_cli_end_to_end(tmp_path):
    from mmbalance.cli import main
    assert main(["train", "--dataset", "synthetic", "--method", "mmpareto", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

"""MLA (Zhang et al., CVPR 2024): projector, entropy gates, alternating steps, training, state."""
import math

import pytest
import torch

from mmbalance.errors import MethodSetupError
from mmbalance.functional.mla import (entropy_gates, gated_logits, owm_update, project_gradient,
                                      projector_alpha)
from mmbalance.methods import build_method
from mmbalance.methods.mla import SharedHeadFusion
from mmbalance.training.checkpoint import load_checkpoint
from mmbalance.training.trainer import Trainer
from utils import batch_of, tiny_bundle, tiny_config


# ----------------------------------------------------------------------------------- projector
def test_owm_update_hand_case():
    # P = I, r = [1, 2], alpha = 1: k = [1, 2]^T, r k = 5, P' = I - [[1, 2], [2, 4]] / 6
    # = [[5/6, -1/3], [-1/3, 1/3]], ||P'||_F = sqrt(37)/6  ->  [[5, -2], [-2, 2]] / sqrt(37)
    P = owm_update(torch.eye(2), torch.tensor([1.0, 2.0]), alpha=1.0)
    expected = torch.tensor([[5.0, -2.0], [-2.0, 2.0]]) / math.sqrt(37)
    assert torch.allclose(P, expected, atol=1e-6)
    # gradient [[1, 1]] -> [[1, 1]] P^T = [[3, 0]] / sqrt(37)
    g = project_gradient(torch.tensor([[1.0, 1.0]]), P)
    assert torch.allclose(g, torch.tensor([[3.0, 0.0]]) / math.sqrt(37), atol=1e-6)
    # un-normalised form
    raw = owm_update(torch.eye(2), torch.tensor([1.0, 2.0]), alpha=1.0, normalise=False)
    assert torch.allclose(raw, torch.tensor([[5 / 6, -1 / 3], [-1 / 3, 1 / 3]]), atol=1e-6)


def test_owm_update_code_denominator_hand_case():
    # the authors' literal form: divide element-wise by alpha + k r = 1 + [[1, 2], [2, 4]]
    raw = owm_update(torch.eye(2), torch.tensor([[1.0, 2.0]]), alpha=1.0, denominator="code", normalise=False)
    assert torch.allclose(raw, torch.tensor([[1 - 1 / 2, -2 / 3], [-2 / 3, 1 - 4 / 5]]), atol=1e-6)


def test_owm_update_3x3_second_step_and_nullspace():
    # second update from a non-identity P (numbers from the formula, by hand):
    # P = diag(1, 2, 1), r = [1, 0, 1], alpha = 0.5: k = [1, 0, 1]^T, r k = 2,
    # P' = P - [[1,0,1],[0,0,0],[1,0,1]] / 2.5
    P = torch.diag(torch.tensor([1.0, 2.0, 1.0]))
    raw = owm_update(P, torch.tensor([1.0, 0.0, 1.0]), alpha=0.5, normalise=False)
    exp = torch.tensor([[0.6, 0.0, -0.4], [0.0, 2.0, 0.0], [-0.4, 0.0, 0.6]])
    assert torch.allclose(raw, exp, atol=1e-6)
    # alpha -> 0: the updated projector removes the direction r (P' r^T = 0)
    r = torch.tensor([0.3, -1.0, 2.0])
    P2 = owm_update(torch.eye(3), r, alpha=1e-8)
    assert torch.allclose(P2 @ r, torch.zeros(3), atol=1e-5)
    assert float(torch.linalg.matrix_norm(P2)) == pytest.approx(1.0, rel=1e-6)


def test_projector_alpha():
    assert projector_alpha(0, 10) == pytest.approx(0.1)
    assert projector_alpha(5, 10) == pytest.approx(0.1 ** 1.5)
    assert projector_alpha(9, 10) == pytest.approx(0.1 ** 1.9)


# ------------------------------------------------------------------------------- entropy gates
def test_entropy_gates_hand_case():
    l1 = torch.tensor([[0.0, 0.0]])  # H1 = ln 2 (the max)
    l2 = torch.tensor([[math.log(3.0), 0.0]])  # p = [3/4, 1/4]
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    w2 = math.exp(math.log(2) - h2) / (1 + math.exp(math.log(2) - h2))
    w = entropy_gates([l1, l2])
    assert w.shape == (2, 1)
    assert torch.allclose(w[:, 0], torch.tensor([1 - w2, w2]), atol=1e-6)
    fused = gated_logits([l1, l2], w)
    assert torch.allclose(fused, torch.tensor([[w2 * math.log(3.0), 0.0]]), atol=1e-6)


def test_entropy_gates_per_sample_and_batch_scope():
    a = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # confident, then uniform
    b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # uniform, then confident
    w = entropy_gates([a, b])
    assert w[0, 0] > 0.5 and w[1, 1] > 0.5  # the confident modality wins, per sample
    assert torch.allclose(w.sum(0), torch.ones(2))
    # the code's scope: softmax over the batch (dim 0), entropy summed over the whole tensor
    def code_entropy(x):
        p = torch.softmax(x, dim=0)
        return float(-(p * p.log()).sum())
    ha, hb = code_entropy(a), code_entropy(b)
    hm = max(ha, hb)
    ea, eb = math.exp(hm - ha), math.exp(hm - hb)
    wb = entropy_gates([a, b], scope="batch")
    assert wb.shape == (2, 1)
    assert torch.allclose(wb[:, 0], torch.tensor([ea / (ea + eb), eb / (ea + eb)]), atol=1e-6)


# ---------------------------------------------------------------------------- alternating step
def _trainer(mods=2, overrides=(), n=32, out=None):
    cfg = tiny_config("mla", ["train.epochs=1"] + list(overrides))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(num_modalities=mods, n=n))


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("project", [False, True])
def test_alternating_steps_update_each_encoder_only_in_its_own_substep(project):
    tr = _trainer(mods=3, overrides=[f"method.project={str(project).lower()}"])  # SGD, momentum, wd
    model, method, ctx = tr.model, tr.method, tr.ctx
    mods = model.modalities
    records = []
    opt_step = ctx.optimizer.step

    def step(*a, **k):
        before = {m: _snapshot(model.encoders[m]) for m in mods}
        head = _snapshot(model.fusion)
        out = opt_step(*a, **k)
        records.append(({m: _changed(before[m], model.encoders[m]) for m in mods}, _changed(head, model.fusion)))
        return out

    ctx.optimizer.step = step
    ctx.num_batches = 2
    model.train()
    for i in range(2):  # the second batch checks that momentum does not leak into other encoders
        ctx.batch_idx = i
        res = method.training_step(model, batch_of(tr.bundle, n=16), ctx)
        assert torch.isfinite(res.loss)
        assert all(p.grad is None for p in model.parameters())  # the code's ``del p.grad``
    assert len(records) == 2 * len(mods)
    for s, (enc_changed, head_changed) in enumerate(records):
        own = mods[s % len(mods)]
        assert enc_changed == {m: m == own for m in mods}
        assert head_changed
    assert method.num_updates == 6
    P = method.projector
    if not project:
        assert P is None  # the released code never builds or updates the projector
        return
    assert P.shape == (8, 8) and not torch.allclose(P, torch.eye(8) / math.sqrt(8))
    assert float(torch.linalg.matrix_norm(P)) == pytest.approx(1.0, rel=1e-5)


def test_default_is_no_projection():
    from mmbalance.config import resolve_config
    cfg = resolve_config("synthetic", "mla")
    assert cfg.method_options.project is False
    assert cfg.method_options.zero_grad == "none"
    assert build_method("mla", None, ["a", "b"], 3).options.project is False


def test_project_false_applies_the_raw_head_gradient():
    """After sub-steps 1 and 2 (so the projection branch would be live), sub-step 1 of the next
    batch applies the plain gradient: w <- w - lr * g (SGD without momentum / decay). Any
    projection (P != I after an update) would change the update."""
    tr = _trainer(2, ["optim.momentum=0", "optim.weight_decay=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.num_batches, ctx.batch_idx = 4, 1
    batch = batch_of(tr.bundle, n=16)
    head = model.fusion.fc
    method.training_step(model, batch, ctx)
    assert method.num_updates == 2
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    z = model.encoders["m1"](batch.inputs["m1"])
    loss = torch.nn.functional.cross_entropy(head(z), batch.labels)
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    lr = ctx.optimizer.param_groups[0]["lr"]
    # the update a projection with P updated from this batch's r would give (must differ)
    P = owm_update(torch.eye(8), z.detach().mean(0), projector_alpha(1, 4))
    assert not torch.allclose(gw @ P.t(), gw, atol=1e-4)
    method.unimodal_step(model, batch, "m1", ctx)
    assert torch.allclose(head.weight, w0 - lr * gw, atol=1e-6)
    assert torch.allclose(head.bias, b0 - lr * gb, atol=1e-6)
    assert method.projector is None


def test_projection_hand_value_uses_the_global_batch_mean(monkeypatch):
    """project=true, P = I, r = [1, 2] (the mean over the rows of *all* processes), batch 0 of 1
    (alpha = 0.1): k = [1, 2]^T, r k = 5, P' = I - [[1, 2], [2, 4]] / 5.1 = [[4.1, -2], [-2, 1.1]] / 5.1,
    normalised: [[4.1, -2], [-2, 1.1]] / sqrt(26.02); grad [[1, 1]] -> [[2.1, -0.9]] / sqrt(26.02).
    This process holds the row [2, 1]; a simulated second process holds [0, 3] and [1, 2]."""
    import types
    import mmbalance.distributed as dist_mod
    remote = torch.tensor([0.0 + 1.0, 3.0 + 2.0, 2.0])  # the other process's [row sum, row count]
    calls = []

    def fake_all_reduce_sum(x):
        calls.append(x.clone())
        return x.detach().clone() + remote

    monkeypatch.setattr(dist_mod, "all_reduce_sum", fake_all_reduce_sum)
    method = build_method("mla", build_method("mla", None, ["a", "b"], 1).Options(project=True), ["a", "b"], 1)
    method.num_updates = 1
    head = torch.nn.Linear(2, 1)
    head.weight.grad = torch.tensor([[1.0, 1.0]])
    ctx = types.SimpleNamespace(batch_idx=0, num_batches=1)
    method._project(head, torch.tensor([[2.0, 1.0]]), ctx)
    assert len(calls) == 1 and torch.equal(calls[0], torch.tensor([2.0, 1.0, 1.0]))  # local sum, count
    n = math.sqrt(26.02)
    assert torch.allclose(method.projector, torch.tensor([[4.1, -2.0], [-2.0, 1.1]]) / n, atol=1e-6)
    assert torch.allclose(head.weight.grad, torch.tensor([[2.1, -0.9]]) / n, atol=1e-6)


def test_zero_grad_zeros_gives_the_first_modality_a_decay_step():
    """zero_grad=zeros (released code under torch 1.8): in sub-step 2 encoder m1 holds zero
    gradients, so SGD (momentum 0, wd 0.01) still decays it: p <- p (1 - lr wd). Default: untouched."""
    for mode, expect_decay in (("zeros", True), ("none", False)):
        tr = _trainer(2, ["optim.momentum=0", "optim.weight_decay=0.01", f"method.zero_grad={mode}"])
        model, method, ctx = tr.model, tr.method, tr.ctx
        ctx.num_batches, ctx.batch_idx = 1, 0
        lr = ctx.optimizer.param_groups[0]["lr"]
        snaps = []
        opt_step = ctx.optimizer.step

        def step(*a, **k):
            before = _snapshot(model.encoders["m1"])
            out = opt_step(*a, **k)
            snaps.append((before, _snapshot(model.encoders["m1"])))
            return out

        ctx.optimizer.step = step
        method.training_step(model, batch_of(tr.bundle, n=16), ctx)
        before, after = snaps[1]  # sub-step 2 (modality m2)
        for b, a in zip(before, after):
            assert torch.allclose(a, b * (1 - lr * 0.01) if expect_decay else b, atol=1e-7), mode
        assert all(p.grad is None for p in model.parameters())


def test_shared_head_gradient_is_projected():
    """Sub-step 2 (the first projected one): the applied head-weight gradient equals the raw one
    times P^T, P updated with the batch mean of modality 2's features."""
    tr = _trainer(2, ["optim.momentum=0", "optim.weight_decay=0", "method.project=true"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.num_batches, ctx.batch_idx = 4, 1
    batch = batch_of(tr.bundle, n=16)
    head = model.fusion.fc
    method.training_step(model, batch, ctx)  # sub-steps 1 (no projection, as the code) and 2
    # replay batch 2 by hand on copies
    w0 = head.weight.detach().clone()
    z = model.encoders["m1"](batch.inputs["m1"])
    loss = torch.nn.functional.cross_entropy(head(z), batch.labels)
    g = torch.autograd.grad(loss, head.weight)[0]
    P = owm_update(method.projector.clone(), z.detach().mean(0), projector_alpha(1, 4))
    lr = ctx.optimizer.param_groups[0]["lr"]
    expected = w0 - lr * g @ P.t()
    enc_before = _snapshot(model.encoders["m1"])
    method.unimodal_step(model, batch, "m1", ctx)
    assert torch.allclose(head.weight, expected, atol=1e-6)
    assert _changed(enc_before, model.encoders["m1"])


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("mods,project", [(2, False), (3, True)])
def test_two_steps_finite_and_state_round_trip(mods, project, tmp_path):
    tr = _trainer(mods=mods, out=tmp_path, overrides=[f"method.project={str(project).lower()}"])
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])
    assert set(res["test"]["modalities"]) == set(tr.model.modalities)
    assert all("zero_out_accuracy" in v for v in res["test"]["modalities"].values())
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["method"]
    assert state["num_updates"] == 2 * mods
    fresh = build_method("mla", None, tr.model.modalities, 3)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 2 * mods
    if project:
        assert torch.equal(fresh.projector, tr.method.projector)
    else:
        assert state["projector"] is None and fresh.projector is None
    with pytest.raises(KeyError):
        fresh.load_state_dict({})


def test_fixed_fusion_and_zero_out_are_the_shared_head():
    tr = _trainer(2, ["method.fusion=fixed", "method.fixed_weights=[0.25, 0.75]"])
    model, method = tr.model, tr.method
    model.eval()
    batch = batch_of(tr.bundle, "test", n=8)
    with torch.no_grad():
        out = method.predict(model, batch)
        zl = method.zero_out_logits(model, out)
        head = model.fusion.fc
        l1, l2 = head(out.features["m1"]), head(out.features["m2"])
    assert torch.allclose(zl["m1"], l1) and torch.allclose(zl["m2"], l2)
    assert torch.allclose(out.logits, 0.25 * l1 + 0.75 * l2, atol=1e-6)


def test_setup_errors():
    with pytest.raises(MethodSetupError, match="same size"):
        SharedHeadFusion({"a": 4, "b": 5}, 3)
    with pytest.raises(MethodSetupError, match="one weight per modality"):
        build_method("mla", build_method("mla", None, ["a", "b"], 3).Options(fixed_weights=[1.0]), ["a", "b"], 3)
    from mmbalance.errors import ConfigError
    with pytest.raises(ConfigError, match="fusion"):
        tiny_config("mla", ["method.fusion=average"])
    with pytest.raises(ConfigError, match="zero_grad"):
        tiny_config("mla", ["method.zero_grad=never"])

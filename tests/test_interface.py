"""Interface additions for the established baselines (spec baselines §2: A, H, I, J) and the
shared math they use, each checked once on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmbalance.functional.common import all_subsets, class_prototypes, js_divergence, min_norm_2, shapley_combine
from mmbalance.functional.grads import flatten, per_loss_grads, unflatten
from mmbalance.methods.base import Method, register_method, METHODS
from mmbalance.methods.gradients import head_block, scale_modality_grads
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.training.trainer import Trainer
from utils import tiny_bundle, tiny_config


# ----------------------------------------------------------------------------------- shared math
def test_shapley_two_players_hand_values():
    v = {frozenset(): torch.tensor(0.0), frozenset("a"): torch.tensor(1.0), frozenset("b"): torch.tensor(3.0),
         frozenset("ab"): torch.tensor(6.0)}
    phi = shapley_combine(v, ["a", "b"])
    # phi_a = 1/2 (1 - 0) + 1/2 (6 - 3) = 2; phi_b = 1/2 (3 - 0) + 1/2 (6 - 1) = 4
    assert float(phi["a"]) == pytest.approx(2.0) and float(phi["b"]) == pytest.approx(4.0)


def test_shapley_axioms_on_three_players():
    g = torch.Generator().manual_seed(0)
    players = ["x", "y", "z"]
    base = {s: torch.randn(4, 3, generator=g) for s in all_subsets(["x", "y"])}
    # z is a null player: adding it never changes the value
    v = {**base, **{s | {"z"}: base[s] for s in base}}
    phi = shapley_combine(v, players)
    assert torch.allclose(phi["z"], torch.zeros(4, 3), atol=1e-6)
    total = phi["x"] + phi["y"] + phi["z"]
    assert torch.allclose(total, v[frozenset(players)] - v[frozenset()], atol=1e-5)  # efficiency
    # symmetry: x and y interchangeable -> equal values
    sym = {s: torch.tensor(float(len(s & {"x", "y"}) ** 2 + 5 * ("z" in s))) for s in all_subsets(players)}
    phi = shapley_combine(sym, players)
    assert float(phi["x"]) == pytest.approx(float(phi["y"])) and float(phi["z"]) == pytest.approx(5.0)
    with pytest.raises(KeyError, match="missing"):
        shapley_combine({frozenset(): torch.tensor(0.0)}, ["a"])


def test_min_norm_2_closed_form():
    gamma, p = min_norm_2(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert float(gamma) == pytest.approx(0.5) and p.tolist() == pytest.approx([0.5, 0.5])
    gamma, p = min_norm_2(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))  # (g2-g1).g2 = -1 -> clamp 0
    assert float(gamma) == 0.0 and p.tolist() == [1.0, 0.0]
    gamma, _ = min_norm_2(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert float(gamma) == 0.5
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    grid = torch.linspace(0, 1, 10001)
    norms = ((grid[:, None] * a + (1 - grid[:, None]) * b) ** 2).sum(1)
    assert float(min_norm_2(a, b)[0]) == pytest.approx(float(grid[norms.argmin()]), abs=2e-4)


def test_js_divergence_gradient_finite_when_a_probability_underflows():
    """A row so confident that float32 softmax gives exactly 0 for a class: value as by hand, finite
    gradients (F.kl_div's xlogy backward gave NaN here and diverged MCR)."""
    p = torch.tensor([[200.0, 0.0, -200.0]], requires_grad=True)  # softmax = [1, e^-200 -> 0, 0]
    q = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    assert float(torch.softmax(p, 1)[0, 2]) == 0.0
    v = js_divergence(p, q)
    # by hand: p = (1, 0, 0), q = (1/3, 1/3, 1/3), m = (2/3, 1/6, 1/6)
    want = 0.5 * (math.log(1 / (2 / 3)) + (1 / 3) * math.log((1 / 3) / (2 / 3))
                  + 2 * (1 / 3) * math.log((1 / 3) / (1 / 6)))
    assert float(v) == pytest.approx(want, rel=1e-5)
    v.backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


def test_class_prototypes_and_js_divergence():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    protos, counts = class_prototypes(f, torch.tensor([0, 0, 2]), 3)
    assert protos.tolist() == [[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]] and counts.tolist() == [2, 0, 1]
    x = torch.tensor([[0.3, -1.0, 2.0]])
    assert float(js_divergence(x, x)) == pytest.approx(0.0, abs=1e-7)
    far = torch.tensor([[50.0, -50.0]])
    assert float(js_divergence(far, -far)) == pytest.approx(math.log(2), abs=1e-6)  # disjoint supports


# ----------------------------------------------------------------------------------- I: per-loss grads
def test_per_loss_grads_match_separate_backward_and_leave_grad_alone():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(4, 3)
    l1 = a(x).pow(2).sum()
    l2 = (a(x) * b(x)).sum()
    out = per_loss_grads({"l1": l1, "l2": l2}, {"a": list(a.parameters()), "b": list(b.parameters())})
    assert all(p.grad is None for p in list(a.parameters()) + list(b.parameters()))
    assert out["l1"]["b"] == [None, None]
    ref = torch.autograd.grad((a(x) * b(x)).sum(), list(b.parameters()))
    assert all(torch.allclose(g, r) for g, r in zip(out["l2"]["b"], ref))
    v = flatten(out["l1"]["b"], list(b.parameters()))
    assert v.shape == (8,) and float(v.abs().sum()) == 0.0
    back = unflatten(flatten(out["l2"]["a"], list(a.parameters())), list(a.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(back, out["l2"]["a"]))


# ----------------------------------------------------------------------------------- gradient edits
def _two_modality_model():
    torch.manual_seed(0)
    enc = {"a": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "b": nn.Linear(2, 2)}
    return MultimodalModel.from_encoders(enc, 3, dims={"a": 4, "b": 2})


def test_scale_modality_grads_with_head_blocks():
    model = _two_modality_model()
    out = model({"a": torch.randn(5, 3), "b": torch.randn(5, 2)})
    out.logits.sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    scale_modality_grads(model, {"a": 0.5}, rule="all", include_head_blocks=True)
    g = dict(model.named_parameters())
    assert torch.allclose(g["encoders.a.0.weight"].grad, 0.5 * before["encoders.a.0.weight"])
    assert torch.equal(g["encoders.b.weight"].grad, before["encoders.b.weight"])
    assert head_block(model, "a") == slice(0, 4) and head_block(model, "b") == slice(4, 6)
    w, w0 = g["fusion.fc.weight"].grad, before["fusion.fc.weight"]
    assert torch.allclose(w[:, :4], 0.5 * w0[:, :4]) and torch.equal(w[:, 4:], w0[:, 4:])
    assert torch.equal(g["fusion.fc.bias"].grad, before["fusion.fc.bias"])


# ----------------------------------------------------------------------------------- H: subsets
def test_subset_logits_feature_and_input_level():
    model = _two_modality_model()
    model.train()
    x = {"a": torch.randn(5, 3), "b": torch.randn(5, 2)}
    feats = model.encode(x)
    res = model.subset_logits(x, [(), ("a",), ("a", "b")], features=feats)
    assert torch.allclose(res[frozenset("a")], model.zero_out_logits(feats)["a"])
    assert torch.allclose(res[frozenset(["a", "b"])], model.fuse(feats))
    assert torch.allclose(res[frozenset()], model.fusion.fc.bias.expand(5, 3))
    bn = model.encoders["a"][1]
    stats = bn.running_mean.clone()
    only_b = model.forward_subset(x, ["b"], level="input", bn="eval")
    assert torch.equal(bn.running_mean, stats) and bn.training  # no update, mode restored
    model.eval()
    expect = model.fuse(model.encode({"a": torch.zeros(5, 3), "b": x["b"]}))
    assert torch.allclose(only_b, expect, atol=1e-6)
    with pytest.raises(KeyError, match=r"unknown modalities \['c'\]"):
        model.subset_logits(x, [("c",)])
    with pytest.raises(ValueError, match="level must be"):
        model.subset_logits(x, [("a",)], level="middle")


# ----------------------------------------------------------------------------------- A and J
class _Probe(Method):
    """Records what the loop lends it; owns (and counts) clipping when asked."""

    seen_eval: list = []
    val_rows = 0

    def on_epoch_start(self, model, ctx):
        type(self).seen_eval.append(dict(ctx.last_eval))
        type(self).val_rows = sum(len(b) for b in ctx.val_batches())


@pytest.fixture
def probe_registered():
    register_method("_probe_method", paper="-", kind="baseline", description="test probe")(_Probe)
    yield
    METHODS._entries.pop("_probe_method")  # keep the registry as the other tests expect it


@pytest.mark.parametrize("owner", ["trainer", "method"])
def test_val_batches_last_eval_and_clip_ownership(monkeypatch, owner, probe_registered):
    from mmbalance.methods.base import TrainContext
    calls = []
    monkeypatch.setattr(TrainContext, "clip_grad", lambda self, params=None: calls.append(1))
    monkeypatch.setattr(_Probe, "grad_clip_owner", owner)
    _Probe.seen_eval = []
    bundle = tiny_bundle(2, n=32)
    tr = Trainer(tiny_config("_probe_method", ["train.epochs=2", "train.grad_clip=1.0"]), None, quiet=True,
                 bundle=bundle)
    tr.fit()
    assert _Probe.val_rows == 32
    assert _Probe.seen_eval[0] == {} and _Probe.seen_eval[1]["val_accuracy"] == tr.history[0]["val_accuracy"]
    assert "val_m1_zero_out_accuracy" in _Probe.seen_eval[1]
    assert (len(calls) > 0) == (owner == "trainer")

"""AGM (Li et al., ICCV 2023; spec baselines §4.4): Shapley logits, coefficients, hooks, state."""
import math

import pytest
import torch
from torch import nn

from mmbalance.data.batch import Batch
from mmbalance.functional.agm import (agm_coefficients, agm_ratios, running_mean, scale_grad, shapley_logits,
                                      shapley_scores)
from mmbalance.methods import build_method
from mmbalance.methods.base import TrainContext
from mmbalance.models.fusion import ConcatFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.training.trainer import Trainer
from utils import assert_same_step, batch_of, state_round_trip_reproduces_next_step, tiny_bundle, tiny_config


def _toy():
    """Identity encoders on scalars, concat head W_a = [1, 0]^T, W_v = [0, 0.5]^T, b = 0."""
    fusion = ConcatFusion({"a": 1, "v": 1}, 2)
    with torch.no_grad():
        fusion.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
        fusion.fc.bias.zero_()
    model = MultimodalModel({"a": nn.Identity(), "v": nn.Identity()}, fusion, 2, feature_dims={"a": 1, "v": 1})
    batch = Batch({"a": torch.tensor([[1.0]]), "v": torch.tensor([[2.0]])}, torch.tensor([0]), torch.tensor([0]))
    return model, batch


def _method(mods, **kw):
    base = build_method("agm", None, mods, 2)
    return build_method("agm", base.Options(**kw), mods, 2)


# ------------------------------------------------------------------------------ hand case (spec)
def test_toy_shapley_scores_ratios_coefficients():
    model, batch = _toy()
    with torch.no_grad():
        vals = {frozenset(["a", "v"]): torch.tensor([[1.0, 1.0]]), frozenset(["a"]): torch.tensor([[1.0, 0.0]]),
                frozenset(["v"]): torch.tensor([[0.0, 1.0]])}
        phi = shapley_logits(vals, ["a", "v"])
    assert torch.allclose(phi["a"], torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(phi["v"], torch.tensor([[0.0, 1.0]]))
    s = shapley_scores(phi, batch.labels)
    assert float(s["a"]) == pytest.approx(0.313262, abs=1e-6)
    assert float(s["v"]) == pytest.approx(1.313262, abs=1e-6)
    r = agm_ratios(torch.tensor([0.313262, 1.313262], dtype=torch.float64))
    assert torch.allclose(r, torch.tensor([2.718282, 0.367879], dtype=torch.float64), atol=1e-6)
    c = agm_coefficients(r, torch.ones(2, dtype=torch.float64), 1.0, 10.0)
    assert torch.allclose(c, torch.tensor([0.179374, 1.881596], dtype=torch.float64), atol=1e-6)
    # cap: min(rbar - r, cap) -> exp(alpha * cap)
    assert float(agm_coefficients(torch.tensor([0.0]), torch.tensor([5.0]), 1.0, 2.0)[0]) == pytest.approx(math.exp(2))
    assert float(agm_coefficients(torch.tensor([0.0]), torch.tensor([5.0]), 1.0, None)[0]) == pytest.approx(math.exp(5))
    # ratio formula for M = 3
    r3 = agm_ratios(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    assert torch.allclose(r3, torch.tensor([2.117000, 1.0, 0.472367], dtype=torch.float64), atol=1e-6)
    # the floor on the true-class probability
    s0 = shapley_scores({"a": torch.tensor([[0.0, 100.0]])}, torch.tensor([0]))
    assert float(s0["a"]) == pytest.approx(-math.log(1e-8), rel=1e-6)
    # running mean, 1-based
    assert torch.allclose(running_mean(torch.tensor([2.0]), torch.tensor([5.0]), 1), torch.tensor([5.0]))
    assert torch.allclose(running_mean(torch.tensor([2.0]), torch.tensor([5.0]), 3), torch.tensor([3.0]))


@pytest.mark.parametrize("level", ["input", "feature"])
def test_toy_gradients_are_scaled_per_modality(level):
    model, batch = _toy()
    method = _method(["a", "v"], level=level)
    ctx = TrainContext(model=model)
    res = method.compute_loss(model, batch, ctx)
    assert torch.allclose(res.output.logits, torch.tensor([[1.0, 1.0]]))
    res.loss.backward()
    g = model.fusion.fc.weight.grad
    assert torch.allclose(g[:, 0], torch.tensor([-0.089687, 0.089687]), atol=1e-6)  # W_a: c_a * [-0.5, 0.5]
    assert torch.allclose(g[:, 1], torch.tensor([-1.881596, 1.881596]), atol=1e-6)  # W_v: c_v * [-1, 1]
    assert torch.allclose(model.fusion.fc.bias.grad, torch.tensor([-0.515243, 0.515243]), atol=1e-6)
    assert float(res.logs["coeff_a"]) == pytest.approx(0.179374, abs=1e-6)
    assert float(res.logs["coeff_v"]) == pytest.approx(1.881596, abs=1e-6)
    assert float(res.logs["ratio_a"]) == pytest.approx(2.718282, abs=1e-6)
    # state: running mean = this step's scores, step 1
    assert method.step == 1
    assert torch.allclose(method.score_mean, torch.tensor([0.313262, 1.313262]), atol=1e-6)


def test_outside_the_window_gradients_are_plain_but_the_mean_still_updates():
    model, batch = _toy()
    method = _method(["a", "v"], start_epoch=1, end_epoch=3)
    ctx = TrainContext(model=model)
    res = method.compute_loss(model, batch, ctx)  # epoch 0: outside
    res.loss.backward()
    g = model.fusion.fc.weight.grad
    assert torch.allclose(g[:, 0], torch.tensor([-0.5, 0.5]), atol=1e-6)
    assert torch.allclose(g[:, 1], torch.tensor([-1.0, 1.0]), atol=1e-6)
    assert float(res.logs["coeff_a"]) == 1.0 and method.step == 1


def test_second_step_uses_the_running_mean():
    # step 2 with the same scores: rbar = r -> c = 1 for both modalities
    model, batch = _toy()
    method = _method(["a", "v"])
    ctx = TrainContext(model=model)
    method.compute_loss(model, batch, ctx)
    res = method.compute_loss(model, batch, ctx)
    assert float(res.logs["coeff_a"]) == pytest.approx(1.0, abs=1e-6)
    assert float(res.logs["coeff_v"]) == pytest.approx(1.0, abs=1e-6)
    assert method.step == 2


@pytest.mark.parametrize("mods", [2, 3])
def test_shapley_logits_sum_to_the_total_on_a_random_net(mods):
    torch.manual_seed(0)
    tr = Trainer(tiny_config("agm", ["train.epochs=1"]), None, quiet=True, bundle=tiny_bundle(mods))
    model, method = tr.model, tr.method
    batch = batch_of(tr.bundle, n=8)
    model.train()
    out = model(batch.inputs)
    values = method.subset_values(model, batch.inputs, out.features)
    assert len(values) == 2 ** mods - 2  # proper non-empty subsets only
    values[frozenset(model.modalities)] = out.logits
    phi = shapley_logits(values, model.modalities)
    assert torch.allclose(sum(phi.values()), out.logits, atol=1e-5)
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_scale_grad_identity_forward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_grad(x, 3.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0, 3.0]))


# ----------------------------------------------------------------------------------- clipping
def test_conditional_clipping():
    model, batch = _toy()
    method = _method(["a", "v"], clip_threshold=1.0, clip_norm=1.0)
    assert method.grad_clip_owner == "method"
    ctx = TrainContext(model=model)
    # below the threshold: untouched (norm 3 > 1 but fusion grads within +-1)
    model.fusion.fc.weight.grad = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    model.fusion.fc.bias.grad = torch.tensor([2.0, 2.0])
    res = method.compute_loss(model, batch, ctx)
    res.logs.clear()
    method.after_backward(model, batch, res, ctx)
    assert torch.equal(model.fusion.fc.bias.grad, torch.tensor([2.0, 2.0]))
    assert float(res.logs["clipped"]) == 0.0
    # above: global norm clipped to 1 (grad norm sqrt(4 * 4) = 4 -> factor 1 / (4 + 1e-6))
    model.fusion.fc.weight.grad = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    model.fusion.fc.bias.grad = torch.tensor([2.0, 2.0])
    model.fusion.fc.weight.grad[1, 1] = 2.0
    method.after_backward(model, batch, res, ctx)
    total = torch.cat([model.fusion.fc.weight.grad.reshape(-1), model.fusion.fc.bias.grad])
    assert float(total.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(res.logs["clipped"]) == 1.0


# ------------------------------------------------------------------------------ harness
def test_state_round_trip():
    state_round_trip_reproduces_next_step("agm", ["method.alpha=2.0"])
    state_round_trip_reproduces_next_step("agm", ["method.level=feature"])


@pytest.mark.parametrize("level", ["input", "feature"])
def test_noop_is_joint(level):
    assert_same_step("agm", ["method.alpha=0", "method.clip_norm=0", f"method.level={level}"], base="joint")


def test_mechanism_changes_the_step():
    from utils import one_step_params
    a = one_step_params("agm", ["method.alpha=2.0", "method.clip_norm=0"])
    b = one_step_params("joint")
    assert any(not torch.allclose(a[n], b[n], atol=1e-6) for n in b if n.startswith("encoders."))


def test_three_modalities_fit(tmp_path):
    tr = Trainer(tiny_config("agm", ["train.epochs=1"]), tmp_path, quiet=True, bundle=tiny_bundle(3))
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])
    assert tr.method.step > 0 and tr.method.score_mean.shape == (3,)


def test_validate_rejects_bad_options():
    o = build_method("agm", None, ["a", "b"], 2).Options
    assert o(alpha=-1).validate() and o(level="x").validate() and o(cap=-1.0).validate()
    assert o(clip_norm=-1).validate() and o(start_epoch=3, end_epoch=1).validate()
    assert not o().validate()


def test_presets():
    from mmbalance.methods.agm import AGM
    assert AGM.presets["mosei"]["method"]["cap"] is None
    assert AGM.presets["cremad"]["method"]["cap"] == 10.0


def test_cli_end_to_end(tmp_path):
    from mmbalance.cli import main
    assert main(["train", "--dataset", "synthetic", "--method", "agm", "--out", str(tmp_path), "--quiet", "epochs=1",
                 "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

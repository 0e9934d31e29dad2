"""InfoReg (Huang et al., CVPR 2025; spec baselines §4.21): coefficients, window, proximal term."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import MethodSetupError
from mmbalance.functional.inforeg import fisher_trace, proximal_grad, regulation_coefficients, window_growth
from mmbalance.methods import build_method
from mmbalance.methods.inforeg import fisher_layers
from mmbalance.training.trainer import Trainer
from utils import (assert_same_step, batch_of, one_step_params, state_round_trip_reproduces_next_step, tiny_bundle,
                   tiny_config)


# ------------------------------------------------------------------------------ hand cases (spec)
def test_beta_hand_values():
    g = torch.tensor([0.95, 0.95], dtype=torch.float64)
    on = torch.tensor([True, True])
    b = regulation_coefficients(torch.tensor([10.0, 0.0], dtype=torch.float64), g, on)
    assert torch.allclose(b, torch.tensor([2.582368, 0.0], dtype=torch.float64), atol=1e-6)
    b = regulation_coefficients(torch.tensor([0.0, 0.5], dtype=torch.float64), g, on)
    assert torch.allclose(b, torch.tensor([0.0, 1.508060], dtype=torch.float64), atol=1e-6)
    # the code's visual constant 0.1: 0.1 * exp(tanh(0.5)) = 0.158743
    b = regulation_coefficients(torch.tensor([0.0, 0.5], dtype=torch.float64),
                                torch.tensor([0.95, 0.1], dtype=torch.float64), on)
    assert torch.allclose(b, torch.tensor([0.0, 0.158743], dtype=torch.float64), atol=1e-6)
    # closed window or a tie: no regulation
    assert torch.equal(regulation_coefficients(torch.tensor([10.0, 0.0]), g.float(), torch.tensor([False, True])),
                       torch.zeros(2))
    assert torch.equal(regulation_coefficients(torch.tensor([1.0, 1.0]), g.float(), on), torch.zeros(2))
    # M = 3 extension: s = [3, 1, 2], mean 2 -> only modality 0: 0.95 exp(tanh(3 - 1.5))
    b = regulation_coefficients(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64),
                                torch.full((3,), 0.95, dtype=torch.float64), torch.tensor([True] * 3))
    assert torch.allclose(b, torch.tensor([0.95 * math.exp(math.tanh(1.5)), 0.0, 0.0], dtype=torch.float64))


def test_window_hand_values():
    assert window_growth([0.0] * 10 + [4.0]) == pytest.approx(1.0)
    assert window_growth([0.0] * 9 + [4.0, 5.0]) == pytest.approx(0.5556, abs=1e-4)
    assert window_growth([1.0] * 10 + [1.02]) == pytest.approx(0.001996, abs=1e-6)
    assert window_growth([0.0] * 11) == 0.0
    with pytest.raises(ValueError):
        window_growth([1.0] * 10)


def test_proximal_and_trace_hand_values():
    assert float(proximal_grad(torch.tensor(1.0), torch.tensor(0.8), 2.0)) == pytest.approx(0.4)
    assert fisher_trace({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(6.0)


# ---------------------------------------------------------------------------------- wiring
def _trainer(mods=2, overrides=(), out=None):
    cfg = tiny_config("inforeg", ["train.epochs=1"] + list(overrides))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(mods))


def test_proximal_term_on_the_dominant_encoder_only_and_fisher_after_it():
    torch.manual_seed(0)
    tr = _trainer()
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.eval()  # no dropout: the replay sees the same forward
    method.on_epoch_start(model, ctx)
    # move the snapshot away from the parameters so the proximal term is non-zero
    for m in method.modalities:
        for n in method.snapshot[m]:
            method.snapshot[m][n] = method.snapshot[m][n] - 0.3
    batch = batch_of(tr.bundle, n=16)
    ref = copy.deepcopy(model)
    out = ref(batch.inputs)
    ml = ref.modality_logits(out.features)
    loss = F.cross_entropy(out.logits, batch.labels) + sum(F.cross_entropy(ml[m], batch.labels) for m in ref.modalities)
    plain = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))
    s = {m: float(ml[m].detach().softmax(1).gather(1, batch.labels.view(-1, 1)).sum()) for m in ref.modalities}
    dom, other = sorted(ref.modalities, key=lambda m: -s[m])
    beta = 0.95 * math.exp(math.tanh(s[dom] - s[other]))

    res = method.compute_loss(model, batch, ctx)
    assert float(res.logs[f"coeff_{dom}"]) == pytest.approx(beta, rel=1e-5)
    assert float(res.logs[f"coeff_{other}"]) == 0.0
    ctx.optimizer.zero_grad(set_to_none=True)
    res.loss.backward()
    method.after_backward(model, batch, res, ctx)
    for n, p in model.named_parameters():
        exp = plain[n]
        if n.startswith(f"encoders.{dom}."):
            exp = exp + beta * 0.3
        assert torch.allclose(p.grad, exp, atol=1e-5), n
    # Fisher accumulators: squared weight gradients after the proximal term
    for m in model.modalities:
        layers = fisher_layers(model.encoders[m])
        assert layers and set(method.fisher[m]) == set(layers)
        for name, w in layers.items():
            assert torch.allclose(method.fisher[m][name], w.grad ** 2)
    expected = {m: sum(float((w.grad ** 2).mean()) for w in fisher_layers(model.encoders[m]).values())
                for m in model.modalities}
    logs = method.on_epoch_end(model, ctx)
    for m in model.modalities:
        assert logs[f"trace_{m}"] == pytest.approx(expected[m], rel=1e-6)
        assert method.traces[m] == [0.0] * 10 + [pytest.approx(expected[m], rel=1e-6)]
    assert method.fisher == {m: {} for m in model.modalities}


def test_closed_window_means_no_regulation():
    tr = _trainer()
    method, ctx = tr.method, tr.ctx
    method.traces = {m: [1.0] * 10 + [1.02] for m in method.modalities}
    ctx.epoch = 1
    method.on_epoch_start(tr.model, ctx)
    assert all(k == pytest.approx(0.001996, abs=1e-6) for k in method.window_k.values())
    res = method.compute_loss(tr.model, batch_of(tr.bundle, n=16), ctx)
    assert all(float(res.logs[f"coeff_{m}"]) == 0.0 for m in method.modalities)
    # a fixed window modality decides for all
    a, b = tr.model.modalities
    method2 = build_method("inforeg", method.Options(window_modality=a), [a, b], 3)
    method2.traces = {a: [0.0] * 10 + [4.0], b: [1.0] * 10 + [1.02]}
    method2.on_epoch_start(tr.model, ctx)
    assert method2.window_k == {a: 1.0, b: 1.0}


def test_options_and_setup_errors():
    o = build_method("inforeg", None, ["a", "b"], 2).Options
    assert o(gamma=-1).validate() and o(window=0).validate() and o(gamma_modality={"a": -1.0}).validate()
    assert o(unimodal_weight=-1).validate() and not o().validate()
    with pytest.raises(MethodSetupError, match="unknown modality"):
        build_method("inforeg", o(window_modality="audio"), ["a", "b"], 2)
    with pytest.raises(MethodSetupError, match="unknown modality"):
        build_method("inforeg", o(gamma_modality={"c": 1.0}), ["a", "b"], 2)
    m = build_method("inforeg", o(gamma_modality={"b": 0.1}), ["a", "b"], 2)
    assert m.gammas == [0.95, 0.1]
    from mmbalance.methods.inforeg import InfoReg
    assert InfoReg.presets["cremad"]["method"]["gamma_modality"] == {"audio": 0.95, "visual": 0.1}


# ------------------------------------------------------------------------------ harness
def test_state_round_trip():
    state_round_trip_reproduces_next_step("inforeg", ["method.gamma=2.0"])


def test_noop_is_joint():
    assert_same_step("inforeg", ["method.gamma=0", "method.unimodal_weight=0"], base="joint")


def test_mechanism_changes_the_step():
    # one step from the epoch-start snapshot: the proximal term is 0, so compare the multi-loss
    # objective (unimodal_weight 1 vs 0) -- and the regulated second step in the round-trip test
    a = one_step_params("inforeg", ["method.gamma=0"])
    b = one_step_params("joint")
    assert any(not torch.allclose(a[n], b[n], atol=1e-6) for n in b if n.startswith("encoders."))


def test_three_modalities_fit(tmp_path):
    tr = _trainer(3, out=tmp_path)
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])
    assert all(len(v) == 11 for v in tr.method.traces.values())


def test_cli_end_to_end(tmp_path):
    from mmbalance.cli import main
    assert main(["train", "--dataset", "synthetic", "--method", "inforeg", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

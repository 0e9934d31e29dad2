"""Greedy (Wu et al., ICML 2022): MMTM, conditional learning speed, curation rule, wiring, runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import resume_is_exact, state_round_trip_reproduces_next_step, tiny_bundle, tiny_config

import mmbalance
from mmbalance.cli import main
from mmbalance.errors import MethodSetupError, ModelSetupError
from mmbalance.functional.greedy import (
    balance_ratios,
    conditional_utilisation_rate,
    curation_update,
    learning_speed,
    squeeze,
)
from mmbalance.methods import build_method
from mmbalance.methods.greedy import Greedy, GreedyOptions
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.mmtm import MMTM
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.training.trainer import Trainer

SMALL = ["data.n_train=96", "data.n_val=32", "data.n_test=32"]


# ------------------------------------------------------------------------------- pure math
def _hand_mmtm(**kw):
    """C_0 = C_1 = 1, ratio 4 -> squeeze width int(2*2/4) = 1; W_sq = [1, -1], b_sq = 0;
    excite_0: 2e - 2, excite_1: e."""
    blk = MMTM(["a", "b"], [1, 1], 4.0, **kw)
    with torch.no_grad():
        blk.fc_squeeze.weight.copy_(torch.tensor([[1.0, -1.0]]))
        blk.fc_squeeze.bias.zero_()
        blk.fc_excite[0].weight.fill_(2.0)
        blk.fc_excite[0].bias.fill_(-2.0)
        blk.fc_excite[1].weight.fill_(1.0)
        blk.fc_excite[1].bias.fill_(0.0)
    return blk


def test_mmtm_recalibration_hand_case():
    # F_0 = [1, 3] (one channel, two positions) -> sq_0 = 2; F_1 = [0, 2] -> sq_1 = 1
    # e = relu(2 - 1) = 1; g_0 = sigmoid(2*1 - 2) = 0.5; g_1 = sigmoid(1) = 0.7310586
    f0, f1 = torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[0.0, 2.0]]])
    blk = _hand_mmtm().eval()
    out = blk({"a": f0, "b": f1})
    assert torch.allclose(out["a"], torch.tensor([[[0.5, 1.5]]]), atol=1e-6)
    assert torch.allclose(out["b"], torch.tensor([[[0.0, 1.4621172]]]), atol=1e-6)
    assert int(blk.steps) == 0 and float(blk.running_gate_0) == 0.0  # eval: averages untouched
    # training forwards: running averages; second batch F_0 = [2, 2] (sq 2), F_1 = [2, 2] (sq 2)
    # -> e = 0, g_0 = sigmoid(-2) = 0.1192029, g_1 = 0.5; averages (0.5+0.1192029)/2, (0.7310586+0.5)/2
    blk.train()
    blk({"a": f0, "b": f1})
    assert torch.allclose(blk.running_gate_0, torch.tensor([0.5])) and torch.allclose(blk.running_gate_1, torch.tensor([0.7310586]))
    two = torch.tensor([[[2.0, 2.0]]])
    blk.caring = 0  # curation: modality 0's gate = its running average (after this forward's update)
    out = blk({"a": two, "b": two})
    assert torch.allclose(blk.running_gate_0, torch.tensor([0.30960145]), atol=1e-6)
    assert torch.allclose(blk.running_gate_1, torch.tensor([0.6155293]), atol=1e-6)
    assert torch.allclose(out["a"], two * 0.30960145, atol=1e-6)
    assert torch.allclose(out["b"], two * 0.5, atol=1e-6)
    assert int(blk.steps) == 2
    # the code's bug: both averages from modality 0's gate
    bug = _hand_mmtm(fix_avg_bug=False).train()
    bug({"a": f0, "b": f1})
    assert float(bug.running_gate_1) == pytest.approx(0.5)


def test_mmtm_squeeze_override_turns_off_the_cross_modal_flow():
    blk = _hand_mmtm().eval()
    f0, f1 = torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[0.0, 2.0]]])
    # modality 1's squeeze replaced by 2 -> gate 0: e = relu(2 - 2) = 0 -> sigmoid(-2); gate 1 unchanged
    blk.squeeze_override = {1: torch.tensor([2.0])}
    out = blk({"a": f0, "b": f1})
    assert torch.allclose(out["a"], f0 * 0.11920292, atol=1e-6)
    assert torch.allclose(out["b"], f1 * 0.7310586, atol=1e-6)


def test_squeeze_axes():
    x = torch.arange(24.0).view(2, 3, 4)  # [B, C, L]
    assert torch.equal(squeeze(x), x.mean(2))
    v = torch.randn(2, 5)
    assert torch.equal(squeeze(v), v)
    f = torch.randn(2, 3, 4, 5, 5)  # frames [B, T, C, h, w]
    assert torch.allclose(squeeze(f, 2), f.mean(dim=(1, 3, 4)), atol=1e-6)


def test_conditional_learning_speed_and_bdr_hand_case():
    assert learning_speed(5.0, 25.0) == pytest.approx(0.2)  # theta [3, 4], grad [1, 2]
    bdr = balance_ratios([2.0, 1.0], [1.0, 1.0])  # spec §4.3 (a)
    assert bdr == pytest.approx([0.30103, 0.0], abs=1e-5)
    assert balance_ratios([0.0, 1.0], [1.0, 10.0]) == pytest.approx([0.0, -1.0])
    # the method's per-step speed: theta = [3, 4], grad = [1, 2] -> 5 / 25
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([1.0, 2.0])
    assert Greedy._speed([p]) == pytest.approx(0.2)


def test_curation_rule_hand_case():
    # d = 0.30103 > 0.01 -> caring 0; curation for exactly 5 subsequent steps, then re-evaluated
    kw = dict(start_epoch=2, epsilon=0.01, window=5)
    state = (False, 0, 0)
    assert curation_update(*state, 0.30103, 1, **kw) == (False, 0, 0)  # before start_epoch
    state = curation_update(*state, 0.30103, 2, **kw)
    assert state[:2] == (True, 0)
    modes = []
    for _ in range(5):  # d no longer matters inside the window
        modes.append(state[0])
        state = curation_update(*state, -5.0, 2, **kw)
    assert modes == [True] * 5 and state[0] is False
    assert curation_update(*state, -0.5, 2, **kw)[:2] == (True, 1)  # re-evaluated: d < 0 -> caring 1
    assert curation_update(False, 0, 0, 0.005, 3, **kw)[0] is False  # |d| <= epsilon
    assert conditional_utilisation_rate(0.8, 0.4) == pytest.approx(0.5)


def test_options_validate():
    assert GreedyOptions().validate() == []
    o = GreedyOptions()
    assert (o.epsilon, o.window, o.start_epoch, o.ratio, o.mmtm_after) == (0.01, 5, 2, 4.0, "auto")
    for bad, key in ((dict(epsilon=-1), "epsilon"), (dict(window=0), "window"), (dict(start_epoch=-1), "start_epoch"),
                     (dict(ratio=0), "ratio"), (dict(cur_every=-1), "cur_every"), (dict(mmtm_after=" "), "mmtm_after")):
        assert any(key in e for e in GreedyOptions(**bad).validate()), key


# ------------------------------------------------------------------------------ model wiring
def _trainer(over=(), bundle=None, shapes=None):
    bundle = bundle or tiny_bundle(2, shapes=shapes)
    return Trainer(tiny_config("greedy", list(over)), None, quiet=True, bundle=bundle)


def test_model_placement_and_parameter_sets():
    tr = _trainer()
    model = tr.model
    assert isinstance(model, mmbalance.MultimodalModel) and len(model.cross) == 1
    assert model.points == [{"m1": "out", "m2": "out"}]  # MLP: every stage but the first
    assert type(model.fusion).__name__ == "LateFusion"
    names = {id(p): n for n, p in model.named_parameters()}
    for i, (main_p, byp) in enumerate(tr.method.parameter_sets(model)):
        m = f"m{i + 1}"
        assert {names[id(p)] for p in main_p} == {n for n in names.values()
                                                  if n.startswith(f"encoders.{m}.") or n.startswith(f"fusion.branches.{m}.")}
        assert {names[id(p)] for p in byp} == {f"cross.0.fc_excite.{i}.weight", f"cross.0.fc_excite.{i}.bias",
                                                "cross.0.fc_squeeze.weight", "cross.0.fc_squeeze.bias"}
    # images -> small CNN: block2, block3; explicit placement
    tr2 = _trainer(shapes={"m1": (1, 8, 8), "m2": (3, 8, 8)})
    assert tr2.model.points == [{"m1": "block2", "m2": "block2"}, {"m1": "block3", "m2": "block3"}]
    assert [b.channels for b in tr2.model.cross] == [[64, 64], [128, 128]]
    tr3 = _trainer(["method.mmtm_after=hidden,out"])
    assert len(tr3.model.cross) == 2
    with pytest.raises(MethodSetupError, match="mmtm_after names \\['layer2'\\]"):
        _trainer(["method.mmtm_after=layer2"])


def test_resnet_placement_is_stages_2_to_4():
    tr = _trainer(["model.encoder=resnet18", "model.small_input=true"], shapes={"m1": (1, 8, 8), "m2": (3, 8, 8)})
    assert [p["m1"] for p in tr.model.points] == ["layer2", "layer3", "layer4"]
    assert [b.channels for b in tr.model.cross] == [[128, 128], [256, 256], [512, 512]]
    assert tr.model.cross[0].fc_squeeze.out_features == 128  # 2 * 256 / 4


def test_encoder_without_stages_is_refused():
    class Plain(nn.Module):
        out_dim = 4

        def __init__(self, d):
            super().__init__()
            self.lin = nn.Linear(d, 4)

        def forward(self, x):
            return self.lin(x)
    model = MultimodalModel.from_encoders({"a": Plain(3), "b": MLPEncoder(3, 4, 4)}, 2)
    method = mmbalance.make_method("greedy", ["a", "b"], 2)
    with pytest.raises(ModelSetupError, match="greedy.*encoder of modality 'a' \\(Plain\\) does not expose"):
        mmbalance.prepare_model(method, model)


def _grad_of_branch0_wrt_input1(tr, caring):
    model, method = tr.model, tr.method
    model.train()
    b = tiny_bundle(2)
    x = {m: b.splits["train"].inputs[m][:8].clone() for m in ("m1", "m2")}
    x["m2"].requires_grad_(True)
    method.curation_mode, method.caring = caring is not None, (caring or 0)

    class B:
        pass
    batch = B()
    batch.inputs, batch.labels = x, torch.zeros(8, dtype=torch.long)
    res = method.compute_loss(model, batch, tr.ctx)
    x0 = model.modality_logits(res.output.features)["m1"]
    (g,) = torch.autograd.grad(x0.sum(), x["m2"], allow_unused=True)
    return torch.zeros_like(x["m2"]) if g is None else g  # None: not in the graph at all


def test_curation_cuts_the_cross_modal_flow_into_the_caring_branch():
    # spec §4.3 (b): caring 0 -> branch 0's logits do not depend on modality 1's input
    tr = _trainer()
    assert float(_grad_of_branch0_wrt_input1(tr, 0).abs().max()) == 0.0
    assert float(_grad_of_branch0_wrt_input1(tr, None).abs().max()) > 0.0
    assert float(_grad_of_branch0_wrt_input1(tr, 1).abs().max()) > 0.0
    assert all(b.caring is None for b in tr.model.cross)  # reset after the forward


def test_loss_is_the_sum_of_branch_ces_and_after_backward_updates_the_rule():
    tr = _trainer(["method.start_epoch=0", "method.epsilon=0"])
    model, method = tr.model, tr.method
    batch = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    model.train()
    res = method.training_step(model, batch, tr.ctx)
    with torch.no_grad():
        model.eval()
        lg = model.modality_logits(model.encode(batch.inputs))
    assert float(res.loss.detach()) > 0 and set(res.logs) >= {"bdr_m1", "bdr_m2", "curation_m1", "curation_m2"}
    assert method.cum_bypass[0] > 0 and method.cum_main[1] > 0
    d = res.logs["bdr_m1"] - res.logs["bdr_m2"]
    assert method.curation_mode and method.caring == (0 if d > 0 else 1)
    # the loss: CE(x_0) + CE(x_1) of the branch logits (no fused CE)
    method.curation_mode = False
    res2 = method.compute_loss(model, batch, tr.ctx)
    with torch.no_grad():
        lg = model.modality_logits(model(batch.inputs).features)
        ref = F.cross_entropy(lg["m1"], batch.labels) + F.cross_entropy(lg["m2"], batch.labels)
        fused = F.cross_entropy(model(batch.inputs).logits, batch.labels)
    assert float(res2.loss.detach()) == pytest.approx(float(ref), abs=1e-6)
    assert float(res2.loss.detach()) != pytest.approx(float(fused), abs=1e-3)


def test_cumulative_speeds_by_hand():
    """cum_bypass_m / cum_main_m add ||grad||^2 / ||theta||^2 of the bypass (fc_excite[m] + fc_squeeze)
    and of the main branch (encoder m + fc_m), written out from the parameters themselves."""
    tr = _trainer(["method.start_epoch=0", "method.epsilon=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    model.train()
    cross = model.cross[0]

    def speed(params):
        return (sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None)
                / sum(float((p.detach().double() ** 2).sum()) for p in params))

    expect_byp, expect_main = [0.0, 0.0], [0.0, 0.0]
    for _ in range(2):  # cumulative over steps
        model.zero_grad(set_to_none=True)
        res = method.compute_loss(model, batch, ctx)
        res.loss.backward()
        for i, m in enumerate(("m1", "m2")):
            byp = list(cross.fc_excite[i].parameters()) + list(cross.fc_squeeze.parameters())
            main = list(model.encoders[m].parameters()) + list(model.fusion.branches[m].parameters())
            expect_byp[i] += speed(byp)
            expect_main[i] += speed(main)
        method.after_backward(model, batch, res, ctx)
        assert method.cum_bypass == pytest.approx(expect_byp, rel=1e-6)
        assert method.cum_main == pytest.approx(expect_main, rel=1e-6)
        bdr = [math.log10(b / c) for b, c in zip(expect_byp, expect_main)]
        assert [float(res.logs["bdr_m1"]), float(res.logs["bdr_m2"])] == pytest.approx(bdr, abs=1e-6)  # fp32 norms
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    assert method.curation_mode and method.caring == (0 if bdr[0] > bdr[1] else 1)


def test_noop_curation_off_is_the_plain_mmtm_step():
    """curation=false: one step equals a hand-written SGD step on CE(x_0) + CE(x_1)."""
    a = _trainer(["method.curation=false", "method.start_epoch=0", "method.epsilon=0"])
    b = _trainer(["method.curation=false", "method.start_epoch=0", "method.epsilon=0"])
    batch = next(iter(a._batches(a.bundle.train, range(16), 16)))
    for tr in (a, b):
        tr.model.train()
    a.method.training_step(a.model, batch, a.ctx)
    out = b.model(batch.inputs)
    lg = b.model.modality_logits(out.features)
    loss = F.cross_entropy(lg["m1"], batch.labels) + F.cross_entropy(lg["m2"], batch.labels)
    b.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    b.optimizer.step()
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    # and an active curation window changes the next step
    c = _trainer(["method.start_epoch=0", "method.epsilon=0"])
    c.model.train()
    c.method.training_step(c.model, batch, c.ctx)
    assert c.method.curation_mode
    a.method.training_step(a.model, batch, a.ctx)
    c.method.training_step(c.model, batch, c.ctx)
    assert any(not torch.allclose(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def test_state_round_trip_reproduces_next_step():
    state_round_trip_reproduces_next_step("greedy", ["method.start_epoch=0", "method.epsilon=0"], steps=2)


def test_three_modalities_refused():
    with pytest.raises(MethodSetupError, match="exactly 2"):
        build_method("greedy", GreedyOptions(), ["a", "b", "c"], 3)


def test_cur_logged(tmp_path):
    tr = Trainer(tiny_config("greedy", ["method.cur_every=1", "train.epochs=1"] + SMALL), tmp_path, quiet=True)
    logs = tr.method.cur(tr.model, tr.ctx)
    assert set(logs) == {"cur_x1", "cur_x2"}
    assert all(b.squeeze_override is None and b.record is None for b in tr.model.cross)


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "greedy", "--out", str(tmp_path), "--quiet", "epochs=1",
                 "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


def test_resume_is_exact_mid_curation(tmp_path):
    resume_is_exact("greedy", SMALL + ["method.start_epoch=1", "method.window=4", "method.cur_every=2"],
                    total_epochs=4, stop_after=2, tmp_path=tmp_path)


def test_zero_out_is_the_branch_with_the_other_input_zeroed():
    """Evaluation: zero_out[m] = branch m's logits from a pass with the other modality's input set
    to zeros -- not the normal pass's branch logits, which see the other modality through MMTM."""
    tr = _trainer()
    tr.model.eval()
    batch = next(iter(tr._batches(tr.bundle.test, range(16), 16)))
    with torch.no_grad():
        zl = tr.method.zero_out_logits(tr.model, tr.method.predict(tr.model, batch))
        for m, other in (("m1", "m2"), ("m2", "m1")):
            alone = dict(batch.inputs)
            alone[other] = torch.zeros_like(alone[other])
            want = tr.model.modality_logits(tr.model(alone).features)[m]
            assert torch.equal(zl[m], want)
            normal = tr.model.modality_logits(tr.model(batch.inputs).features)[m]
            assert not torch.allclose(zl[m], normal)
    tr.model.train()  # in training, predict adds nothing (no extra passes)
    assert tr.method.predict(tr.model, batch).zero_out == {}


def test_diagnostics_remove_a_modality_at_its_input_for_mid_level_fusion():
    """Greedy's encoders exchange information: encode_alone = encode with the other input zeroed,
    and diagnose forces input-level removal and leaves CUR undefined."""
    from mmbalance.diagnostics import diagnose
    tr = _trainer()
    model = tr.model.eval()
    assert model.encoders_exchange and not tiny_model_exchanges()
    batch = next(iter(tr._batches(tr.bundle.test, range(8), 8)))
    with torch.no_grad():
        alone = model.encode_alone(batch.inputs)
        for m, other in (("m1", "m2"), ("m2", "m1")):
            inputs = dict(batch.inputs)
            inputs[other] = torch.zeros_like(inputs[other])
            assert torch.equal(alone[m], model.encode(inputs)[m])
        assert not torch.allclose(alone["m1"], model.encode(batch.inputs)["m1"])
    res = diagnose(model, tr.method, tr.bundle)
    assert res["shapley"]["level"] == "input" and "forced" in res["shapley"]["level_note"]
    assert res["cur"]["defined"] is False
    assert sum(res["shapley"]["accuracy"].values()) == pytest.approx(
        res["shapley"]["v_all"]["accuracy"] - res["shapley"]["v_none"]["accuracy"], abs=1e-9)


def tiny_model_exchanges():
    return Trainer(tiny_config("joint"), None, quiet=True, bundle=tiny_bundle(2)).model.encoders_exchange

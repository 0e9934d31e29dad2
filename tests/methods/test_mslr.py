"""MSLR (Yao & Mihalcea, Findings of ACL 2022), fixed per-modality learning rates ('keep')."""
import pytest
import torch
from utils import (
    assert_same_step,
    one_step_params,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.methods import build_method
from mmbalance.training.trainer import Trainer


def _trainer(overrides=(), mods=2, out=None):
    cfg = tiny_config("mslr", ["train.epochs=1", "optim.lr=0.1"] + list(overrides))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(mods))


def test_group_learning_rates_are_factors_of_optim_lr():
    tr = _trainer(["method.lr_scale.m1=0.5", "method.lr_scale.m2=10", "method.fusion_lr_scale=2"])
    lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
    # by hand: 0.1 * 0.5, 0.1 * 10, 0.1 * 2
    assert lrs == pytest.approx({"m1": 0.05, "m2": 1.0, "fusion": 0.2})
    groups = {g["name"]: {id(p) for p in g["params"]} for g in tr.optimizer.param_groups}
    assert groups["m1"] == {id(p) for p in tr.model.encoders["m1"].parameters()}
    assert groups["m2"] == {id(p) for p in tr.model.encoders["m2"].parameters()}
    assert groups["fusion"] == {id(p) for p in tr.model.fusion.parameters()}
    # the schedule's base rates are the scaled ones (so a decay keeps the ratios)
    assert tr.scheduler.base_lrs == pytest.approx([0.05, 1.0, 0.2])


def test_missing_modality_keeps_factor_one_and_heads_follow_their_modality():
    tr = _trainer(["method.lr_scale.m2=3", "model.unimodal_heads=true"])
    by_name = {g["name"]: g for g in tr.optimizer.param_groups}
    assert by_name["m1"]["lr"] == pytest.approx(0.1) and by_name["m2"]["lr"] == pytest.approx(0.3)
    head2 = {id(p) for p in tr.model.heads["m2"].parameters()}
    assert head2 <= {id(p) for p in by_name["m2"]["params"]}
    tr = _trainer(["method.lr_scale.m2=3", "model.unimodal_heads=true", "method.heads_follow_modality=false"])
    by_name = {g["name"]: g for g in tr.optimizer.param_groups}
    head2 = {id(p) for p in tr.model.heads["m2"].parameters()}
    assert head2 <= {id(p) for p in by_name["fusion"]["params"]}


def test_each_encoder_moves_with_its_own_rate():
    # plain SGD without momentum / wd: the update of encoder m is lr * factor_m * grad, so
    # (factor 0 for m1) m1 does not move, and m2's step is 4x the joint step (factor 4)
    base = one_step_params("joint", ["optim.momentum=0", "optim.weight_decay=0"])
    init = one_step_params("joint", ["optim.lr=1e-30", "optim.momentum=0", "optim.weight_decay=0"])
    got = one_step_params("mslr", ["optim.momentum=0", "optim.weight_decay=0",
                                   "method.lr_scale.m1=0", "method.lr_scale.m2=4"])
    for n in got:
        if n.startswith("encoders.m1."):
            assert torch.allclose(got[n], init[n], atol=1e-7), n
        elif n.startswith("encoders.m2."):
            assert torch.allclose(got[n] - init[n], 4 * (base[n] - init[n]), atol=1e-6), n
        else:
            assert torch.allclose(got[n], base[n], atol=1e-7), n


def test_state_round_trip():
    state_round_trip_reproduces_next_step("mslr", ["method.lr_scale.m1=0.5", "method.lr_scale.m2=3"])


def test_three_modalities_fit():
    tr = _trainer(["method.lr_scale.m3=2"], mods=3)
    assert {g["name"]: g["lr"] for g in tr.optimizer.param_groups} == pytest.approx(
        {"m1": 0.1, "m2": 0.1, "m3": 0.2, "fusion": 0.1})
    res = tr.fit()
    assert res["test"]["accuracy"] >= 0


def test_noop_is_joint():
    assert_same_step("mslr", [], base="joint")
    assert_same_step("mslr", ["method.lr_scale.m1=1", "method.lr_scale.m2=1", "method.fusion_lr_scale=1"])


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match=r"lr_scale\.m1"):
        tiny_config("mslr", ["method.lr_scale.m1=-1"])
    with pytest.raises(ConfigError, match="strategy"):
        tiny_config("mslr", ["method.strategy=fast"])
    with pytest.raises(ConfigError, match=r"init_scale\.m1"):
        tiny_config("mslr", ["method.strategy=dynamic", "method.init_scale.m1=0"])
    with pytest.raises(ConfigError, match="memory"):
        tiny_config("mslr", ["method.strategy=dynamic", "method.memory=0"])
    cfg = tiny_config("mslr", ["method.strategy=dynamic", "method.init_scale.m9=2"])
    with pytest.raises(MethodSetupError, match="init_scale names unknown modalities"):
        build_method("mslr", cfg.method_options, ["m1", "m2"], 3)
    cfg = tiny_config("mslr", ["method.lr_scale.audoi=2"])
    with pytest.raises(MethodSetupError, match="unknown modalities"):
        build_method("mslr", cfg.method_options, ["m1", "m2"], 3)


def test_presets_av():
    cfg = resolve_config("cremad", "mslr", None, [])
    assert cfg.method_options.lr_scale == {"audio": 1.0, "visual": 10.0}
    assert cfg.method_options.init_scale == {"audio": 0.9, "visual": 1.1}  # the re-implementations' CREMA-D values


def test_user_loop_groups():
    # in a user's own loop the factors apply to the optimiser's lr too
    tr = _trainer(["method.lr_scale.m1=0.5"])
    from mmbalance.training.build import optimizer_groups
    opt = torch.optim.Adam(optimizer_groups(tr.method, tr.model, 0.01), lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.01, 0.01])


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "mslr", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                 "method.lr_scale.x2=2"]) == 0


# ------------------------------------------------------------------------------ strategy=dynamic
def test_dynamic_rate_hand_case():
    from mmbalance.functional.mslr import dynamic_rate
    # spec §4.16: init 0.9, history [0.5, 0.5, 0.55, 0.6, 0.6], current 0.6 -> 0.9 * 0.6 / 0.55
    assert dynamic_rate([0.5, 0.5, 0.55, 0.6, 0.6], 0.6, 0.9) == pytest.approx(0.981818, abs=1e-6)
    # only the last `memory` accuracies count: mean(0.5, 0.55, 0.6, 0.6) = 0.5625; 1.1 * 0.6 / 0.5625
    assert dynamic_rate([0.1, 0.5, 0.5, 0.55, 0.6, 0.6], 0.6, 1.1, memory=4) == pytest.approx(1.173333, abs=1e-6)
    assert dynamic_rate([0.5, 0.5, 0.55, 0.6], 0.6, 0.9) == 1.0  # identity until 5 are known
    assert dynamic_rate([0.0] * 5, 0.3, 0.9) == 0.9  # zero mean: ratio undefined -> init


def _evals(accs1, accs2):
    return [{"val_loss": 1.0 + i, "val_m1_zero_out_accuracy": a, "val_m2_zero_out_accuracy": b}
            for i, (a, b) in enumerate(zip(accs1, accs2))]


def test_dynamic_sets_lr_scales_from_val_accuracy_non_compounding():
    tr = _trainer(["method.strategy=dynamic", "method.apply=lr", "method.memory=2", "method.init_scale.m1=0.9",
                   "method.lr_scale.m2=10", "method.fusion_lr_scale=3"])
    # dynamic ignores the keep factors: every group starts at optim.lr
    assert [g["lr"] for g in tr.optimizer.param_groups] == pytest.approx([0.1, 0.1, 0.1])
    m, ctx = tr.method, tr.ctx
    evals = _evals([0.4, 0.6, 0.5, 0.5], [0.2, 0.2, 0.4, 0.1])
    expect = [  # by hand, memory 2
        (1.0, 1.0),  # no history
        (1.0, 1.0),  # one earlier accuracy
        (0.9 * 0.5 / 0.5, 0.4 / 0.2),  # history (0.4, 0.6) / (0.2, 0.2)
        (0.9 * 0.5 / 0.55, 0.1 / 0.3),  # history (0.6, 0.5) / (0.2, 0.4): from accuracies, not compounding
    ]
    for epoch, (ev, (c1, c2)) in enumerate(zip(evals, expect)):
        ctx.epoch, ctx.last_eval = epoch, ev
        m.on_epoch_start(tr.model, ctx)
        lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
        assert lrs == pytest.approx({"m1": 0.1 * c1, "m2": 0.1 * c2, "fusion": 0.1})
        assert m.on_epoch_end(tr.model, ctx) == pytest.approx({"coeff_m1": c1, "coeff_m2": c2})
    # the same evaluation read again (eval_every > 1) changes nothing
    m.on_epoch_start(tr.model, ctx)
    assert m.coeffs == pytest.approx({"m1": 0.9 * 0.5 / 0.55, "m2": 0.1 / 0.3})


def test_dynamic_lr_follows_the_trainers_evaluations(tmp_path):
    tr = _trainer(["method.strategy=dynamic", "method.apply=lr", "method.memory=1", "train.epochs=3",
                   "optim.name=sgd", "schedule.name=step", "schedule.step_size=2", "schedule.gamma=0.5"], out=tmp_path)
    tr.fit()
    import json
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = lambda r, mod: r[f"val_{mod}_zero_out_accuracy"]
    # epoch 2 (schedule factor 0.5): c = acc after epoch 1 / acc after epoch 0
    c = {mod: acc(rows[1], mod) / acc(rows[0], mod) for mod in ("m1", "m2")}
    assert rows[2]["coeff_m1"] == pytest.approx(c["m1"]) and rows[2]["coeff_m2"] == pytest.approx(c["m2"])
    assert rows[0]["coeff_m1"] == rows[1]["coeff_m1"] == 1.0
    lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}  # after the last schedule step (factor 0.5)
    assert lrs == pytest.approx({"m1": 0.05 * c["m1"], "m2": 0.05 * c["m2"], "fusion": 0.05})


def test_dynamic_grad_multiplies_encoder_gradients_only():
    """apply=grad (default, spec DECISION): after backward, encoder m's gradients are c_m times
    joint's; the fusion head's are joint's; the learning rates stay at optim.lr."""
    tr = _trainer(["method.strategy=dynamic", "method.memory=2", "method.init_scale.m1=0.9"])
    ref = _trainer([])
    ref.model.load_state_dict(tr.model.state_dict())
    m, ctx = tr.method, tr.ctx
    for epoch, ev in enumerate(_evals([0.4, 0.6, 0.5], [0.2, 0.2, 0.4])):
        ctx.epoch, ctx.last_eval = epoch, ev
        m.on_epoch_start(tr.model, ctx)
    c = {"m1": 0.9 * 0.5 / 0.5, "m2": 0.4 / 0.2}  # by hand, memory 2: history (0.4, 0.6) / (0.2, 0.2)
    assert m.coeffs == pytest.approx(c)
    assert [g["lr"] for g in tr.optimizer.param_groups] == pytest.approx([0.1, 0.1, 0.1])
    batch = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    grads = {}
    for t in (tr, ref):
        t.model.train()
        res = t.method.compute_loss(t.model, batch, t.ctx)
        t.optimizer.zero_grad(set_to_none=True)
        res.loss.backward()
        t.method.after_backward(t.model, batch, res, t.ctx)
        grads[id(t)] = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    g, r = grads[id(tr)], grads[id(ref)]
    for n in r:
        k = c["m1"] if n.startswith("encoders.m1.") else c["m2"] if n.startswith("encoders.m2.") else 1.0
        assert torch.allclose(g[n], k * r[n], atol=1e-7), n
    assert any(n.startswith("encoders.m2.") for n in r)


def test_dynamic_noop_is_joint():
    # before `memory` evaluations are known every multiplier is 1: joint training
    assert_same_step("mslr", ["method.strategy=dynamic", "method.init_scale.m1=3"], base="joint")


def test_dynamic_state_round_trip_and_resume(tmp_path):
    from utils import resume_is_exact
    state_round_trip_reproduces_next_step("mslr", ["method.strategy=dynamic", "method.memory=1"], epoch=2)
    full, _ = resume_is_exact("mslr", ["method.strategy=dynamic", "method.memory=1", "optim.lr=0.1",
                                       "data.n_train=96", "data.n_val=48", "data.n_test=48"],
                              total_epochs=4, stop_after=2, tmp_path=tmp_path)
    import json
    rows = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    coeffs = [v for r in rows[2:] for k, v in r.items() if k.startswith("coeff_")]
    assert coeffs and any(c != 1.0 for c in coeffs)  # the mechanism ran after the resume


def test_dynamic_three_modalities_and_cli(tmp_path):
    res = _trainer(["method.strategy=dynamic", "method.memory=1", "train.epochs=3"], mods=3).fit()
    assert res["test"]["accuracy"] >= 0
    assert main(["train", "--dataset", "synthetic", "--method", "mslr", "--out", str(tmp_path), "--quiet",
                 "epochs=2", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                 "method.strategy=dynamic", "method.memory=1"]) == 0

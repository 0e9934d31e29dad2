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
        tiny_config("mslr", ["method.strategy=dynamic"])
    cfg = tiny_config("mslr", ["method.lr_scale.audoi=2"])
    with pytest.raises(MethodSetupError, match="unknown modalities"):
        build_method("mslr", cfg.method_options, ["m1", "m2"], 3)


def test_presets_av():
    cfg = resolve_config("cremad", "mslr", None, [])
    assert cfg.method_options.lr_scale == {"audio": 1.0, "visual": 10.0}


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

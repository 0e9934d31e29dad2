"""ReconBoost (Hua et al., ICML 2024): boosting loss, schedule, phases, optimisers, resume."""
import math

import pytest
import torch
import torch.nn.functional as F
from utils import (
    batch_of,
    resume_is_exact,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.errors import MethodSetupError
from mmbalance.functional.reconboost import (
    BOOST,
    CORRECT,
    boosting_loss,
    ensemble_size,
    phase_of,
    reconcilement_loss,
    stage_lr,
)
from mmbalance.methods import build_method
from mmbalance.training.trainer import Trainer

PLAIN = ["optim.momentum=0", "optim.weight_decay=0"]


# ------------------------------------------------------------------------------------ pure math
def test_boosting_loss_spec_hand_case():
    # K = 6, w1 = 5, w2 = 1, q = 0.8, p_m(y) = 0.5: l = -(1/6)(5 - 0.8) ln 0.5 = 0.485203
    f_m = torch.tensor([[math.log(5.0), 0, 0, 0, 0, 0]])  # softmax[0] = 5 / 10
    others = torch.tensor([[math.log(20.0), 0, 0, 0, 0, 0]])  # softmax[0] = 20 / 25
    y = torch.tensor([0])
    assert boosting_loss(f_m, others, y, 5.0, 1.0).item() == pytest.approx(0.485203, abs=1e-6)
    # without the code's 1/K: 6 x 0.485203
    assert boosting_loss(f_m, others, y, 5.0, 1.0, class_mean=False).item() == pytest.approx(2.911218, abs=1e-5)
    # empty ensemble (the code's constant c0, one column): q = 1 -> -(1/6)(5 - 1) ln 0.5 = 0.462098
    assert boosting_loss(f_m, None, y, 5.0, 1.0).item() == pytest.approx(0.462098, abs=1e-6)
    # swapping w1 and w2: -(1/6)(1 - 4) ln 0.5 = -0.346574 (a term of the wrong sign is visible)
    assert boosting_loss(f_m, others, y, 1.0, 5.0).item() == pytest.approx(-0.346574, abs=1e-6)


def test_boosting_loss_detaches_the_ensemble_and_is_per_sample():
    f_m = torch.zeros(2, 3, requires_grad=True)
    others = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    loss = boosting_loss(f_m, others, y, 2.0, 1.0)
    # row 0: q = 1/3 -> (2 - 1/3) ln 3 / 3 = 5 ln 3 / 9 = 0.610340; row 1: q = 1/2 -> 1.5 ln 3 / 3 = 0.549306
    assert loss.tolist() == pytest.approx([0.610340, 0.549306], abs=1e-6)
    loss.sum().backward()
    assert others.grad is None and f_m.grad is not None


def test_reconcilement_loss_hand_case_and_gradient_switch():
    f_m = torch.tensor([[0.0, 0.0]], requires_grad=True)  # p = [0.5, 0.5]
    prev = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # p = [0.75, 0.25]
    ga = reconcilement_loss(f_m, prev)  # ((0.25)^2 + (0.25)^2) / 2
    assert ga.item() == pytest.approx(0.0625, abs=1e-7)
    ga.backward()
    # d/dl0 of mean((p - t)^2) with p = softmax(l): (p0 - t0) p0 (1 - p0) - (p1 - t1) p0 p1
    # = (-0.25)(0.25) - (0.25)(0.25) = -0.125; d/dl1 = +0.125
    assert f_m.grad[0].tolist() == pytest.approx([-0.125, 0.125], abs=1e-7)
    assert prev.grad is None
    code = reconcilement_loss(f_m, prev, grad=False)  # the released code: a constant
    assert code.item() == pytest.approx(0.0625) and code.grad_fn is None


def test_phase_schedule_spec_case():
    # E_b = E_c = 4, M = 2: epochs 0-3 boost audio, 4-7 correct, 8-11 boost visual, 12-15 correct, ...
    got = [phase_of(e, 4, 4, 2) for e in range(17)]
    assert [p.name for p in got[:16]] == [BOOST] * 4 + [CORRECT] * 4 + [BOOST] * 4 + [CORRECT] * 4
    assert [p.modality for p in got] == [0] * 8 + [1] * 8 + [0]
    assert [p.stage for p in got] == [0] * 8 + [1] * 8 + [2]
    assert [p.epoch_in_phase for p in got[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    # M = 3, E_b = 2, E_c = 1: stage 3 boosts the first modality again
    assert [(p.stage, p.name, p.modality) for p in (phase_of(e, 2, 1, 3) for e in (2, 3, 9))] == \
        [(0, CORRECT, 0), (1, BOOST, 1), (3, BOOST, 0)]
    with pytest.raises(ValueError, match="boost_epochs >= 1"):
        phase_of(0, 0, 4, 2)


def test_ensemble_grows_as_learners_are_added():
    # stage 0: empty while boosting, audio after; stage 1: audio while boosting visual, both after
    assert [ensemble_size(s, n, 2) for s in (0, 1, 2) for n in (BOOST, CORRECT)] == [0, 1, 1, 2, 2, 2]
    assert [ensemble_size(s, BOOST, 3) for s in range(5)] == [0, 1, 2, 3, 3]


def test_stage_lr():
    assert stage_lr(0.01, 29, 30, 0.1) == pytest.approx(0.01)
    assert stage_lr(0.01, 30, 30, 0.1) == pytest.approx(0.001)
    assert stage_lr(0.01, 65, 30, 0.1) == pytest.approx(1e-4)
    assert stage_lr(0.01, 500, 0, 0.1) == pytest.approx(0.01)


def test_options_validate_and_presets():
    from mmbalance.config import resolve_config
    from mmbalance.errors import ConfigError
    for bad, msg in (("boost_epochs=0", "boost_epochs"), ("w2=-1", "w2"), ("alpha=-0.5", "alpha"),
                     ("boost_lr=0", "boost_lr"), ("lr_decay=0", "lr_decay"), ("correct_epochs=-1", "correct_epochs")):
        with pytest.raises(ConfigError, match=msg):
            resolve_config("synthetic", "reconboost", None, [f"method.{bad}"])
    o = resolve_config("synthetic", "reconboost").method_options
    assert (o.boost_epochs, o.correct_epochs, o.w1, o.w2, o.alpha, o.ga_grad, o.class_mean) == \
        (4, 4, 5.0, 1.0, 0.5, True, True)
    from mmbalance.methods.reconboost import RECONBOOST_PRESETS
    assert RECONBOOST_PRESETS["ave"]["method"]["w1"] == 4.0
    for ds in ("cremad", "ave"):  # the code's m_lr = e_lr = 0.01
        assert RECONBOOST_PRESETS[ds]["method"]["boost_lr"] == RECONBOOST_PRESETS[ds]["method"]["correct_lr"] == 0.01
    assert o.boost_lr is None and o.correct_lr is None  # elsewhere: optim.lr


def test_unequal_feature_sizes_are_refused():
    from mmbalance.methods.reconboost import BoostEnsemble
    with pytest.raises(MethodSetupError, match="same size"):
        BoostEnsemble({"a": 8, "b": 6}, 3)


# ------------------------------------------------------------------------------------ wiring
def _trainer(overrides=(), mods=2, out=None, epochs=4):
    cfg = tiny_config("reconboost", [f"train.epochs={epochs}", "method.boost_epochs=2", "method.correct_epochs=1"]
                      + list(overrides))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(num_modalities=mods, n=32))


def _snap(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _step(tr, epoch, batch):
    tr.ctx.epoch = epoch
    tr.method.on_epoch_start(tr.model, tr.ctx)
    tr.model.train()
    return tr.method.training_step(tr.model, batch, tr.ctx)


@pytest.mark.parametrize("ga_grad", [True, False])
def test_boosting_step_matches_the_formula_and_moves_only_encoder_m_and_head(ga_grad):
    """Stage 1 (epoch 3 with E_b = 2, E_c = 1) boosts m2 against F_-m = beta f_m1, with the GA term
    on m1's learner. Plain SGD: new = old - lr * grad of the loss written out here by hand."""
    tr = _trainer(PLAIN + ["method.w1=3", "method.w2=2", "method.alpha=0.7", f"method.ga_grad={str(ga_grad).lower()}"])
    model, K = tr.model, 3
    batch = batch_of(tr.bundle, n=16)
    with torch.no_grad():
        model.fusion.beta.fill_(1.3)
    before = _snap(model)
    # the expected gradient, by hand, on a copy of the model
    import copy
    ref = copy.deepcopy(model)
    z1 = ref.encoders["m1"](batch.inputs["m1"]).detach()
    f1 = ref.fusion.head(z1).detach()
    f2 = ref.fusion.head(ref.encoders["m2"](batch.inputs["m2"]))
    q = torch.softmax(1.3 * f1, 1)[torch.arange(16), batch.labels]
    logp = torch.log_softmax(f2, 1)[torch.arange(16), batch.labels]
    p2 = torch.softmax(f2, 1) if ga_grad else torch.softmax(f2, 1).detach()
    loss = (-(3.0 - 2.0 * q) * logp / K).mean() + 0.7 * ((p2 - torch.softmax(f1, 1)) ** 2).mean()
    params = dict(ref.named_parameters())
    names = [n for n in params if n.startswith(("encoders.m2.", "fusion.head."))]
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    res = _step(tr, 3, batch)
    assert res.loss.item() == pytest.approx(loss.item(), abs=1e-6)
    lr = tr.method.optimizers()["boost"].param_groups[0]["lr"]
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p, before[n] - lr * grads[n], atol=1e-6), n
        else:  # encoder m1 and beta untouched
            assert torch.equal(p, before[n]), n
    assert set(res.logs) == {"loss_boost", "loss_ga", "beta"}


def test_stage_zero_boosts_against_an_empty_ensemble_without_ga():
    tr = _trainer(PLAIN)
    batch = batch_of(tr.bundle, n=16)
    f1 = tr.model.fusion.head(tr.model.encoders["m1"](batch.inputs["m1"]))
    expected = (-(5.0 - 1.0) / 3 * torch.log_softmax(f1, 1)[torch.arange(16), batch.labels]).mean()  # q = 1
    res = _step(tr, 0, batch)
    assert res.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert "loss_ga" not in res.logs
    assert int(tr.model.fusion.active) == 1  # evaluation: the stage's ensemble (m1)


def test_correction_step_is_ce_of_the_ensemble_over_encoders_head_and_beta():
    tr = _trainer(PLAIN)
    model = tr.model
    batch = batch_of(tr.bundle, n=16)
    before = _snap(model)
    import copy
    ref = copy.deepcopy(model)  # stage 0's correction: only m1 is in the ensemble
    logits = ref.fusion.beta * ref.fusion.head(ref.encoders["m1"](batch.inputs["m1"]))
    loss = F.cross_entropy(logits, batch.labels)
    params = dict(ref.named_parameters())
    names = [n for n in params if not n.startswith("encoders.m2.")]
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    res = _step(tr, 2, batch)  # epoch 2 = stage 0's correction
    assert tr.method.opt_key == [0, CORRECT]
    assert res.loss.item() == pytest.approx(loss.item(), abs=1e-6)
    lr = tr.method.optimizers()["correct"].param_groups[0]["lr"]
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p, before[n] - lr * grads[n], atol=1e-6), n
        else:
            assert torch.equal(p, before[n]), n
    assert not torch.equal(model.fusion.beta, before["fusion.beta"])
    # stage 1's correction holds both modalities: every encoder moves
    before = _snap(model)
    _step(tr, 5, batch)
    assert int(model.fusion.active) == 2
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("encoders."))


def test_fresh_optimiser_per_phase_kept_within_a_phase_and_the_main_one_idle():
    tr = _trainer()
    batch = batch_of(tr.bundle, n=16)
    _step(tr, 0, batch)
    first = tr.method.optimizers()["boost"]
    assert first.state  # momentum buffers exist
    _step(tr, 1, batch)
    assert tr.method.optimizers()["boost"] is first  # same phase: same optimiser
    _step(tr, 2, batch)
    corr = tr.method.optimizers()
    assert list(corr) == ["correct"] and len(corr["correct"].state) == sum(
        1 for p in tr.model.parameters() if p.grad is not None)
    _step(tr, 3, batch)  # stage 1: a new boosting optimiser, fresh (its state only from this one step)
    again = tr.method.optimizers()["boost"]
    assert again is not first
    ids = {id(p) for g in again.param_groups for p in g["params"]}
    assert ids == {id(p) for p in list(tr.model.encoders["m2"].parameters()) + list(tr.model.fusion.head.parameters())}
    assert not tr.ctx.optimizer.state  # the run's main optimiser is never stepped


def test_lr_follows_options_stage_decay_and_run_schedule():
    tr = _trainer(["method.boost_lr=0.2", "method.correct_lr=0.3", "method.lr_decay_stages=1", "method.lr_decay=0.5",
                   "schedule.name=step", "schedule.step_size=1", "schedule.gamma=0.1"])
    ctx = tr.ctx
    batch = batch_of(tr.bundle, n=16)
    _step(tr, 0, batch)
    assert tr.method.optimizers()["boost"].param_groups[0]["lr"] == pytest.approx(0.2)
    tr.scheduler.step()  # the run's schedule: x0.1 per epoch
    tr.scheduler.step()
    _step(tr, 2, batch)  # stage 0 correction, run factor 0.01
    assert tr.method.optimizers()["correct"].param_groups[0]["lr"] == pytest.approx(0.3 * 0.01)
    tr.scheduler.step()
    _step(tr, 3, batch)  # stage 1 boost: decay 0.5, run factor 0.001
    assert tr.method.optimizers()["boost"].param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * 0.001)
    assert ctx.optimizer.param_groups[0]["lr"] == pytest.approx(tr.cfg.optim.lr * 0.001)


def test_zero_out_and_predict_use_the_learners():
    tr = _trainer()
    model = tr.model
    batch = batch_of(tr.bundle, "val", n=8)
    _step(tr, 0, batch_of(tr.bundle, n=16))
    model.eval()
    out = tr.method.predict(model, batch)
    h = {m: model.fusion.head(model.encoders[m](batch.inputs[m])) for m in ("m1", "m2")}
    assert torch.allclose(out.logits, model.fusion.beta * h["m1"], atol=1e-6)  # stage 0: m1 only
    zo = tr.method.zero_out_logits(model, out)
    assert torch.allclose(zo["m2"], h["m2"], atol=1e-6)
    model.fusion.active.fill_(2)
    assert torch.allclose(tr.method.predict(model, batch).logits, model.fusion.beta * (h["m1"] + h["m2"]), atol=1e-6)


# ------------------------------------------------------------------------------------ harness
@pytest.mark.parametrize("epoch", [1, 3])  # mid boosting (stage 0 and stage 1 with the GA term)
def test_state_round_trip_reproduces_next_step(epoch):
    state_round_trip_reproduces_next_step("reconboost", ["method.boost_epochs=2", "method.correct_epochs=1"],
                                          epoch=epoch)


def test_state_round_trip_mid_correction():
    state_round_trip_reproduces_next_step("reconboost", ["method.boost_epochs=1", "method.correct_epochs=2"], epoch=1)


def test_three_modalities_cycle_through_every_encoder():
    tr = _trainer(mods=3, epochs=9)
    batch = batch_of(tr.bundle, n=16)
    moved = []
    for epoch in (0, 3, 6):  # the boosting epoch of stages 0, 1, 2
        before = _snap(tr.model)
        _step(tr, epoch, batch)
        moved.append(sorted({n.split(".")[1] for n, p in tr.model.named_parameters()
                             if n.startswith("encoders.") and not torch.equal(p, before[n])}))
    assert moved == [["m1"], ["m2"], ["m3"]]
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0


def test_noop_boosting_is_unimodal_ce_and_correction_is_joint_ce():
    """w1 = 1, w2 = 0, alpha = 0, class_mean = false: boosting is CE(head(z_m), y) on encoder m and
    the head -- the step of a plain optimiser of the run's config on that loss."""
    over = ["method.w1=1", "method.w2=0", "method.alpha=0", "method.class_mean=false"]
    for epoch, mods in ((3, ["m2"]), (2, ["m1"])):
        tr = _trainer(over)
        model = tr.model
        batch = batch_of(tr.bundle, n=16)
        import copy
        ref = copy.deepcopy(model)
        opt = tr.ctx.make_optimizer(ref.parameters())
        if epoch == 3:  # boosting m2
            loss = F.cross_entropy(ref.fusion.head(ref.encoders["m2"](batch.inputs["m2"])), batch.labels)
        else:  # correction of stage 0: joint CE of the ensemble (m1)
            loss = F.cross_entropy(ref.fusion.beta * ref.fusion.head(ref.encoders["m1"](batch.inputs["m1"])),
                                   batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _step(tr, epoch, batch)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6), (epoch, n)


def test_cli_end_to_end(tmp_path):
    from mmbalance.cli import main
    assert main(["train", "--dataset", "synthetic", "--method", "reconboost", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


@pytest.mark.parametrize("stop_after", [1, 4])  # mid stage-0 boosting; mid stage-1 boosting (after a correction)
def test_resume_is_exact_mid_stage(tmp_path, stop_after):
    resume_is_exact("reconboost", ["data.n_train=96", "data.n_val=32", "data.n_test=32", "method.boost_epochs=2",
                                   "method.correct_epochs=1", "model.feature_dim=8"],
                    total_epochs=5, stop_after=stop_after, tmp_path=tmp_path)


def test_fp16_loss_scaling_is_refused():
    method = build_method("reconboost", None, ["a", "b"], 3)
    import types
    with pytest.raises(MethodSetupError, match="fp16"):
        method.setup(None, types.SimpleNamespace(grad_scaler=object()))

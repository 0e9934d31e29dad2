"""DI-MML (Fan et al., ACM MM 2024): L_DUC, dimension selection, ensemble, stage-1 loss wiring, the
stage switch, state, M=3, no-op, CLI, exact resume across the stage boundary."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from utils import (
    assert_same_step,
    batch_of,
    resume_is_exact,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.functional.di_mml import (
    confidence_ensemble,
    dimension_accuracy,
    duc_loss,
    exclusive_dimensions,
    top_dimensions,
)
from mmbalance.training.trainer import Trainer


# ------------------------------------------------------------------------------- pure math
def test_duc_hand_case():
    # spec §4.22: z_v = z_a = I, A = {0, 1}, V = {}, tau = 1 -> each row -log(e / (e + 1)) = 0.313262
    za = torch.eye(2, requires_grad=True)
    zv = torch.eye(2, requires_grad=True)
    excl = {"a": torch.tensor([True, True]), "v": torch.tensor([False, False])}
    loss = duc_loss({"a": za, "v": zv}, excl, tau=1.0)
    assert float(loss.detach()) == pytest.approx(0.313262, abs=1e-6)
    ga, gv = torch.autograd.grad(loss, [za, zv], allow_unused=True)
    assert ga is None  # unidirectional: nothing reaches the modality whose dimensions are learnt
    assert gv is not None and gv.abs().sum() > 0
    # raw dot products, no normalisation: z_v = 2 I -> -log(e^2 / (e^2 + 1)) = 0.126928
    assert float(duc_loss({"a": torch.eye(2), "v": 2 * torch.eye(2)}, excl, 1.0)) == pytest.approx(0.126928, abs=1e-6)
    # temperature: tau = 2 -> -log(e^.5 / (e^.5 + 1)) = 0.474077
    assert float(duc_loss({"a": torch.eye(2), "v": torch.eye(2)}, excl, 2.0)) == pytest.approx(0.474077, abs=1e-6)
    # both directions: V = A = {0, 1} -> two terms
    both = {"a": torch.tensor([True, True]), "v": torch.tensor([True, True])}
    assert float(duc_loss({"a": torch.eye(2), "v": torch.eye(2)}, both, 1.0)) == pytest.approx(2 * 0.313262, abs=1e-6)
    # empty sets add nothing (DECISION; the code would add log B)
    none = {"a": torch.tensor([False, False]), "v": torch.tensor([False, False])}
    assert float(duc_loss({"a": torch.eye(2), "v": torch.eye(2)}, none, 1.0)) == 0.0
    # only the exclusive dimensions enter: dimension 1 of a is masked out
    only0 = {"a": torch.tensor([True, False]), "v": torch.tensor([False, False])}
    z = torch.tensor([[1.0, 9.0], [0.0, -9.0]])
    # logits q_i k_j on dim 0: [[1, 0], [0, 0]] -> rows: -log(e/(e+1)) = 0.313262 and -log(1/2) = 0.693147
    assert float(duc_loss({"a": z, "v": z.clone()}, only0, 1.0)) == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-6)


def test_dimension_selection_hand_case():
    z = torch.tensor([[0.0, 5.0, 1.0], [1.0, 5.0, 0.0], [10.0, 5.0, 0.0], [11.0, 5.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    # dim 0: means 0.5, 10.5 -> all nearest correct (1.0); dim 1: constant, tie -> class 0 (0.5);
    # dim 2: means 0.5, 0.5 -> tie -> class 0 (0.5)
    acc = dimension_accuracy(z, y, 2)
    assert acc.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert top_dimensions(acc).tolist() == [True, False, False]  # above the mean 0.6667
    # strictly above the mean (code: acc > mean): a dimension at the mean is not a top one
    assert top_dimensions(torch.tensor([1.0, 0.5, 0.75])).tolist() == [True, False, False]
    assert top_dimensions(torch.tensor([0.5, 0.5])).tolist() == [False, False]
    # a class without rows is never nearest
    assert dimension_accuracy(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 0]), 3).tolist() == [1.0]
    tops = {"a": torch.tensor([True, False, True]), "v": torch.tensor([False, False, True]),
            "t": torch.tensor([False, True, False])}
    ex = exclusive_dimensions({"a": tops["a"], "v": tops["v"]})
    assert ex["a"].tolist() == [True, False, False] and ex["v"].tolist() == [False, False, False]
    ex3 = exclusive_dimensions(tops)
    assert ex3["t"].tolist() == [False, True, False] and ex3["a"].tolist() == [True, False, False]


def test_confidence_ensemble_hand_case():
    # o1 = [2, 0] (c1 = 0.880797), o2 = [0, 0] (c2 = 0.5): w1 = softmax([c1, c2] / T)_1
    o1, o2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert confidence_ensemble([o1, o2], 1.0).tolist()[0] == pytest.approx([1.188131, 0.0], abs=1e-6)  # w1 = 0.594065
    assert confidence_ensemble([o1, o2], 3.0).tolist()[0] == pytest.approx([1.063381, 0.0], abs=1e-6)  # w1 = 0.531691
    # per sample
    both = confidence_ensemble([torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])], 1.0)
    assert both[0, 0] == pytest.approx(1.188131, abs=1e-6) and both[1, 0] == pytest.approx(1.188131, abs=1e-6)


# ------------------------------------------------------------------------------- method
def _trainer(overrides=(), mods=2, out=None, bundle=None):
    return Trainer(tiny_config("di_mml", ["train.epochs=2"] + list(overrides)), out, quiet=True,
                   bundle=bundle or tiny_bundle(mods))


def test_options_and_setup_errors():
    for bad in ("method.stage2_epochs=-2", "method.duc_epoch=-2", "method.tau=0", "method.align_weight=-1",
                "method.duc_weight=-1", "method.ensemble_temperature=0"):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "di_mml", None, [bad])
    tr = _trainer(["method.stage2_epochs=2"])
    tr.ctx.epoch = 0
    with pytest.raises(MethodSetupError, match="stage2_epochs"):
        tr.method.on_epoch_start(tr.model, tr.ctx)
    from mmbalance.models.encoders import MLPEncoder
    from mmbalance.models.multimodal import MultimodalModel
    model = MultimodalModel.from_encoders({"m1": MLPEncoder(6, 8, 8), "m2": MLPEncoder(6, 8, 4)}, num_classes=3)
    with pytest.raises(MethodSetupError, match="feature sizes"):
        Trainer(tiny_config("di_mml"), None, quiet=True, bundle=tiny_bundle(2), model=model)


def test_boundaries():
    m = _trainer().method
    assert m.boundaries(170) == (150, 20)  # the code's 150 + 20 epochs, L_DUC from epoch 20
    assert m.boundaries(20) == (18, 2)
    assert m.boundaries(1) == (1, 1)
    m.options.stage2_epochs, m.options.duc_epoch = 3, 0
    assert m.boundaries(10) == (7, 0)


def _losses_by_hand(model, batch, exclusive, tau, w_align=1.0, w_duc=1.0):
    feats = model.encode(batch.inputs)
    loss = 0.0
    for m in ("m1", "m2"):
        loss += float(F.cross_entropy(model.heads[m](feats[m]), batch.labels))
        loss += w_align * float(F.cross_entropy(model.extras["aligner"](feats[m]), batch.labels))
    if exclusive:
        for m, j in (("m1", "m2"), ("m2", "m1")):
            mask = exclusive[m]
            if mask.any():
                logits = feats[j][:, mask] @ feats[m][:, mask].T / tau
                loss += w_duc * float(F.cross_entropy(logits, torch.arange(len(batch))))
    return loss


def test_stage1_selection_and_loss_wiring():
    tr = _trainer(["train.epochs=6", "method.stage2_epochs=1", "method.duc_epoch=2", "method.tau=3",
                   "method.align_weight=0.5", "method.duc_weight=2"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle)
    for e in (0, 1):
        ctx.epoch = e
        method.on_epoch_start(model, ctx)
        assert method.exclusive == {} and method.stage == 1
    res = method.compute_loss(model, batch, ctx)
    assert "loss_duc" not in res.logs
    with torch.no_grad():
        assert float(res.loss) == pytest.approx(_losses_by_hand(model, batch, {}, 3.0, 0.5, 2.0), rel=1e-5)
    ctx.epoch = 2
    method.on_epoch_start(model, ctx)
    # the selection: the training split's features through the (separately tested) functions
    model.eval()
    with torch.no_grad():
        b = batch_of(tr.bundle, n=len(tr.bundle.train))
        feats = model.encode(b.inputs)
    model.train()
    tops = {m: top_dimensions(dimension_accuracy(feats[m], b.labels, 3)) for m in ("m1", "m2")}
    expect = exclusive_dimensions(tops)
    assert all(torch.equal(method.exclusive[m], expect[m]) for m in ("m1", "m2"))
    assert any(bool(expect[m].any()) for m in ("m1", "m2"))
    logs = method.on_epoch_end(model, ctx)
    assert logs == {f"dims_{m}": float(expect[m].sum()) for m in ("m1", "m2")}
    res = method.compute_loss(model, batch, ctx)
    assert "loss_duc" in res.logs
    with torch.no_grad():
        assert float(res.loss) == pytest.approx(_losses_by_hand(model, batch, expect, 3.0, 0.5, 2.0), rel=1e-5)
    # the selection is made once: later epochs keep it
    saved = {m: t.clone() for m, t in method.exclusive.items()}
    method.training_step(model, batch, ctx)
    ctx.epoch = 3
    method.on_epoch_start(model, ctx)
    assert all(torch.equal(method.exclusive[m], saved[m]) for m in saved)
    # stage-1 prediction: heads only
    with torch.no_grad():
        out = method.predict(model, batch)
        z = model.encode(batch.inputs)
        assert torch.allclose(out.logits, confidence_ensemble([model.heads["m1"](z["m1"]), model.heads["m2"](z["m2"])], 1.0))
        assert torch.allclose(method.zero_out_logits(model, out)["m2"], model.heads["m2"](z["m2"]))


def test_stage_switch_trains_the_fusion_head_only():
    bundle = tiny_bundle(shapes={"m1": (1, 8, 8), "m2": (6,)})  # m1: small CNN with BatchNorm
    tr = _trainer(["train.epochs=4", "method.stage2_epochs=2", "method.ensemble_temperature=3"], bundle=bundle)
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    batch = batch_of(bundle)
    method.training_step(model, batch, ctx)
    fusion_before = [p.detach().clone() for p in model.fusion.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(fusion_before, model.fusion.parameters()))  # stage 1: untouched
    old_opt = ctx.optimizer
    ctx.epoch = 2
    method.on_epoch_start(model, ctx)
    assert method.stage == 2 and ctx.optimizer is not old_opt and len(ctx.optimizer.state) == 0
    assert [g["name"] for g in ctx.optimizer.param_groups] == ["unimodal", "fusion"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    res = method.training_step(model, batch, ctx)
    after = model.state_dict()
    for k in after:
        if k.startswith("fusion."):
            assert not torch.equal(after[k], state[k]), k
        else:  # encoders (BN running statistics included: eval mode), heads, aligner
            assert torch.equal(after[k], state[k]), k
    with torch.no_grad():
        model.eval()
        z = model.encode(batch.inputs)
        fused_before = model.fuse(z)
        assert res.logs["stage"] == 2.0
        out = method.predict(model, batch)
        expect = confidence_ensemble([model.heads["m1"](z["m1"]), model.heads["m2"](z["m2"]), fused_before], 3.0)
        assert torch.allclose(out.logits, expect)
    # a later stage-2 epoch neither resets the optimiser again nor unfreezes
    opt = ctx.optimizer
    ctx.epoch = 3
    method.on_epoch_start(model, ctx)
    assert ctx.optimizer is opt and not any(p.requires_grad for p in model.encoders.parameters())


def test_state_round_trip():
    # stage 1 with L_DUC active (the selection comes from the checkpoint)
    state_round_trip_reproduces_next_step("di_mml", ["method.duc_epoch=0", "method.stage2_epochs=0", "method.tau=1"])
    # stage 2 (the restored run holds the same optimiser layout)
    state_round_trip_reproduces_next_step("di_mml", ["train.epochs=3", "method.stage2_epochs=1"], epoch=2)


def test_three_modalities(tmp_path):
    tr = _trainer(["train.epochs=3", "method.stage2_epochs=1", "method.duc_epoch=1", "method.tau=1"], mods=3,
                  out=tmp_path)
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "dims_m3" in rows[1] and "loss_duc" in rows[1] and rows[2]["stage"] == 2.0


def test_noop_is_the_unimodal_ensemble():
    assert_same_step("di_mml", ["method.align_weight=0", "method.duc_weight=0"], base="ensemble")
    with pytest.raises(AssertionError):
        assert_same_step("di_mml", [], base="ensemble")


def test_presets():
    # spec §4.22: tau 50 (CREMA-D), 10 (AVE, UCF); T2 1 (CREMA-D, UCF), 3 (AVE)
    from mmbalance.config import resolve_config
    crema = resolve_config("cremad", "di_mml").method_options
    assert crema.tau == 50.0 and crema.ensemble_temperature == 1.0
    ave = resolve_config("ave", "di_mml").method_options
    assert ave.tau == 10.0 and ave.ensemble_temperature == 3.0
    ucf = resolve_config("ucf101", "di_mml").method_options
    assert ucf.tau == 10.0 and ucf.ensemble_temperature == 1.0


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "di_mml", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_is_exact_across_the_stage_switch(tmp_path, stop_after):
    # stage 1: epochs 0-2 (L_DUC from 1), stage 2: epochs 3-4; stopped right before the switch (3)
    # and in the middle of stage 2 (4)
    over = ["data.n_train=200", "data.n_val=60", "data.n_test=60", "data.batch_size=32", "method.stage2_epochs=2",
            "method.duc_epoch=1", "method.tau=5", "optim.name=adam", "optim.lr=0.01", "schedule.name=step",
            "schedule.step_size=1"]
    resume_is_exact("di_mml", over, total_epochs=5, stop_after=stop_after, tmp_path=tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert rows[3]["lr"] == pytest.approx(rows[0]["lr"])  # fresh schedule at the switch

"""G-Blending (Wang, Tran, Feiszli, CVPR 2020): spec baselines.md §4.5."""
import json

import pytest
import torch
from utils import (
    assert_same_step,
    resume_is_exact,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.errors import ConfigError
from mmbalance.functional.gblend import blend_weights, blended_loss
from mmbalance.training.trainer import Trainer

SMALL = ["method.warmup_epochs=1", "method.super_epoch=2"]


def _trainer(overrides=(), mods=2, n=48, out=None):
    cfg = tiny_config("gblend", ["optim.lr=0.05"] + list(overrides))
    return Trainer(cfg, out, quiet=True, data=tiny_bundle(mods, n=n))


def test_weights_hand_case():
    # spec §4.5: heads (a, v, fused)
    r = blend_weights([1.0, 1.2, 0.9], [1.1, 1.3, 1.0], [0.6, 0.9, 0.3], [0.9, 1.1, 0.8])
    assert r["dG"].tolist() == pytest.approx([0.2, 0.2, 0.2])
    assert r["dO"].tolist() == pytest.approx([0.2, 0.1, 0.4])
    assert r["raw"].tolist() == pytest.approx([5.0, 20.0, 1.25])
    assert r["weights"].tolist() == pytest.approx([0.190476, 0.761905, 0.047619], abs=1e-6)
    # a head whose val loss rose: dG = 0 -> raw 1e-8 -> weight 1e-8 / (5 + 20 + 1e-8)
    r = blend_weights([1.0, 1.2, 0.9], [1.1, 1.3, 1.0], [0.6, 0.9, 0.3], [0.9, 1.1, 1.2])
    assert r["raw"][2] == pytest.approx(1e-8) and r["weights"][2] == pytest.approx(1e-8 / 25.0)
    # dO = 0 (no change of the gap): dG / 1e-8, clamped denominator
    r = blend_weights([1.0, 1.0], [1.2, 1.2], [0.9, 0.8], [1.1, 1.1])
    assert r["raw"][0] == pytest.approx(0.1 / 1e-8) and r["dO"][1].item() == pytest.approx(0.1)


def test_blended_loss_is_the_weighted_mean():
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    out = blended_loss(losses, torch.tensor([0.5, 0.25, 0.25]))
    assert out.item() == pytest.approx(0.5 + 0.5 + 1.0)
    out.backward()
    assert losses.grad.tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert blended_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])).item() == pytest.approx(2.0)


def test_loss_wiring_uses_each_heads_weight():
    tr = _trainer()
    m = tr.method
    m.weights = [0.2, 0.7, 0.1]  # m1, m2, fused
    batch = next(iter(tr.ctx.train_batches(batch_size=16)))
    res = m.compute_loss(tr.model, batch, tr.ctx)
    out = tr.model(batch.inputs)
    ce = torch.nn.functional.cross_entropy
    want = 0.2 * ce(out.unimodal_logits["m1"], batch.labels) + 0.7 * ce(out.unimodal_logits["m2"], batch.labels) \
        + 0.1 * ce(out.logits, batch.labels)
    assert res.loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_estimate_measures_tprime_and_v_and_leaves_the_model_alone():
    tr = _trainer(SMALL)
    m, ctx, model = tr.method, tr.ctx, tr.model
    assert ctx.holdout_size == 6 and ctx.train_size == 42  # 10 % of 48, stratified: 2 per class
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # LT1 / LV1 by hand from the current model (eval mode, means over rows)
    ce = torch.nn.functional.cross_entropy
    model.eval()
    with torch.no_grad():
        tb = list(ctx.train_eval_batches())
        x = {k: torch.cat([b.inputs[k] for b in tb]) for k in ("m1", "m2")}
        y = torch.cat([b.labels for b in tb])
        out = model(x)
        lt1 = [ce(out.unimodal_logits["m1"], y), ce(out.unimodal_logits["m2"], y), ce(out.logits, y)]
    model.train()
    got = m.mean_losses(model, ctx.train_eval_batches(), m.heads, ctx, reduce=True)
    assert got.tolist() == pytest.approx([float(v) for v in lt1], rel=1e-6)
    # a unimodal copy changes only its encoder and head; the fused copy never the heads
    clone = m.train_copy(model, "m1", ctx)
    for k, v in clone.state_dict().items():
        moved = not torch.equal(v, before[k])
        assert moved == k.startswith(("encoders.m1.", "heads.m1.")) or "running" in k, k
    clone = m.train_copy(model, "fused", ctx)
    assert all(torch.equal(v, before[k]) for k, v in clone.state_dict().items() if k.startswith("heads."))
    moved = [k for k, v in clone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoders.m1.") for k in moved) and any(k.startswith("encoders.m2.") for k in moved)
    assert any(k.startswith("fusion.") for k in moved)
    tr.ctx.epoch = 1
    r = m.estimate(model, ctx)
    assert r["weights"].sum().item() == pytest.approx(1.0) and (r["weights"] > 0).all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # only copies trained


def test_estimate_feeds_tprime_v_start_and_end_losses_in_the_rules_order(monkeypatch):
    """estimate() passes (LT1, LV1, LT2, LV2) = (current model on T', current model on V, head k's
    trained copy on T', that copy on V) to the rule -- each computed here by hand (eval mode, mean CE
    over rows), so swapping T' and V or start and end, or measuring the model instead of the copy,
    fails."""
    import mmbalance.methods.gblend as gb
    tr = _trainer(SMALL)
    m, ctx, model = tr.method, tr.ctx, tr.model
    seen, clones = {}, []
    real_rule, real_copy = gb.blend_weights, m.train_copy
    monkeypatch.setattr(gb, "blend_weights", lambda *a: seen.setdefault("args", a) and real_rule(*a))
    monkeypatch.setattr(m, "train_copy", lambda *a: clones.append(real_copy(*a)) or clones[-1])
    ce = torch.nn.functional.cross_entropy

    def by_hand(net, batches):
        was = net.training
        net.eval()
        with torch.no_grad():
            bs = list(batches)
            x = {k: torch.cat([b.inputs[k] for b in bs]) for k in ("m1", "m2")}
            y = torch.cat([b.labels for b in bs])
            out = net(x)
        net.train(was)
        return [ce(out.unimodal_logits["m1"], y).item(), ce(out.unimodal_logits["m2"], y).item(),
                ce(out.logits, y).item()]

    lt1, lv1 = by_hand(model, ctx.train_eval_batches()), by_hand(model, ctx.holdout_batches())
    assert lt1 != pytest.approx(lv1, rel=1e-3)  # T' and V are told apart by the losses
    m.estimate(model, ctx)
    assert len(clones) == 3
    lt2 = [by_hand(c, ctx.train_eval_batches())[i] for i, c in enumerate(clones)]
    lv2 = [by_hand(c, ctx.holdout_batches())[i] for i, c in enumerate(clones)]
    assert lt2 != pytest.approx(lt1, rel=1e-3)  # the copies did train
    got = [t.tolist() for t in seen["args"]]
    for g, want in zip(got, (lt1, lv1, lt2, lv2)):
        assert g == pytest.approx(want, rel=1e-5)


def test_copy_trains_super_epoch_passes_over_tprime_only(monkeypatch):
    """A copy trains ``super_epoch`` full passes of T' (ctx.train_batches) and never sees V."""
    tr = _trainer(["method.warmup_epochs=1", "method.super_epoch=3"])
    m, ctx = tr.method, tr.ctx
    calls = {"train": 0, "train_rows": 0, "holdout": 0}
    real_train, real_hold = ctx.train_batches, ctx.holdout_batches

    def train_batches(*a, **k):
        calls["train"] += 1
        for b in real_train(*a, **k):
            calls["train_rows"] += len(b)
            yield b

    def holdout_batches(*a, **k):
        calls["holdout"] += 1
        return real_hold(*a, **k)

    monkeypatch.setattr(ctx, "train_batches", train_batches)
    monkeypatch.setattr(ctx, "holdout_batches", holdout_batches)
    m.train_copy(tr.model, "m2", ctx)
    assert calls == {"train": 3, "train_rows": 3 * ctx.train_size, "holdout": 0}


def test_online_and_offline_schedules():
    on = _trainer(["method.warmup_epochs=3", "method.super_epoch=2"]).method
    assert [e for e in range(10) if on.estimates_at(e)] == [3, 5, 7, 9]
    off = _trainer(["method.mode=offline"]).method
    assert [e for e in range(10) if off.estimates_at(e)] == [0]


def test_weights_change_at_estimates_and_are_logged(tmp_path):
    tr = _trainer(SMALL + ["train.epochs=4"], out=tmp_path)
    tr.fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    coeffs = [[r[f"coeff_{h}"] for h in ("m1", "m2", "fused")] for r in rows]
    assert coeffs[0] == pytest.approx([1 / 3] * 3)  # warm-up: uniform
    assert coeffs[1] != pytest.approx([1 / 3] * 3) and sum(coeffs[1]) == pytest.approx(1.0)
    assert coeffs[2] == coeffs[1]  # kept within the super-epoch
    assert "gblend_dG_fused" in rows[1] and "gblend_dG_fused" in rows[3] and "gblend_dG_fused" not in rows[2]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["method"]["estimates"] == 2 and state["method"]["weights"] == pytest.approx(coeffs[3])
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["holdout_size"] == 6


def test_offline_estimates_once_at_the_start(tmp_path):
    tr = _trainer(["method.mode=offline", "method.super_epoch=1", "train.epochs=2"], out=tmp_path)
    tr.fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "gblend_dG_m1" in rows[0] and "gblend_dG_m1" not in rows[1]
    assert rows[0]["coeff_m1"] == rows[1]["coeff_m1"] != pytest.approx(1 / 3)


def test_noop_is_uniform_multiloss():
    # no estimate within the run: uniform weights 1/3 -> (CE_1 + CE_2 + CE_f) / 3, i.e. multiloss
    # at a third of the rate (plain SGD, no weight decay)
    sgd = ["optim.momentum=0", "optim.weight_decay=0"]
    assert_same_step("gblend", sgd + ["optim.lr=0.03", "method.warmup_epochs=100"], base="multiloss",
                     base_overrides=sgd + ["optim.lr=0.01"])


def test_state_round_trip():
    state_round_trip_reproduces_next_step("gblend", ["method.warmup_epochs=0", "method.super_epoch=1"],
                                          bundle=tiny_bundle(2, n=64))


def test_resume_mid_super_epoch_is_exact(tmp_path):
    # estimates at epochs 1 and 3; stopped after epoch 1 (inside the first super-epoch)
    resume_is_exact("gblend", SMALL + ["optim.lr=0.05"], total_epochs=5, stop_after=2,
                    bundle=tiny_bundle(2, n=48), tmp_path=tmp_path)


def test_three_modalities():
    tr = _trainer(SMALL + ["train.epochs=2"], mods=3)
    res = tr.fit()
    assert len(tr.method.weights) == 4 and sum(tr.method.weights) == pytest.approx(1.0)
    assert res["test"]["accuracy"] >= 0


def test_bad_options():
    for bad, key in (("method.mode=lazy", "mode"), ("method.super_epoch=0", "super_epoch"),
                     ("method.warmup_epochs=-1", "warmup_epochs"), ("method.holdout=0", "holdout"), ("method.holdout=0.6", "holdout")):
        with pytest.raises(ConfigError, match=key):
            tiny_config("gblend", [bad])


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "gblend", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                 "method.mode=offline", "method.super_epoch=1"]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["holdout_size"] == 20

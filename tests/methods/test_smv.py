"""SMV (Wei et al., CVPR 2024): Shapley valuation, re-sampling rules (sample and modality level),
tagged copies in the loss, state, M=3, no-op, CLI, exact resume after re-sampling started."""
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from utils import assert_same_step, resume_is_exact, tiny_bundle, tiny_config

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.functional.smv import (
    modality_contributions,
    modality_level_entries,
    modality_resample_fractions,
    part_mean,
    resample_delta,
    sample_copies,
    sample_level_entries,
)
from mmbalance.training.trainer import Trainer

A, V, AV = frozenset({"a"}), frozenset({"v"}), frozenset({"a", "v"})


def test_two_modality_contributions_hand_table():
    # spec §4.8: (v_all, v_a, v_v) -> (phi_a, phi_v), v_all = 2 * [fused right]
    rows = [((0, 0, 0), (0, 0)), ((0, 0, 1), (-0.5, 0.5)), ((0, 1, 0), (0.5, -0.5)), ((0, 1, 1), (0, 0)),
            ((2, 0, 0), (1, 1)), ((2, 0, 1), (0.5, 1.5)), ((2, 1, 0), (1.5, 0.5)), ((2, 1, 1), (1, 1))]
    correct = {AV: torch.tensor([r[0][0] == 2 for r in rows]), A: torch.tensor([r[0][1] == 1 for r in rows]),
               V: torch.tensor([r[0][2] == 1 for r in rows])}
    phi = modality_contributions(correct, ["a", "v"])
    assert phi.tolist() == [list(map(float, r[1])) for r in rows]


def test_three_modality_contributions_by_hand():
    # v(abc) = 3 (fused right), v(a) = 1, every other subset wrong:
    # phi_a = 1/3 (v(a) - 0) + 1/3 (v(abc) - v(bc)) = 4/3; phi_b = 1/6 (v(ab) - v(a)) + 1/3 (3 - v(ac)) = -1/6 + 1 = 5/6
    s = lambda *m: frozenset(m)
    t, f = torch.tensor([True]), torch.tensor([False])
    correct = {s("a"): t, s("b"): f, s("c"): f, s("a", "b"): f, s("a", "c"): f, s("b", "c"): f, s("a", "b", "c"): t}
    phi = modality_contributions(correct, ["a", "b", "c"])[0]
    assert phi.tolist() == pytest.approx([4 / 3, 5 / 6, 5 / 6])
    assert float(phi.sum()) == pytest.approx(3.0)  # efficiency: v(all) - v(empty)


def test_sample_copy_thresholds_follow_the_code():
    phi = torch.tensor([-0.5, -0.1, 0.0, 0.4, 0.5, 0.9, 1.0, 1.5])
    assert sample_copies(phi).tolist() == [3, 0, 2, 0, 1, 0, 0, 0]


def test_sample_level_entries_hand_case():
    # spec §4.8: phi = [(-0.5, 0.5), (0.5, 1.5)] -> {0, 1, 0(keep a) x3, 0(keep v) x1, 1(keep a) x1}
    entries = sample_level_entries(torch.tensor([[-0.5, 0.5], [0.5, 1.5]]))
    assert sorted(entries) == sorted([(0, -1), (1, -1), (0, 0), (0, 0), (0, 0), (0, 1), (1, 0)])


def test_modality_level_rule_by_hand():
    # mean phi (0.25, 1.0): gaps (0.75, 0) -> |diff| * 2/3 = 0.5; the worse modality (a) is kept by the copies
    assert modality_resample_fractions(torch.tensor([0.25, 1.0]), 1.0).tolist() == [0.5, 0.0]
    assert modality_resample_fractions(torch.tensor([1.0, 0.25]), 0.5).tolist() == [0.0, 0.25]
    assert modality_resample_fractions(torch.tensor([0.5, 0.5]), 1.0).tolist() == [0.0, 0.0]
    assert resample_delta(0.75, 1.0, "tanh") == pytest.approx(0.46211716)
    assert resample_delta(0.75, 2.0, "square") == pytest.approx(0.70710678)
    # M = 3 (extension): against the smallest gap
    assert modality_resample_fractions(torch.tensor([0.25, 1.0, 0.7]), 1.0).tolist() == pytest.approx([0.5, 0.0, 0.2])
    entries = modality_level_entries(10, torch.tensor([0.5, 0.0]), torch.Generator().manual_seed(0))
    assert entries[:10] == [(i, -1) for i in range(10)]
    assert len(entries) == 15 and all(t == 0 and 0 <= i < 10 for i, t in entries[10:])
    phi = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert part_mean(phi, 1.0, torch.Generator().manual_seed(0)).shape == (2,)
    assert part_mean(phi, 0.01, torch.Generator()).tolist() == [0.5, 1.0]  # int(2 * 0.01) = 0 -> all


def _trainer(overrides=(), mods=2, out=None, n=48):
    return Trainer(tiny_config("smv", ["train.epochs=1"] + list(overrides)), out, quiet=True,
                   bundle=tiny_bundle(mods, n=n))


def _hand_contributions(model, ds):
    """Per-sample Shapley contributions [N, 2] of the eval-mode model, written out for M = 2 with
    v(S) = |S| * correct(S): phi_1 = (v_1 + v_all - v_2) / 2, phi_2 = (v_2 + v_all - v_1) / 2."""
    model.eval()
    with torch.no_grad():
        x = {m: torch.stack([ds[i]["inputs"][m] for i in range(len(ds))]) for m in ("m1", "m2")}
        y = torch.tensor([ds[i]["label"] for i in range(len(ds))])
        z = model.encode(x)
        right = lambda f: (model.fuse(f).argmax(1) == y).float()
        v_all = 2 * right(z)
        v_1 = right({"m1": z["m1"], "m2": torch.zeros_like(z["m2"])})
        v_2 = right({"m1": torch.zeros_like(z["m1"]), "m2": z["m2"]})
    return torch.stack([(v_1 + v_all - v_2) / 2, (v_2 + v_all - v_1) / 2], 1)


def test_valuation_pass_matches_hand_computation():
    tr = _trainer(["method.warmup_epochs=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    ctx.epoch = 0
    logs = method.on_epoch_end(model, ctx)
    assert model.training
    expect = _hand_contributions(model, tr.bundle.train)
    assert torch.equal(method.contrib, expect)
    assert logs["contrib_m1"] == pytest.approx(float(expect[:, 0].mean()))
    assert logs["extra_m2"] == pytest.approx(float(sample_copies(expect[:, 1]).sum()) / 48)
    # the sampler: every index once untagged plus the copies, shuffled
    order = method.sampler(48, 0, torch.Generator().manual_seed(0))
    assert sorted(order) == sorted(sample_level_entries(expect))
    assert order != sample_level_entries(expect)


def test_valuation_runs_in_eval_mode():
    # spec §4.8: the valuation pass is eval mode, no grad -- BatchNorm uses (and keeps) its running
    # statistics; the contributions are those of the eval-mode model
    bundle = tiny_bundle(shapes={"m1": (1, 8, 8), "m2": (6,)})  # m1: small CNN with BatchNorm
    tr = Trainer(tiny_config("smv", ["train.epochs=1", "method.warmup_epochs=0"]), None, quiet=True, bundle=bundle)
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    for _ in range(2):  # running statistics away from their initial values
        method.training_step(model, next(iter(tr._batches(bundle.train, range(16), 16))), ctx)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert buffers
    ctx.epoch = 0
    method.on_epoch_end(model, ctx)
    assert model.training
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(method.contrib, _hand_contributions(model, bundle.train))


def test_no_valuation_before_the_warmup_ends():
    tr = _trainer(["method.warmup_epochs=3"])
    for e in (0, 1):
        tr.ctx.epoch = e
        assert tr.method.on_epoch_end(tr.model, tr.ctx) is None and tr.method.contrib is None
    tr.ctx.epoch = 2  # epoch warmup - 1: valued, used from epoch 3 on
    assert tr.method.on_epoch_end(tr.model, tr.ctx) is not None
    assert tr.method.sampler(48, 2, torch.Generator()) is None
    assert tr.method.sampler(48, 3, torch.Generator()) is not None


def test_modality_level_keeps_the_worse_modality():
    tr = _trainer(["method.level=modality", "method.warmup_epochs=0"])
    m = tr.method
    m.contrib = torch.zeros(48, 2)
    m.part = torch.tensor([1.0, 0.25], dtype=torch.float64)  # m2 contributes less -> copies keep m2
    order = m.sampler(48, 0, torch.Generator().manual_seed(1))
    extra = [e for e in order if e[1] >= 0]
    assert len(order) == 48 + int(0.5 * 48) and len(extra) == 24 and all(t == 1 for _, t in extra)
    assert sorted(i for i, t in order if t < 0) == list(range(48))
    # alpha = 0: the plain training set, every index once and untagged
    tr0 = _trainer(["method.level=modality", "method.alpha=0"])
    tr0.method.contrib, tr0.method.part = m.contrib, m.part
    order0 = tr0.method.sampler(48, 5, torch.Generator())
    assert sorted(order0) == [(i, -1) for i in range(48)]


def test_tagged_rows_train_one_modality_alone():
    tr = _trainer()
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    entries = [(i, 0) for i in range(8)] + [(i, 1) for i in range(8, 12)] + list(range(12, 16))
    batch = next(iter(tr._batches(tr.bundle.train, entries, 16)))
    assert batch.tag.tolist() == [0] * 8 + [1] * 4 + [-1] * 4
    res = method.compute_loss(model, batch, ctx)
    with torch.no_grad():
        z = model.encode(batch.inputs)
        z1, z2 = z["m1"].clone(), z["m2"].clone()
        z2[:8] = 0  # rows 0..7 keep m1
        z1[8:12] = 0  # rows 8..11 keep m2
        expect = F.cross_entropy(model.fuse({"m1": z1, "m2": z2}), batch.labels)
    assert float(res.loss.detach()) == pytest.approx(float(expect), rel=1e-6)
    # a batch of rows that all keep m1: no gradient reaches encoder m2
    only = next(iter(tr._batches(tr.bundle.train, [(i, 0) for i in range(16)], 16)))
    model.zero_grad(set_to_none=True)
    method.compute_loss(model, only, ctx).loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.encoders["m2"].parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.encoders["m1"].parameters())


def test_state_round_trip_with_tagged_steps():
    bundle = tiny_bundle(2)
    cfg = tiny_config("smv", ["method.warmup_epochs=0"])
    a = Trainer(cfg, None, quiet=True, bundle=bundle)
    a.ctx.epoch = 0
    a.method.on_epoch_end(a.model, a.ctx)  # valuation -> contributions
    order = a.method.sampler(48, 1, torch.Generator().manual_seed(3))
    assert any(t >= 0 for _, t in order)
    batches = list(a._batches(bundle.train, order[:48], 16))
    a.model.train()
    a.ctx.epoch = 1
    for b in batches[:2]:
        a.method.training_step(a.model, b, a.ctx)
    buf = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "optimizer": a.optimizer.state_dict(),
                "method": a.method.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert isinstance(state["method"]["contrib"], torch.Tensor)
    b_ = Trainer(cfg, None, quiet=True, bundle=bundle)
    b_.model.load_state_dict(state["model"])
    b_.optimizer.load_state_dict(state["optimizer"])
    b_.method.load_state_dict(state["method"])
    b_.ctx.epoch = 1
    b_.model.train()
    assert b_.method.sampler(48, 1, torch.Generator().manual_seed(3)) == order
    a.method.training_step(a.model, batches[2], a.ctx)
    b_.method.training_step(b_.model, batches[2], b_.ctx)
    for (n, p), q in zip(a.model.named_parameters(), b_.model.parameters()):
        assert torch.equal(p, q), n


def test_epochs_grow_by_the_copies_and_three_modalities_train(tmp_path):
    res = _trainer(["train.epochs=3", "method.warmup_epochs=1"], mods=3, out=tmp_path).fit()
    assert math.isfinite(res["test"]["loss"])
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_samples"] == 48
    for prev, row in zip(rows[:-1], rows[1:]):  # the copies announced at the end of one epoch are trained in the next
        extra = sum(prev[f"extra_m{j}"] for j in (1, 2, 3)) * 48
        assert row["train_samples"] == 48 + round(extra)
    assert {"contrib_m1", "contrib_m3", "extra_m3"} <= set(rows[0])


def test_warmup_is_joint_training():
    assert_same_step("smv", ["method.warmup_epochs=100"], base="joint")


def test_resume_is_exact_after_resampling_started(tmp_path):
    for level in ("sample", "modality"):
        resume_is_exact("smv", ["method.warmup_epochs=1", f"method.level={level}", "data.n_train=120",
                                "data.n_val=40", "data.n_test=40"], total_epochs=4, stop_after=2,
                        tmp_path=tmp_path / level)


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "smv", "--out", str(tmp_path), "--quiet", "epochs=1",
                 "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


def test_options_validated():
    for bad in ("method.level=x", "method.warmup_epochs=-1", "method.alpha=-1", "method.part_ratio=0",
                "method.part_ratio=1.5", "method.func=cube"):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "smv", None, [bad])

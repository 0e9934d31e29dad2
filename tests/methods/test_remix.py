"""Data Remixing (Ma et al., ICML 2025): KL assignment, order, per-row zeroing, state, M=3, no-op, CLI."""
import math

import pytest
import torch
import torch.nn.functional as F
from utils import (
    assert_same_step,
    batch_of,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.functional.remix import (
    assign_modalities,
    keep_rows,
    kl_to_uniform,
    remix_order,
)
from mmbalance.training.trainer import Trainer


def test_kl_and_assignment_hand_case():
    # spec §4.24: K = 6, p_a uniform (KL 0), p_v = [.5, .5, 0, 0, 0, 0] (KL = log2 3) -> audio subset
    la = torch.zeros(1, 6)
    lv = torch.tensor([[0.0, 0.0, -1e4, -1e4, -1e4, -1e4]])
    assert float(kl_to_uniform(la)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_uniform(lv)) == pytest.approx(1.584963, abs=1e-6)
    kl = torch.stack([kl_to_uniform(la), kl_to_uniform(lv)], 1)
    assert assign_modalities(kl).tolist() == [0]
    # K from the argument (the code hard-codes 6): a uniform 3-class softmax against K = 6 is log2(6/3) = 1 bit
    assert float(kl_to_uniform(torch.zeros(1, 3), 6)) == pytest.approx(1.0, abs=1e-6)


def test_assignment_ties_and_three_modalities():
    kl = torch.tensor([[1.0, 1.0], [0.5, 1.0], [2.0, 1.0]])
    assert assign_modalities(kl).tolist() == [1, 0, 1]  # tie -> the later modality (code: KL_a < KL_v)
    kl3 = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    assert assign_modalities(kl3).tolist() == [1, 1]


def test_keep_rows():
    f = {"a": torch.ones(3, 2), "v": 2 * torch.ones(3, 2)}
    out = keep_rows(f, torch.tensor([0, 1, -1]), ["a", "v"])
    assert out["a"].tolist() == [[1, 1], [0, 0], [1, 1]]
    assert out["v"].tolist() == [[0, 0], [2, 2], [2, 2]]


def test_remix_order():
    assign = torch.tensor([0, 1, 1, 0, 1, -1])
    order = remix_order(assign, 2, torch.Generator().manual_seed(0))
    assert sorted(order[:3]) == [1, 2, 4] and sorted(order[3:5]) == [0, 3] and order[5] == 5  # video first
    inter = remix_order(assign, 2, torch.Generator().manual_seed(0), "interleave")
    assert sorted(inter) == list(range(6))


def _trainer(overrides=(), mods=2, out=None):
    return Trainer(tiny_config("remix", ["train.epochs=1"] + list(overrides)), out, quiet=True, bundle=tiny_bundle(mods))


def test_assignment_pass_and_sampler():
    tr = _trainer(["method.warmup_epochs=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.epoch = 0
    model.train()
    method.on_epoch_start(model, ctx)
    assert model.training  # mode restored
    # by hand, eval mode, over the whole training split
    model.eval()
    with torch.no_grad():
        b = batch_of(tr.bundle, n=48)
        feats = model.encode(b.inputs)
        kl = []
        for m in ("m1", "m2"):
            p = model.heads[m](feats[m]).softmax(1).clamp(1e-9, 1)
            kl.append((p * torch.log2(p * 3)).sum(1))
        expect = torch.where(kl[0] < kl[1], 0, 1)
    model.train()
    assert torch.equal(method.assign, expect)
    order = method.sampler(48, 0, torch.Generator().manual_seed(0))
    n_v = int((expect == 1).sum())
    assert sorted(order) == list(range(48))
    assert all(int(expect[i]) == 1 for i in order[:n_v]) and all(int(expect[i]) == 0 for i in order[n_v:])
    logs = method.on_epoch_end(model, ctx)
    assert logs["share_m2"] == pytest.approx(n_v / 48)
    assert method.sampler(48, 0, torch.Generator()) is not None
    # before the warm-up ends: plain shuffle
    tr2 = _trainer(["method.warmup_epochs=3"])
    tr2.method.assign = expect
    assert tr2.method.sampler(48, 2, torch.Generator()) is None


def test_remix_loss_zeroes_other_modality_per_row_and_blocks_its_gradient():
    tr = _trainer(["method.warmup_epochs=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    ctx.epoch = 0
    batch = batch_of(tr.bundle, n=16)
    # rows 0..7 keep m1, rows 8..15 keep m2
    method.assign = torch.tensor([0] * 8 + [1] * 8 + [0] * 32)
    res = method.compute_loss(model, batch, ctx)
    feats = {m: z.detach() for m, z in res.output.features.items()}
    with torch.no_grad():
        z1, z2 = feats["m1"].clone(), feats["m2"].clone()
        z1[8:] = 0
        z2[:8] = 0
        fused = model.fuse({"m1": z1, "m2": z2})
        ce_f = F.cross_entropy(fused, batch.labels, reduction="none")
        ce_1 = F.cross_entropy(model.heads["m1"](feats["m1"]), batch.labels, reduction="none")
        ce_2 = F.cross_entropy(model.heads["m2"](feats["m2"]), batch.labels, reduction="none")
        expect = (ce_f + torch.cat([ce_1[:8], ce_2[8:]])).mean()
    assert float(res.loss.detach()) == pytest.approx(float(expect), rel=1e-5)
    # a batch that keeps only m1: encoder m2 and head m2 get no gradient
    method.assign = torch.zeros(48, dtype=torch.long)
    model.zero_grad(set_to_none=True)
    method.compute_loss(model, batch, ctx).loss.backward()
    for n, p in model.named_parameters():
        if n.startswith(("encoders.m2.", "heads.m2.")):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.encoders["m1"].parameters())


def test_state_round_trip():
    state_round_trip_reproduces_next_step("remix", ["method.warmup_epochs=0"])


def test_three_modalities_train(tmp_path):
    res = _trainer(["method.warmup_epochs=0"], mods=3, out=tmp_path).fit()
    assert math.isfinite(res["test"]["loss"])
    row = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert '"share_m3"' in row


def test_warmup_reduces_to_base_objectives():
    assert_same_step("remix", ["method.warmup_weight=0"], base="joint")
    assert_same_step("remix", [], base="multiloss", base_overrides=["method.unimodal_weight=0.5"])
    with pytest.raises(AssertionError):  # after the warm-up the step changes
        assert_same_step("remix", ["method.warmup_epochs=0"], base="multiloss",
                         base_overrides=["method.unimodal_weight=0.5"])


def test_options_validated():
    for bad in ("method.warmup_epochs=-1", "method.warmup_weight=-1", "method.remix_weight=-1", "method.order=x"):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "remix", None, [bad])


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "remix", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                 "method.warmup_epochs=0"]) == 0

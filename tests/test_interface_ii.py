"""Interface additions of issue 11 (spec baselines.md §2, gaps B, C, D, E, G, K): method holdout,
training passes and optimisers for copies, tagged sampler entries, named LR groups with dynamic
scales, method-owned optimisers and schedulers in checkpoints, tensor state."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from mmbalance import distributed as D
from mmbalance.data.base import DataBundle, TensorMultimodalDataset
from mmbalance.data.batch import Batch, collate
from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.methods import METHODS, load_all
from mmbalance.methods.base import Method, register_method
from mmbalance.training.checkpoint import load_checkpoint
from mmbalance.training.trainer import Trainer
from utils import resume_is_exact, tiny_bundle, tiny_config

PROBE = "_probe_iface_ii"
DUPES = "_dupes_iface_ii"


@dataclass
class ProbeOptions:
    holdout: float = 0.0  # Method.holdout_fraction()
    scale_at: int = -1  # epoch whose on_epoch_start calls ctx.set_lr_scale("enc", scale)
    scale: float = 0.5
    own_optimizer: bool = False  # a probe Linear on m1's input trained by a method-owned optimiser
    tags: bool = False  # sampler gives (index, index % 3) for even indices, plain odd indices
    probe_dim: int = 6


def expected_tag(i: int) -> int:
    return i % 3 if i % 2 == 0 else -1


class Probe(Method):
    """Uses every new piece of the interface and logs what it saw (test-only method)."""

    Options = ProbeOptions

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.probe = None
        self.opt = None
        self.sched = None
        self.tag_errors = 0
        self.tagged_rows = 0

    def setup(self, model, ctx):
        self.ctx = ctx
        if self.options.own_optimizer:
            g = torch.Generator().manual_seed(3)
            self.probe = nn.Linear(self.options.probe_dim, self.num_classes)
            with torch.no_grad():
                self.probe.weight.copy_(torch.randn(self.probe.weight.shape, generator=g) * 0.1)
                self.probe.bias.zero_()
            self.opt = ctx.make_optimizer(self.probe.parameters(), lr=0.05)
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)

    def holdout_fraction(self):
        return self.options.holdout

    def param_groups(self, model):
        enc = [p for m in self.modalities for p in model.encoder_parameters(m)]
        ids = {id(p) for p in enc}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": enc, "name": "enc"}, {"params": rest, "name": "rest", "lr_scale": 2.0}]

    def sampler(self, n, epoch, generator):
        if not self.options.tags:
            return None
        return [(i, expected_tag(i)) if i % 2 == 0 else i for i in torch.randperm(n, generator=generator).tolist()]

    def on_epoch_start(self, model, ctx):
        if ctx.epoch == self.options.scale_at:
            ctx.set_lr_scale("enc", self.options.scale)

    def compute_loss(self, model, batch, ctx):
        want = torch.tensor([expected_tag(int(i)) if self.options.tags else -1 for i in batch.index])
        self.tag_errors += int((batch.tag.cpu() != want).sum())
        self.tagged_rows += int((batch.tag >= 0).sum())
        return super().compute_loss(model, batch, ctx)

    def on_epoch_end(self, model, ctx):
        logs = {f"lr_{g['name']}": g["lr"] for g in ctx.optimizer.param_groups}
        if self.opt is not None:  # one training pass of the probe over the train split
            tot = n = 0.0
            for batch in ctx.train_batches():
                loss = nn.functional.cross_entropy(self.probe(batch.inputs["m1"]), batch.labels)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                tot, n = tot + float(loss.detach()) * len(batch), n + len(batch)
            logs["probe_loss"] = tot / n
            logs["probe_lr"] = self.opt.param_groups[0]["lr"]
        if ctx.holdout_size:
            with torch.no_grad():
                losses = [nn.functional.cross_entropy(model(b.inputs).logits, b.labels, reduction="sum")
                          for b in ctx.holdout_batches(batch_size=5)]
            logs["holdout_loss"] = float(sum(losses)) / ctx.holdout_size
        return logs

    def optimizers(self):
        return {"probe": self.opt} if self.opt is not None else {}

    def schedulers(self):
        return {"probe": self.sched} if self.sched is not None else {}

    def state_dict(self):
        return {"probe": {k: v.detach().clone() for k, v in self.probe.state_dict().items()}} if self.probe else {}

    def load_state_dict(self, state):
        if self.probe is not None:
            self.probe.load_state_dict(state["probe"])


class Dupes(Method):
    def param_groups(self, model):
        ps = list(model.parameters())
        return [{"params": ps[:1], "name": "a"}, {"params": ps[1:], "name": "a"}]


@pytest.fixture(scope="module", autouse=True)
def registered():
    load_all()
    register_method(PROBE, paper="-", kind="baseline", description="test probe")(Probe)
    register_method(DUPES, paper="-", kind="baseline", description="test")(Dupes)
    yield
    for name in (PROBE, DUPES):
        METHODS._entries.pop(name, None)


def trainer(method="joint", over=(), bundle=None, out=None):
    return Trainer(tiny_config(method, list(over)), out, quiet=True, data=bundle or tiny_bundle(2, n=48))


def rows_of(batches, m="m1"):
    return torch.cat([b.inputs[m] for b in batches])


# ------------------------------------------------------------------------------------------ gap B
def test_holdout_is_stratified_seeded_and_disjoint():
    bundle = tiny_bundle(2, n=48)  # labels 0,1,2 repeating: 16 per class
    tr = trainer(over=["data.method_holdout=0.25"], bundle=bundle)
    held, keep = tr.holdout.indices, tr.bundle.train.indices
    assert len(held) == 12 and len(keep) == 36 and tr.ctx.holdout_size == 12
    assert np.bincount(bundle.train.labels[held]).tolist() == [4, 4, 4]  # round(0.25 * 16) per class
    assert set(held).isdisjoint(keep) and sorted(set(held) | set(keep)) == list(range(48))
    assert tr.ctx.train_size == 36 and len(tr.ctx.train_labels) == 36
    assert len(bundle.train) == 48  # the caller's bundle is not changed
    same = trainer(over=["data.method_holdout=0.25"], bundle=bundle)
    assert same.holdout.indices.tolist() == held.tolist()
    other = trainer(over=["data.method_holdout=0.25", "train.seed=1"], bundle=bundle)
    assert other.holdout.indices.tolist() != held.tolist()


def test_holdout_batches_are_eval_rows_and_no_train_pass_sees_them():
    base = tiny_bundle(2, n=48)
    train = base.train
    # train transform (what the model trains on) differs from the eval view of the same rows
    aug = TensorMultimodalDataset({m: x + 100.0 for m, x in train.inputs.items()}, train.labels, 3)
    bundle = DataBundle("t", base.modalities, 3, {"train": aug, "val": base.val, "test": base.test}, train_eval=train)
    tr = trainer(over=["data.method_holdout=0.25"], bundle=bundle)
    held, keep = tr.holdout.indices, tr.bundle.train.indices
    hb = list(tr.ctx.holdout_batches(batch_size=5))
    assert [len(b) for b in hb] == [5, 5, 2]
    assert torch.equal(rows_of(hb), train.inputs["m1"][held])  # eval transforms, fixed order
    assert all((b.tag == -1).all() for b in hb)
    assert torch.equal(rows_of(hb), rows_of(tr.ctx.holdout_batches()))  # every call the same
    te = rows_of(tr.ctx.train_eval_batches())
    assert torch.equal(te, train.inputs["m1"][keep])
    tb = rows_of(tr.ctx.train_batches())
    assert sorted(tb[:, 1].tolist()) == sorted((train.inputs["m1"][keep][:, 1] + 100).tolist())  # train transforms
    tr.ctx.epoch = 0
    seen = []
    orig = tr.method.compute_loss
    tr.method.compute_loss = lambda m, b, c: (seen.append(b.inputs["m1"].clone()), orig(m, b, c))[1]
    tr.train_epoch(0)
    assert torch.cat(seen).shape[0] == 36
    assert not set((train.inputs["m1"][held][:, 1] + 100).tolist()) & set(torch.cat(seen)[:, 1].tolist())


def test_method_holdout_fraction_and_config_precedence(tmp_path):
    tr = trainer(PROBE, ["method.holdout=0.25"])
    assert tr.ctx.holdout_size == 12
    tr = trainer(PROBE, ["method.holdout=0.25", "data.method_holdout=0.125"])
    assert tr.ctx.holdout_size == 6


def test_holdout_recorded_and_stable_across_resume(tmp_path):
    full, resumed = resume_is_exact(PROBE, ["method.holdout=0.25", "optim.lr=0.05"], total_epochs=3, stop_after=2,
                                    bundle=tiny_bundle(2, n=48), tmp_path=tmp_path)
    assert full["holdout_size"] == resumed["holdout_size"] == 12
    rows = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert all("holdout_loss" in r for r in rows)
    assert json.loads((tmp_path / "full" / "result.json").read_text())["holdout_size"] == 12
    plain = trainer(out=tmp_path / "plain", over=["train.epochs=1"]).fit()
    assert plain["holdout_size"] == 0


@pytest.mark.parametrize("bad", ["0.5", "-0.1", "1.2", "nan"])
def test_bad_holdout_fraction_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="method_holdout"):
        tiny_config("joint", [f"data.method_holdout={bad}"])


def test_bad_method_holdout_fraction_and_no_holdout_errors():
    with pytest.raises(MethodSetupError, match="holdout_fraction"):
        trainer(PROBE, ["method.holdout=0.7"])
    tr = trainer()
    assert tr.ctx.holdout_size == 0
    with pytest.raises(RuntimeError, match="no held-out split.*method_holdout"):
        tr.ctx.holdout_batches()


# ------------------------------------------------------------------------------------------ gap C
def test_train_batches_generator_reproducible_and_default_seeding():
    a, b = trainer(), trainer()
    idx = lambda bs: torch.cat([x.index for x in bs]).tolist()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = idx(a.ctx.train_batches(g1, batch_size=7))
    assert first == idx(b.ctx.train_batches(g2, batch_size=7)) and sorted(first) == list(range(48))
    assert [len(x) for x in a.ctx.train_batches(batch_size=7)] == [7] * 6 + [6]
    a, b = trainer(), trainer()  # default generator: (seed, epoch, call number in the epoch)
    a1, a2 = idx(a.ctx.train_batches()), idx(a.ctx.train_batches())
    assert a1 != a2 and idx(b.ctx.train_batches()) == a1 and idx(b.ctx.train_batches()) == a2
    a.ctx.epoch = b.ctx.epoch = 1
    e1 = idx(a.ctx.train_batches())
    assert e1 not in (a1, a2) and idx(b.ctx.train_batches()) == e1
    c = trainer(over=["train.seed=3"])
    assert idx(c.ctx.train_batches()) != a1


def test_make_optimizer_has_the_run_config_and_fresh_state():
    tr = trainer(over=["optim.name=adam", "optim.lr=0.003", "optim.betas=[0.8,0.9]", "optim.weight_decay=0.01"])
    p = nn.Parameter(torch.ones(3))
    opt = tr.ctx.make_optimizer([p])
    assert type(opt) is torch.optim.Adam and opt is not tr.optimizer
    g = opt.param_groups[0]
    assert (g["lr"], tuple(g["betas"]), g["weight_decay"]) == (0.003, (0.8, 0.9), 0.01)
    assert len(opt.state) == 0
    assert tr.ctx.make_optimizer([p], lr=0.5).param_groups[0]["lr"] == 0.5
    assert tr.cfg.optim.lr == 0.003  # the run's config is untouched
    sgd = trainer(over=["optim.name=sgd", "optim.momentum=0.7"]).ctx.make_optimizer([p])
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.7


def test_own_loop_context_offers_holdout_passes_and_optimisers():
    from mmbalance.config import ModelConfig
    from mmbalance.models import build_model
    from mmbalance.training.build import make_method, optimizer_groups, prepare_model
    from mmbalance.training.loop import make_context
    bundle = tiny_bundle(2, n=48)
    method = make_method("mslr", bundle.modalities, 3)
    model = prepare_model(method, build_model(bundle.modalities, bundle.input_shapes, 3,
                                              ModelConfig(feature_dim=8, hidden_dim=16)))
    opt = torch.optim.SGD(optimizer_groups(method, model, 0.1), lr=0.1, momentum=0.9)
    ctx = make_context(model, opt, data=bundle, holdout=0.25, batch_size=10)
    assert ctx.holdout_size == 12 and len(ctx.data.train) == 36 and ctx.train_size == 36
    assert sum(len(b) for b in ctx.holdout_batches()) == 12
    assert [len(b) for b in ctx.train_batches()] == [10, 10, 10, 6]
    new = ctx.make_optimizer(model.parameters(), lr=0.2)
    assert type(new) is torch.optim.SGD and new.param_groups[0]["lr"] == 0.2
    assert new.param_groups[0]["momentum"] == 0.9 and not new.state
    ctx.set_lr_scale("m1", 0.5)
    assert [g["lr"] for g in opt.param_groups if g["name"] == "m1"] == [0.05]
    ctx.set_lr_scale("m1", 0.25)  # not compounding
    assert [g["lr"] for g in opt.param_groups if g["name"] == "m1"] == [0.025]
    with pytest.raises(KeyError, match="m2"):
        ctx.set_lr_scale("nope", 1.0)
    with pytest.raises(RuntimeError, match="holdout"):
        make_context(model, opt, data=bundle).holdout_batches()


def _own_loop_sgd(lr=0.1):
    from mmbalance.config import ModelConfig
    from mmbalance.models import build_model
    from mmbalance.training.build import make_method, optimizer_groups, prepare_model
    from mmbalance.training.loop import make_context
    bundle = tiny_bundle(2, n=48)
    method = make_method("mslr", bundle.modalities, 3)
    model = prepare_model(method, build_model(bundle.modalities, bundle.input_shapes, 3,
                                              ModelConfig(feature_dim=8, hidden_dim=16)))
    opt = torch.optim.SGD(optimizer_groups(method, model, lr), lr=lr)
    return make_context(model, opt, data=bundle), opt


def test_own_loop_lr_scale_keeps_a_chainable_schedule():
    """StepLR (chainable): the scale rides on the decayed rate; rescaling never undoes the decay."""
    ctx, opt = _own_loop_sgd()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    lr = lambda: [g["lr"] for g in opt.param_groups if g["name"] == "m1"][0]
    ctx.set_lr_scale("m1", 0.5)
    assert lr() == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert lr() == pytest.approx(0.005)  # 0.1 x 0.1 (decay) x 0.5 (scale)
    ctx.set_lr_scale("m1", 0.5)
    assert lr() == pytest.approx(0.005)  # same scale: unchanged (the old code gave 0.05)
    ctx.set_lr_scale("m1", 0.25)
    assert lr() == pytest.approx(0.0025)
    assert [g["lr"] for g in opt.param_groups if g["name"] == "fusion"] == [pytest.approx(0.01)]


def test_own_loop_lr_scale_with_lambda_schedule_and_reapply():
    """LambdaLR sets rates from its base rates: reapply_lr_scales once after each step."""
    ctx, opt = _own_loop_sgd()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    lr = lambda: [g["lr"] for g in opt.param_groups if g["name"] == "m1"][0]
    ctx.set_lr_scale("m1", 0.4)
    opt.step()
    sched.step()
    ctx.reapply_lr_scales()
    assert lr() == pytest.approx(0.1 * 0.5 * 0.4)
    ctx.set_lr_scale("m1", 0.2)
    assert lr() == pytest.approx(0.1 * 0.5 * 0.2)
    opt.step()
    sched.step()
    ctx.reapply_lr_scales()
    assert lr() == pytest.approx(0.1 * 0.25 * 0.2)


# ------------------------------------------------------------------------------------------ gap D
def test_batch_tag_defaults_and_survives_batch_operations():
    bundle = tiny_bundle(2, n=8)
    b = collate([bundle.train[i] for i in range(4)])
    assert b.tag.tolist() == [-1] * 4 and b.tag.dtype == torch.long
    s = dict(bundle.train[5])
    s["tag"] = 2
    b = collate([bundle.train[0], s])
    assert b.tag.tolist() == [-1, 2]
    assert b.select(torch.tensor([1])).tag.tolist() == [2]
    assert b.select(torch.tensor([True, False])).tag.tolist() == [-1]
    assert b.to("cpu").tag.tolist() == [-1, 2]
    assert b.with_inputs({m: x * 0 for m, x in b.inputs.items()}).tag.tolist() == [-1, 2]
    assert Batch({"a": torch.zeros(3, 1)}, torch.zeros(3, dtype=torch.long), torch.arange(3)).tag.tolist() == [-1] * 3


class _Plain(TensorMultimodalDataset):
    """A subclass: read through the DataLoader path (not the tensor slicing fast path)."""


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_tagged_sampler_entries_reach_batch_tag(loader):
    bundle = tiny_bundle(2, n=48)
    if loader == "dataloader":
        splits = {k: _Plain(v.inputs, v.labels, 3) for k, v in bundle.splits.items()}
        bundle = DataBundle("t", bundle.modalities, 3, splits)
    tr = trainer(PROBE, ["method.tags=true"], bundle=bundle)
    tr.train_epoch(0)
    assert tr.method.tag_errors == 0 and tr.method.tagged_rows == 24
    assert all((b.tag == -1).all() for b in tr.ctx.val_batches())


def test_tags_stay_aligned_with_ddp_sharding(monkeypatch):
    tr = trainer(PROBE, ["method.tags=true"])
    gen = torch.Generator().manual_seed(0)
    from mmbalance.training.trainer import sampler_order
    order = sampler_order(tr.method.sampler(47, 0, gen), 47, PROBE)  # odd length: padding wraps round
    monkeypatch.setattr(D, "world_size", lambda: 2)
    got = []
    for r in (0, 1):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        shard = tr._shard(order, pad=True)
        assert len(shard) == 24
        for b in tr._batches(tr.bundle.train, shard, 5):
            got += list(zip(b.index.tolist(), b.tag.tolist()))
    assert all(t == expected_tag(i) for i, t in got)
    assert len(got) == 48 and sorted({i for i, _ in got}) == list(range(47))


def test_bad_sampler_entries_are_clear_errors():
    from mmbalance.errors import MMBalanceError
    from mmbalance.training.trainer import sampler_order
    with pytest.raises(MMBalanceError, match="outside the training split"):
        sampler_order([(0, 1), (50, 0)], 48, "x")
    with pytest.raises(MMBalanceError, match="not an index or an"):
        sampler_order([(0, 1, 2)], 48, "x")
    with pytest.raises(MMBalanceError, match="tag -3"):
        sampler_order([(0, -3)], 48, "x")
    assert sampler_order(torch.tensor([[1, 2], [3, 0]]), 4) == [(1, 2), (3, 0)]


# ------------------------------------------------------------------------------------------ gap E
SCHED = ["optim.name=sgd", "optim.lr=0.1", "schedule.name=step", "schedule.step_size=2", "schedule.gamma=0.1",
         "method.scale_at=1", "method.scale=0.5"]


def test_set_lr_scale_composes_with_step_schedule_and_survives_resume(tmp_path):
    resume_is_exact(PROBE, SCHED, total_epochs=4, stop_after=2, bundle=tiny_bundle(2, n=48), tmp_path=tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    # enc: 0.1 x schedule (1, 1, 0.1, 0.1) x dynamic scale (1, 0.5 from epoch 1 on)
    assert [r["lr_enc"] for r in rows] == pytest.approx([0.1, 0.05, 0.005, 0.005], rel=1e-12)
    # rest: static lr_scale 2, no dynamic scale
    assert [r["lr_rest"] for r in rows] == pytest.approx([0.2, 0.2, 0.02, 0.02], rel=1e-12)
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert state["lr_scales"] == {"enc": 0.5}


def test_set_lr_scale_errors_and_reset():
    tr = trainer(PROBE, ["optim.lr=0.1"])
    with pytest.raises(KeyError, match="'enc', 'rest'"):
        tr.ctx.set_lr_scale("encoder", 0.5)
    with pytest.raises(ValueError, match="enc"):
        tr.ctx.set_lr_scale("enc", -1.0)
    tr.ctx.set_lr_scale("enc", 0.3)
    tr.ctx.set_lr_scale("enc", 0.3)  # not compounding
    assert tr.ctx.lr_scales == {"enc": 0.3}
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.03)
    tr.ctx.reset_optimizer()  # a fresh optimiser keeps the scale
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.03)
    with pytest.raises(MethodSetupError, match="unique"):
        trainer(DUPES)


# ------------------------------------------------------------------------------------------ gaps G, K
def test_method_optimizers_and_schedulers_are_checkpointed_and_restored(tmp_path):
    over = ["method.own_optimizer=true", "optim.name=adam", "optim.lr=0.01"]
    resume_is_exact(PROBE, over, total_epochs=3, stop_after=2, bundle=tiny_bundle(2, n=48), tmp_path=tmp_path)
    state = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    saved = state["method_optimizers"]["probe"]
    assert saved["state"] and saved["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)
    assert state["method_schedulers"]["probe"]["last_epoch"] == 3
    assert isinstance(state["method"]["probe"]["weight"], torch.Tensor)  # K: tensors stay tensors
    rows = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["probe_lr"] for r in rows] == pytest.approx([0.05, 0.025, 0.0125])  # stepped once per epoch
    # the restored optimiser holds the saved moments
    tr = trainer(PROBE, over + ["train.epochs=3"], bundle=tiny_bundle(2, n=48))
    tr.load_state(state)
    got = tr.method.opt.state_dict()["state"]
    assert all(torch.equal(got[k]["exp_avg"], saved["state"][k]["exp_avg"]) for k in saved["state"])


def test_default_state_dict_saves_tensors_as_tensors():
    class T(Method):
        state_attrs = ("per_sample", "count")

    m = T(None, ["a", "b"], 2)
    m.per_sample, m.count = torch.arange(5.0), 3
    s = m.state_dict()
    assert isinstance(s["per_sample"], torch.Tensor) and s["per_sample"] is not m.per_sample
    m.per_sample += 1
    assert s["per_sample"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_extra_training_passes_count_in_samples_seen(tmp_path):
    """Rows of ctx.train_batches passes (here one per epoch, in on_epoch_end) count in samples_seen
    beside the main steps' rows: 48 rows, 12 held out -> 36 train rows; 3 epochs -> 3 x (36 + 36)."""
    res = trainer(PROBE, ["method.own_optimizer=true", "method.holdout=0.25", "train.epochs=3"],
                  out=tmp_path).fit()
    assert res["samples_seen"] == 3 * (36 + 36)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows] == [36] * 3 and [r["extra_train_samples"] for r in rows] == [36] * 3
    plain = trainer(PROBE, ["method.holdout=0.25", "train.epochs=3"]).fit()
    assert plain["samples_seen"] == 3 * 36


def test_a_nan_loss_is_reported_before_a_later_failure_inside_the_method():
    """The loss is checked every 50 batches; when a method then fails inside torch (here: batch 1
    raises), the NaN loss of batch 0 is what the user is told about, by its batch."""
    tr = trainer("joint", ["train.epochs=1", "data.batch_size=8"])
    plain = tr.method.compute_loss

    def nan_first(model, batch, ctx):
        out = plain(model, batch, ctx)
        if ctx.batch_idx == 0:
            out.loss = out.loss * float("nan")
        return out

    def fails_later(model, batch, result, ctx):
        if ctx.batch_idx == 1:
            raise RuntimeError("deep inside torch")

    tr.method.compute_loss, tr.method.after_backward = nan_first, fails_later
    with pytest.raises(Exception, match="loss became nan at epoch 0, batch 0") as info:
        tr.fit()
    assert isinstance(info.value.__context__, RuntimeError)

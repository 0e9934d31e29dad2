"""Fast by default, exact on request (issue 12, point 5) and the small-model data path (point 6):
channels_last, train.precision, fp32 scores, GradScaler unscaling, device-side logs, the in-memory
fast path, the CUDA data defaults."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from mmbalance.config import resolve_config, upgrade_legacy_keys
from mmbalance.data.base import DataBundle, Subset, TensorMultimodalDataset
from mmbalance.data.fastpath import tensor_batches, tensor_source
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.functional.midas import alpha_update_from_means, alpha_update_tensor
from mmbalance.functional.scores import modality_scores, true_class_prob
from mmbalance.methods.base import LossOutput
from mmbalance.methods.baselines import Joint
from mmbalance.training.trainer import Trainer, config_differences
from utils import tiny_bundle, tiny_config

IMG = {"img": (3, 8, 8), "vec": (5,)}


# ------------------------------------------------------------------------------ channels_last
def _grads_after_one_step(channels_last: bool):
    bundle = tiny_bundle(2, shapes=IMG)
    tr = Trainer(tiny_config("joint", [f"model.channels_last={str(channels_last).lower()}", "train.seed=3"]),
                 None, quiet=True, bundle=bundle)
    batch = next(iter(tr._batches(bundle.train, range(16), 16)))
    out = tr.model(batch.inputs)
    loss = torch.nn.functional.cross_entropy(out.logits, batch.labels)
    loss.backward()
    return tr, out.logits.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def test_channels_last_is_the_default_and_gives_the_same_logits_and_gradients():
    assert resolve_config("synthetic", "joint").model.channels_last is True
    a, la, ga = _grads_after_one_step(True)
    b, lb, gb = _grads_after_one_step(False)
    w = a.model.encoders["img"].features[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert torch.allclose(la, lb, atol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_channels_last_same_loss_trajectory_and_no_effect_on_mlp_or_sequences():
    from utils import two_steps
    losses = {}
    for cl in (True, False):
        tr = Trainer(tiny_config("joint", [f"model.channels_last={str(cl).lower()}"]), None, quiet=True,
                     bundle=tiny_bundle(2, shapes=IMG))
        losses[cl] = [float(r.loss.detach()) for r in two_steps(tr)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    # MLP and sequence encoders: bit-identical (no 4-D parameters or inputs)
    shapes = {"seq": (6, 3), "vec": (5,)}
    params = {}
    for cl in (True, False):
        tr = Trainer(tiny_config("joint", [f"model.channels_last={str(cl).lower()}"]), None, quiet=True,
                     bundle=tiny_bundle(2, shapes=shapes))
        two_steps(tr)
        params[cl] = [p.detach().clone() for p in tr.model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(params[True], params[False]))


# ------------------------------------------------------------------------------ precision
def test_precision_values_and_the_old_bf16_key():
    assert resolve_config("synthetic", "joint").train.precision == "fp32"
    assert resolve_config("synthetic", "joint", overrides=["train.bf16=true"]).train.precision == "bf16"
    assert resolve_config("synthetic", "joint", overrides=["train.bf16=false"]).train.precision == "fp32"
    assert "bf16" not in resolve_config("synthetic", "joint", overrides=["train.bf16=true"]).to_dict()["train"]
    with pytest.raises(ConfigError, match="train.bf16=true .* conflicts with train.precision=fp16"):
        resolve_config("synthetic", "joint", overrides=["train.bf16=true", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        resolve_config("synthetic", "joint", overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Trainer(tiny_config("joint", ["train.precision=fp16"]), None, quiet=True, bundle=tiny_bundle(2))
    tr = Trainer(tiny_config("joint", ["train.precision=bf16"]), None, quiet=True, bundle=tiny_bundle(2))
    with tr._autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_an_old_run_config_with_bf16_still_resolves_and_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config("joint", ["train.epochs=1", "data.n_train=64", "data.n_val=32", "data.n_test=32"])
    Trainer(cfg, out, quiet=True).fit()
    # rewrite the saved config and the checkpoint's config as an older version wrote them
    tree = yaml.safe_load((out / "config.yaml").read_text())
    old = copy.deepcopy(tree)
    del old["train"]["precision"]
    old["train"]["bf16"] = False
    (out / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    ck = out / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    state["config"] = old
    torch.save(state, ck)
    assert config_differences(old, tree) == []
    assert config_differences(upgrade_legacy_keys({"train": {"bf16": True}}), {"train": {"precision": "bf16"}}) == []
    assert config_differences({"train": {"bf16": True}}, {"train": {"precision": "fp32"}}) == ["train.precision"]
    from mmbalance.training.trainer import run_from_dir
    res = run_from_dir(out, quiet=True, overrides=["epochs=2"])
    assert res["epochs"] == 2


def test_scores_are_fp32_under_bf16_autocast_and_equal_the_fp32_computation():
    g = torch.Generator().manual_seed(0)
    logits = {m: torch.randn(8, 5, generator=g).bfloat16() for m in ("a", "b")}
    labels = torch.randint(0, 5, (8,), generator=g)
    ref = {m: torch.softmax(l.float(), 1).gather(1, labels.view(-1, 1)).sum() for m, l in logits.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = modality_scores(logits, labels)
        p = true_class_prob(logits["a"], labels)
    assert p.dtype == torch.float32
    for m in logits:
        assert got[m].dtype == torch.float32 and torch.equal(got[m], ref[m])
    # and the coefficients a method derives from them (OGM-GE's, under the trainer's bf16 autocast)
    from mmbalance.functional.ogm import ogm_coefficient_tensor
    vec = torch.stack([got["a"], got["b"]])
    assert torch.equal(ogm_coefficient_tensor(vec, 0.5), ogm_coefficient_tensor(torch.stack([ref["a"], ref["b"]]), 0.5))


class _Spy(Joint):
    seen = None

    def after_backward(self, model, batch, result, ctx):
        type(self).seen = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_hooks_see_unscaled_gradients_with_a_grad_scaler():
    """fp16 on CUDA uses a GradScaler; the hooks must see the true gradients. Checked on CPU with
    torch's CPU GradScaler (fp32 math, a power-of-two scale: unscaling is exact)."""
    bundle = tiny_bundle(2)
    grads, params = {}, {}
    for scaled in (False, True):
        tr = Trainer(tiny_config("joint", ["train.seed=1"]), None, quiet=True, bundle=bundle)
        method = _Spy(None, tr.method.modalities, tr.method.num_classes)
        tr.ctx.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
        batch = next(iter(tr._batches(bundle.train, range(16), 16)))
        method.training_step(tr.model, batch, tr.ctx)
        grads[scaled] = _Spy.seen
        params[scaled] = [p.detach().clone() for p in tr.model.parameters()]
        if scaled:
            assert tr.ctx.grad_scaler.get_scale() == 1024.0  # no inf: the scale was kept
    for n in grads[False]:
        assert torch.allclose(grads[True][n], grads[False][n], rtol=1e-6, atol=1e-9), n
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-8) for p, q in zip(params[True], params[False]))


# ------------------------------------------------------------------------------ device-side logs
class _TensorLogs(Joint):
    as_tensors = True

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        loss = torch.nn.functional.cross_entropy(out.logits, batch.labels)
        p = out.logits.detach().softmax(1).max(1).values.mean()
        logs = {"conf": p, "fixed": 0.25} if self.as_tensors else {"conf": float(p), "fixed": 0.25}
        return LossOutput(loss, out, logs)


def test_epoch_logs_from_device_tensors_equal_the_float_logs():
    rows = {}
    for as_tensors in (True, False):
        tr = Trainer(tiny_config("joint", ["data.batch_size=10"]), None, quiet=True, bundle=tiny_bundle(2, n=48))
        tr.method = _TensorLogs(None, tr.method.modalities, tr.method.num_classes)
        tr.method.as_tensors = as_tensors
        rows[as_tensors] = tr.train_epoch(0)
    assert rows[True] == rows[False]  # bit-identical: the same float64 additions
    assert set(rows[True]) >= {"train_loss", "train_accuracy", "conf", "fixed"} and rows[True]["fixed"] == 0.25


class _NaNAt(Joint):
    def compute_loss(self, model, batch, ctx):
        res = super().compute_loss(model, batch, ctx)
        if ctx.batch_idx == 1:
            res.loss = res.loss * float("nan")
        return res


def test_a_nonfinite_loss_still_names_its_batch():
    tr = Trainer(tiny_config("joint", ["data.batch_size=16"]), None, quiet=True, bundle=tiny_bundle(2, n=48))
    tr.method = _NaNAt(None, tr.method.modalities, tr.method.num_classes)
    with pytest.raises(MMBalanceError, match="loss became nan at epoch 0, batch 1"):
        tr.train_epoch(0)


# ------------------------------------------------------------------------------ in-memory fast path
def _loader_batches(ds, indices, bs):
    from mmbalance.training.trainer import make_loader
    return list(make_loader(ds, indices, bs, 0))


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.inputs.keys() == y.inputs.keys()
        for m in x.inputs:
            assert x.inputs[m].dtype == y.inputs[m].dtype and torch.equal(x.inputs[m], y.inputs[m])
        for f in ("labels", "index", "tag"):
            u, v = getattr(x, f), getattr(y, f)
            assert u.dtype == v.dtype and torch.equal(u, v), f


def test_fast_path_batches_equal_the_dataloader_batches():
    b = tiny_bundle(2, n=30)
    ds = b.train
    order = list(np.random.default_rng(0).permutation(30))
    _same_batches(list(tensor_batches(tensor_source(ds), order, 7)), _loader_batches(ds, order, 7))
    sub = Subset(Subset(ds, np.arange(3, 27)), np.array([5, 0, 9, 2, 11, 4]))
    assert tensor_source(sub) is not None
    _same_batches(list(tensor_batches(tensor_source(sub), range(6), 4)), _loader_batches(sub, range(6), 4))
    tagged = [(3, 0), 5, (1, 2), (0, 1)]
    _same_batches(list(tensor_batches(tensor_source(ds), tagged, 3)), _loader_batches(ds, tagged, 3))
    tok = TensorMultimodalDataset({"t": torch.arange(20).view(10, 2), "v": torch.randn(10, 3)}, np.arange(10) % 2, 2,
                                  keep_dtype=True)
    _same_batches(list(tensor_batches(tensor_source(tok), range(10), 4)), _loader_batches(tok, range(10), 4))

    class Transformed(TensorMultimodalDataset):  # a subclass may transform: the general path
        pass
    assert tensor_source(Transformed({"a": torch.zeros(2, 1)}, [0, 1], 2)) is None


class _Slow(TensorMultimodalDataset):
    """The same data, but a subclass: the trainer takes the DataLoader path for it."""


def _as_slow(bundle: DataBundle) -> DataBundle:
    splits = {s: _Slow(d.inputs, d.labels, d.num_classes) for s, d in bundle.splits.items()}
    return DataBundle(bundle.name, bundle.modalities, bundle.num_classes, splits)


@pytest.mark.parametrize("method", ["joint", "ogm_ge", "remix"])
def test_fast_path_gives_the_same_run_as_the_dataloader(tmp_path, method):
    bundle = tiny_bundle(2, n=40)
    over = ["train.epochs=2", "train.seed=5"]
    fast = Trainer(tiny_config(method, over), tmp_path / "fast", quiet=True, bundle=bundle).fit()
    slow = Trainer(tiny_config(method, over), tmp_path / "slow", quiet=True, bundle=_as_slow(bundle)).fit()
    for k in ("test", "val", "best_epoch"):
        assert fast[k] == slow[k], k
    rows = [[{k: v for k, v in json.loads(l).items()} for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("fast", "slow")]
    assert rows[0] == rows[1]


def test_num_workers_auto_is_zero_on_cpu():
    tr = Trainer(tiny_config("joint"), None, quiet=True, bundle=tiny_bundle(2))
    assert tr.cfg.data.num_workers == -1 and tr._num_workers() == 0
    with pytest.raises(ConfigError, match="num_workers must be >= 0, or -1 for auto"):
        tiny_config("joint", ["data.num_workers=-2"])


# ------------------------------------------------------------------------------ device-side method state
def test_midas_device_alpha_update_equals_the_host_update():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        alpha = 1.0 + torch.rand(3, generator=g, dtype=torch.float64)
        c, chat = torch.rand(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
        ref, _, _ = alpha_update_from_means(alpha.clone(), c, chat, 0.3)
        assert torch.equal(alpha_update_tensor(alpha, c, chat, 0.3), ref)

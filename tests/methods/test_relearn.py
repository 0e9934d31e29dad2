"""D&R (Wei et al., ECCV 2024): k-means purity, re-init weight and step, schedule, wiring, state,
M=3, no-op, CLI, exact resume across a re-initialisation."""
import io
import json
import math

import numpy as np
import pytest
import torch
from utils import (
    batch_of,
    resume_is_exact,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.functional.relearn import (
    cluster_purity,
    kmeans,
    kmeans_purity,
    minmax_scale,
    reinit_weight,
    soft_reinit,
)
from mmbalance.methods.relearn import RelearnOptions
from mmbalance.training.trainer import Trainer


# ------------------------------------------------------------------------------- pure math
def test_purity_hand_case():
    # spec §4.10: purity(labels [0,0,1,1], clusters [0,0,0,1]) = 0.75
    assert cluster_purity(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert cluster_purity(torch.tensor([5, 5, 9, 9]), torch.tensor([1, 1, 0, 0])) == 1.0  # names do not matter
    assert cluster_purity(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 2])) == 0.5
    with pytest.raises(ValueError):
        cluster_purity(torch.tensor([0, 1]), torch.tensor([0]))


def test_reinit_weight_and_step_hand_case():
    # spec: tanh(3 * 0.3) = 0.716298, tanh(3 * 0.05) = 0.148885; the gap is absolute
    assert reinit_weight(0.9, 0.6, 3.0) == pytest.approx(0.716298, abs=1e-6)
    assert reinit_weight(0.6, 0.9, 3.0) == pytest.approx(0.716298, abs=1e-6)
    assert reinit_weight(0.80, 0.75, 3.0) == pytest.approx(0.148885, abs=1e-6)
    assert reinit_weight(0.8, 0.5, 0.0) == 0.0
    # p0 = 0, p = 1, w = 0.716298 -> p = 0.283702
    p = torch.tensor([1.0, 3.0])
    soft_reinit(p, torch.tensor([0.0, 1.0]), 0.716298)
    assert torch.allclose(p, torch.tensor([0.283702, 3.0 - 2 * 0.716298]), atol=1e-6)


def test_minmax_scale_hand_case():
    x = torch.tensor([[0.0, 5.0, 2.0], [1.0, 5.0, -2.0], [2.0, 5.0, 0.0]])
    # column 0: 0,1,2 -> -1,0,1; constant column -> -1 (sklearn); column 2: 2,-2,0 -> 1,-1,0
    assert torch.allclose(minmax_scale(x), torch.tensor([[-1.0, -1.0, 1.0], [0.0, -1.0, -1.0], [1.0, -1.0, 0.0]]))


def test_kmeans_hand_case():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=torch.float64)
    labels, centers, inertia = kmeans(x, 2, n_init=3, seed=0)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
    assert sorted(centers.flatten().tolist()) == pytest.approx([0.05, 10.05])
    assert inertia == pytest.approx(4 * 0.05 ** 2)  # 0.01
    # more clusters than points: every point its own cluster
    labels, _, inertia = kmeans(x[:2], 3)
    assert len(set(labels.tolist())) == 2 and inertia == 0.0
    with pytest.raises(ValueError):
        kmeans(torch.zeros(0, 2), 2)


def _planted(n=240, k=4, d=5, noise=1.0, flips=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 8 * torch.eye(k, d) + torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    x = centers[y] + noise * torch.randn(n, d, generator=g)
    labels = y.clone()
    labels[:flips] = (labels[:flips] + 1) % k  # label noise: purity below 1
    return x, labels, y


def test_kmeans_purity_matches_sklearn_on_planted_clusters():
    sk = pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler
    for seed in (0, 1, 2):
        x, labels, _ = _planted(seed=seed)
        z = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.numpy().astype(np.float64))
        assert np.allclose(minmax_scale(x.double()).numpy(), z, atol=1e-12)
        clusters = KMeans(n_clusters=4, random_state=0, n_init=10).fit_predict(z)
        counts = np.zeros((4, 4), dtype=int)
        np.add.at(counts, (clusters, labels.numpy()), 1)
        ref = counts.max(1).sum() / len(labels)
        assert kmeans_purity(x, labels, 4) == pytest.approx(ref)
        assert ref == pytest.approx(1 - 24 / 240)  # the planted clusters are found
    del sk


def test_kmeans_is_deterministic():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(3))
    a, b = kmeans(x, 5, seed=0), kmeans(x, 5, seed=0)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]


# ------------------------------------------------------------------------------- method
SMALL = ["data.batch_size=16", "data.n_train=200", "data.n_val=60", "data.n_test=60"]


def _trainer(overrides=(), mods=2, out=None, bundle=None):
    return Trainer(tiny_config("relearn", ["train.epochs=2"] + list(overrides)), out, quiet=True,
                   bundle=bundle or tiny_bundle(mods))


def test_options_rejected():
    for bad in ("method.move_lambda=-1", "method.reinit_epoch=0", "method.reinit_num=-1", "method.kmeans_n_init=0",
                "method.scale=zscore"):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "relearn", None, [bad])


def test_schedule_90_epochs():
    """The code's schedule (defaults 20, 3); the synthetic preset diagnoses every 5 epochs."""
    tr = _trainer(["method.reinit_epoch=20"])
    method = tr.method
    done = []
    for e in range(90):
        if method.due(e):
            done.append(e)
            method.reinit_count += 1
    assert done == [20, 40, 60]
    assert RelearnOptions().reinit_epoch == 20
    assert _trainer().method.options.reinit_epoch == 5  # the synthetic preset


def test_reinit_moves_encoders_only_and_keeps_bn_buffers():
    bundle = tiny_bundle(shapes={"m1": (1, 8, 8), "m2": (6,)})  # m1: small CNN with BatchNorm
    tr = _trainer(["train.epochs=3", "method.reinit_epoch=1"], bundle=bundle)
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        method.training_step(model, batch_of(bundle), ctx)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.reinit(model, {"m1": 0.716298, "m2": 0.25})
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    checked_bn = False
    for k in after:
        if k.startswith("encoders.") and k in params:
            w = 0.716298 if k.startswith("encoders.m1.") else 0.25
            assert torch.allclose(after[k], w * init[k] + (1 - w) * before[k], atol=1e-6), k
            assert not torch.equal(after[k], before[k]), k
        else:  # BN running buffers, fusion, heads: untouched
            assert torch.equal(after[k], before[k]), k
            checked_bn |= "running_mean" in k
    assert checked_bn


def test_epoch_end_wiring():
    tr = _trainer(["method.reinit_epoch=1", "method.move_lambda=5"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    for _ in range(4):
        method.training_step(model, batch_of(tr.bundle), ctx)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    init = {n: method.theta0[n.split(".")[1]][n.split(".", 2)[2]] if n.startswith("encoders.") else v
            for n, v in init.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the reference purities: each split's features through the (separately tested) k-means purity;
    # the features come from a plain encode in eval mode over each split's rows
    model.eval()
    ref = {}
    with torch.no_grad():
        for split in ("train", "val"):
            ds = tr.bundle.splits[split]
            b = batch_of(tr.bundle, split, n=len(ds))
            feats = model.encode(b.inputs)
            for m, z in feats.items():
                ref[split, m] = kmeans_purity(z, b.labels, 3)
    model.train()
    assert any(ref["train", m] != ref["val", m] for m in ("m1", "m2"))  # a swap of the splits would show
    ctx.epoch = 1
    method.on_epoch_start(model, ctx)  # after epoch 0: never
    assert method.on_epoch_end(model, ctx) is None and method.reinit_count == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    ctx.epoch = 2
    method.on_epoch_start(model, ctx)  # after epoch 1 (evaluated): diagnose and re-initialise
    logs = method.on_epoch_end(model, ctx)
    assert method.reinit_count == 1
    for m in ("m1", "m2"):
        assert logs[f"purity_train_{m}"] == pytest.approx(ref["train", m])
        assert logs[f"purity_val_{m}"] == pytest.approx(ref["val", m])
        w = math.tanh(5 * abs(ref["train", m] - ref["val", m]))
        assert logs[f"coeff_{m}"] == pytest.approx(w)
    for n, p in model.named_parameters():
        if n.startswith("encoders."):
            w = logs[f"coeff_{n.split('.')[1]}"]
            assert torch.allclose(p, w * init[n] + (1 - w) * before[n], atol=1e-6), n
        else:
            assert torch.equal(p, before[n]), n


def test_reset_optimizer_state_option():
    tr = _trainer(["method.reinit_epoch=1", "method.reset_optimizer_state=true", "optim.momentum=0.9"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    method.training_step(model, batch_of(tr.bundle), ctx)
    enc = [p for p in model.encoders.parameters()]
    assert all(p in ctx.optimizer.state for p in enc)
    ctx.epoch = 2
    method.on_epoch_start(model, ctx)
    assert not any(p in ctx.optimizer.state for p in enc)
    assert all(p in ctx.optimizer.state for p in model.fusion.parameters())


def test_state_round_trip():
    # one step of joint-style training after a restore ...
    state_round_trip_reproduces_next_step("relearn", ["method.reinit_epoch=1"], epoch=0)
    # ... and the re-initialisation after a restore (theta0 and the count come from the checkpoint)
    bundle = tiny_bundle(2)
    cfg = tiny_config("relearn", ["method.reinit_epoch=1", "method.reinit_num=2"])
    a = Trainer(cfg, None, quiet=True, bundle=bundle)
    a.ctx.epoch = 0
    a.method.on_epoch_start(a.model, a.ctx)
    for _ in range(2):
        a.method.training_step(a.model, batch_of(bundle), a.ctx)
    a.ctx.epoch = 2
    a.method.on_epoch_start(a.model, a.ctx)  # first re-init (after epoch 1)
    buf = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "optimizer": a.optimizer.state_dict(), "method": a.method.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for d in state["method"]["theta0"].values() for v in d.values())
    b = Trainer(cfg, None, quiet=True, bundle=bundle)
    b.model.load_state_dict(state["model"])
    b.optimizer.load_state_dict(state["optimizer"])
    b.method.load_state_dict(state["method"])
    assert b.method.reinit_count == 1
    for t in (a, b):
        t.ctx.epoch = 3
        t.method.on_epoch_start(t.model, t.ctx)  # second re-init (after epoch 2); theta0 not re-taken
        t.method.training_step(t.model, batch_of(bundle), t.ctx)
        assert t.method.reinit_count == 2
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_three_modalities(tmp_path):
    res = _trainer(["train.epochs=3", "method.reinit_epoch=1"], mods=3, out=tmp_path).fit()
    assert math.isfinite(res["test"]["loss"])
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # re-inits after epochs 1 and 2, logged in the rows of the epochs that start from them
    assert "coeff_m3" not in rows[1] and "coeff_m3" in rows[2] and "purity_val_m3" in rows[2]


@pytest.mark.parametrize("noop", ["method.move_lambda=0", "method.reinit_num=0"])
def test_noop_is_joint(tmp_path, noop):
    over = SMALL + ["train.epochs=3"]
    bundle = tiny_bundle(2)
    a = Trainer(tiny_config("relearn", over + ["method.reinit_epoch=1", noop]), tmp_path / "a", quiet=True,
                bundle=bundle).fit()
    b = Trainer(tiny_config("joint", over), tmp_path / "b", quiet=True, bundle=bundle).fit()
    assert a["test"] == b["test"]
    ra = [json.loads(l)["train_loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l)["train_loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb
    # and the mechanism does change the run when active
    Trainer(tiny_config("relearn", over + ["method.reinit_epoch=1", "method.move_lambda=50"]), tmp_path / "c",
                quiet=True, bundle=bundle).fit()
    rc = [json.loads(l)["train_loss"] for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert rc[0] == rb[0] and rc[2] != rb[2]


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "relearn", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


def test_resume_is_exact_across_a_reinit(tmp_path):
    # re-inits after epochs 2 and 4 (at the start of epochs 3 and 5); the run is stopped after epoch
    # 2 (the resumed run re-initialises first) and after epoch 3 (theta0 and the count come from the
    # checkpoint)
    over = SMALL + ["method.reinit_epoch=2", "optim.name=adam", "optim.lr=0.01", "schedule.name=step",
                    "schedule.step_size=2"]
    resume_is_exact("relearn", over, total_epochs=6, stop_after=3, tmp_path=tmp_path / "a")
    rows = [json.loads(l) for l in (tmp_path / "a" / "full" / "metrics.jsonl").read_text().splitlines()]
    has = [any(k.startswith("coeff_") for k in r) for r in rows]
    assert has == [False, False, False, True, False, True]
    resume_is_exact("relearn", over, total_epochs=6, stop_after=4, tmp_path=tmp_path / "b")

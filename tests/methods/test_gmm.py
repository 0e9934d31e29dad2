"""gmm_adaptive: GMM fit and component identification, Eq. 10 on a hand case, the optimiser reset,
refusal of M=3, steps, checkpoints, and the gap collection over two processes."""
import math
import os
import tempfile

import numpy as np
import pytest
import torch

from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.functional.gmm import (GapGMM, adaptive_loss, anneal, fit_gap_gmm, gmm_posteriors, modality_gap,
                                      order_components, warmup_loss)
from mmbalance.methods import build_method
from mmbalance.methods import gmm as gmm_mod
from mmbalance.methods.gmm import collect_gaps
from mmbalance.training.trainer import Trainer
from utils import batch_of, tiny_bundle, tiny_config


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.01, 0.05, 850), rng.normal(0.7, 0.1, 150)])


def test_fit_identifies_balanced_component_and_matches_sklearn_posteriors():
    from sklearn.mixture import GaussianMixture
    g = _planted()
    gmm = fit_gap_gmm(torch.tensor(g), seed=3)
    assert not gmm.degenerate
    assert abs(gmm.mu0 - 0.01) < 0.02 and abs(gmm.means[1] - 0.7) < 0.05
    assert abs(gmm.weights[0] - 0.85) < 0.03
    ref = GaussianMixture(n_components=2, covariance_type="full", max_iter=100, tol=1e-3, reg_covar=1e-6,
                          random_state=3, n_init=3).fit(g.reshape(-1, 1))
    k0 = int(np.argmin(np.abs(ref.means_.ravel())))
    proba = ref.predict_proba(g.reshape(-1, 1))
    w0, w1 = gmm_posteriors(torch.tensor(g, dtype=torch.float64), gmm)
    np.testing.assert_allclose(w0.numpy(), proba[:, k0], atol=1e-6)
    np.testing.assert_allclose(w1.numpy(), proba[:, 1 - k0], atol=1e-6)
    # far in the tail of the balanced component: log-space keeps it finite and exact
    w0, w1 = gmm_posteriors(torch.tensor([50.0, -50.0], dtype=torch.float64), gmm)
    assert torch.isfinite(w0).all() and torch.allclose(w0 + w1, torch.ones(2, dtype=torch.float64))


def test_order_components_and_degenerate_guard():
    g = order_components([0.3, 0.7], [0.6, -0.02], [0.01, 0.02])
    assert g.means == (-0.02, 0.6) and g.weights == (0.7, 0.3) and g.variances == (0.02, 0.01)
    assert not g.degenerate
    assert order_components([0.5, 0.5], [0.10, 0.12], [1, 1]).degenerate  # means too close
    assert order_components([0.995, 0.005], [0.0, 0.5], [1, 1]).degenerate  # a vanishing component
    deg = order_components([0.5, 0.5], [0.10, 0.12], [1, 1])
    w0, w1 = gmm_posteriors(torch.tensor([0.0, 0.5]), deg)
    assert torch.equal(w0, torch.ones(2)) and torch.equal(w1, torch.zeros(2))
    assert fit_gap_gmm(torch.zeros(10)).degenerate  # a single distinct value


def test_gap_and_losses_on_a_hand_case():
    labels = torch.tensor([0, 1])
    l1 = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p1[y] = 0.75, 0.5
    l2 = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])  # p2[y] = 0.5, 0.8
    gap = modality_gap(l1, l2, labels)
    assert torch.allclose(gap, torch.tensor([0.25, -0.3]))

    fused = torch.zeros(2, 2)
    loss, parts = warmup_loss(fused, l1, l2, labels)
    expect = math.log(2) + (-math.log(0.75) - math.log(0.5)) / 2 + (-math.log(0.5) - math.log(0.8)) / 2
    assert abs(float(loss) - expect) < 1e-6

    g = torch.tensor([0.5, -0.2], requires_grad=True)
    w0 = torch.tensor([1.0, 0.25], requires_grad=True)
    w1 = 1 - w0
    loss, parts = adaptive_loss(fused, labels, g, w0, w1, mu0=0.1, lam=0.5, alpha=1.0, beta=2.0, gamma=3.0)
    i1 = math.log(2) + 0.5 * (2 * 0.25 + 0.0)
    i2 = 0.25 * math.log(2) + 0.5 * (2 * 0.04 + 3 * 0.75 * 0.09)
    assert abs(float(loss.detach()) - (i1 + i2) / 2) < 1e-6
    loss.backward()
    assert w0.grad is None  # posteriors detached
    # d/dg_i of mean: lam*(2 beta g + 2 gamma w1 (g - mu0)) / 2
    expect_grad = torch.tensor([0.5 * (4 * 0.5) / 2, 0.5 * (4 * -0.2 + 6 * 0.75 * -0.3) / 2])
    assert torch.allclose(g.grad, expect_grad, atol=1e-6)
    assert anneal(0.96, 0) == 1.0 and abs(anneal(0.96, 2) - 0.9216) < 1e-12


def test_three_modalities_refused():
    with pytest.raises(MethodSetupError, match="exactly 2"):
        build_method("gmm_adaptive", None, ["a", "b", "c"], 3)


def _trainer(tmp_path, extra=(), bundle=None):
    cfg = tiny_config("gmm_adaptive", list(extra))
    return Trainer(cfg, tmp_path, quiet=True, bundle=bundle or tiny_bundle(2))


def test_optimizer_fresh_once_at_adaptive_start(tmp_path):
    torch.manual_seed(0)
    tr = _trainer(tmp_path, ["train.epochs=4", "method.warmup_epochs=1", "method.epochs_per_round=1",
                             "method.rounds=2"])
    seen, fits = [], []
    orig = tr.method.on_epoch_start

    states, sched = [], []

    def spy(model, ctx):
        orig(model, ctx)
        seen.append(ctx.optimizer)
        fits.append(tr.method.fits)
        states.append(len(ctx.optimizer.state))  # momentum buffers held at the epoch start
        sched.append(tr.scheduler.last_epoch)

    tr.method.on_epoch_start = spy
    before = tr.optimizer
    tr.fit()
    assert seen[0] is before  # warm-up: the original optimiser
    assert seen[1] is not before  # fresh at the first adaptive epoch ...
    assert seen[2] is seen[1] and seen[3] is seen[1]  # ... and not at the later refit
    assert tr.optimizer is seen[1]
    assert fits == [0, 1, 2, 2]  # refit at each round start, none after the last round
    # the warm-up optimiser had momentum buffers; the adaptive one starts with none, and a fresh
    # LR schedule; the later refit keeps the (now non-empty) state
    assert len(before.state) > 0 and all("momentum_buffer" in v for v in before.state.values())
    assert states == [0, 0, states[2], states[3]] and states[2] > 0 and states[3] > 0
    assert sched == [0, 0, 1, 2]
    rows = [l for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if l]
    assert len(rows) == 4 and '"gmm_mu0"' in rows[1] and '"lambda": 0.96' in rows[2]


def test_two_adaptive_steps_finite_and_state_round_trip():
    torch.manual_seed(0)
    tr = _trainer(None, ["method.warmup_epochs=0"])
    ctx = tr.ctx
    ctx.epoch = 0
    tr.method.on_epoch_start(tr.model, ctx)
    assert tr.method.gmm is not None and tr.method.fits == 1
    tr.model.train()
    batches = list(tr._batches(tr.bundle.train, range(32), 16))
    for i, b in enumerate(batches):
        ctx.batch_idx = i
        res = tr.method.training_step(tr.model, b, ctx)
        assert math.isfinite(float(res.loss.detach())) and "w_balanced" in res.logs
    path = os.path.join(tempfile.mkdtemp(), "s.pt")
    torch.save(tr.method.state_dict(), path)
    state = torch.load(path, weights_only=True)  # plain values only: no numpy / dataclass pickles
    other = build_method("gmm_adaptive", tr.cfg.method_options, ["m1", "m2"], 3)
    plain = build_method("gmm_adaptive", tr.cfg.method_options, ["m1", "m2"], 3)
    other.load_state_dict(state)
    assert other.gmm == tr.method.gmm and other.fits == 1 and other.reset_done is True
    # behaviour restored: the same adaptive loss; without the state the loss is the warm-up one
    batch = batches[0]
    losses = [float(m.compute_loss(tr.model, batch, ctx).loss.detach()) for m in (tr.method, other, plain)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[2] != pytest.approx(losses[0], rel=1e-3)


def test_collect_gaps_matches_direct_computation():
    torch.manual_seed(0)
    tr = _trainer(None)
    tr.model.train()
    g = collect_gaps(tr.model, tr._train_eval_batches())
    assert tr.model.training  # mode restored
    assert g.shape == (len(tr.bundle.train),) and not g.requires_grad
    tr.model.eval()
    with torch.no_grad():
        b = next(iter(tr._batches(tr.bundle.train, range(5), 5)))
        uni = tr.model.modality_logits(tr.model.encode(b.inputs))
        direct = modality_gap(uni["m1"], uni["m2"], b.labels)
    assert torch.allclose(g[:5], direct, atol=1e-6)


def _worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        tr = _trainer(None)
        batches = list(tr._train_eval_batches())  # this rank's shard
        g = collect_gaps(tr.model, batches)
        if rank == 0:
            torch.save(g, out_file)
        tr.close()  # drop the DDP wrapper before the group goes
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collect_gaps_two_processes(tmp_path):
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    tr = _trainer(None)
    single = collect_gaps(tr.model, tr._train_eval_batches())
    out = tmp_path / "g.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    both = torch.load(out)
    n = len(tr.bundle.train)
    # rank 0 holds indices 0,2,4,..., rank 1 holds 1,3,5,...; gathered in rank order
    order = list(range(0, n, 2)) + list(range(1, n, 2))
    assert both.shape == (n,)
    assert torch.allclose(both, single[order], atol=1e-5)


# ----------------------------------------------------------------------------- planted method-level loss
def _normal(x, mu, var):
    return math.exp(-(x - mu) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)


PLANTED_GMM = GapGMM((0.7, 0.3), (0.1, 0.6), (0.01, 0.04))  # balanced component 0 has mu0 = 0.1 != 0


def _plant(monkeypatch, tr):
    """Two rows, labels (0, 1). Unimodal true-class probabilities: row 0 s1 = 0.75, s2 = 0.25
    (g = +0.5), row 1 s1 = 0.5, s2 = 0.6 (g = -0.1); fused true-class probabilities 0.75, 0.5."""
    model = tr.model
    batch = batch_of(tr.bundle, n=2)
    assert batch.labels.tolist() == [0, 1]
    z = torch.zeros(2, 2, requires_grad=True)
    l3, l15 = math.log(3.0), math.log(1.5)
    uni = {"m1": torch.tensor([[l3, 0.0], [0.0, 0.0]]), "m2": torch.tensor([[0.0, l3], [0.0, l15]])}
    fused = torch.tensor([[l3, 0.0], [0.0, 0.0]])
    monkeypatch.setattr(model, "encode", lambda inputs, modalities=None: {"m1": z, "m2": z})
    monkeypatch.setattr(model, "fuse", lambda f: fused + 0 * f["m1"])
    monkeypatch.setattr(model, "modality_logits", lambda f: {m: uni[m] + 0 * f[m] for m in uni})
    return batch


def _planted_expected(gmm, lam, alpha, beta, gamma):
    (p0, p1), (m0, m1), (v0, v1) = gmm.weights, gmm.means, gmm.variances
    total = 0.0
    for g, ce in ((0.5, -math.log(0.75)), (-0.1, math.log(2.0))):
        a, b = p0 * _normal(g, m0, v0), p1 * _normal(g, m1, v1)
        w0, w1 = a / (a + b), b / (a + b)
        total += alpha * w0 * ce + lam * (beta * g ** 2 + gamma * w1 * (g - m0) ** 2)
    return total / 2


def test_compute_loss_planted_gaps_and_gmm(monkeypatch):
    """Eq. 10 through the method on hand values: w0 at g = 0.5 is ~0.0018 and at g = -0.1 ~0.9965,
    so swapping w0/w1, flipping the gap's sign, u0 = 0 or dropping 0.96^t all move the loss."""
    torch.manual_seed(0)
    tr = _trainer(None, ["method.warmup_epochs=3", "method.alpha=1.5", "method.beta=2.0", "method.gamma=3.0"])
    batch = _plant(monkeypatch, tr)
    tr.method.gmm = PLANTED_GMM
    tr.ctx.epoch = 5  # t = 2 epochs into the adaptive phase
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    expect = _planted_expected(PLANTED_GMM, 0.96 ** 2, 1.5, 2.0, 3.0)
    assert float(res.loss.detach()) == pytest.approx(expect, rel=1e-5)
    assert res.logs["lambda"] == pytest.approx(0.9216)
    assert float(res.logs["gap"]) == pytest.approx(0.2, abs=1e-6)  # mean of +0.5 and -0.1
    # the reference is sensitive to each of the four mutations (sanity of the planted case)
    alt = [_planted_expected(GapGMM((0.3, 0.7), (0.6, 0.1), (0.04, 0.01)), 0.9216, 1.5, 2.0, 3.0),
           _planted_expected(PLANTED_GMM, 1.0, 1.5, 2.0, 3.0),
           _planted_expected(GapGMM((0.7, 0.3), (0.0, 0.6), (0.01, 0.04)), 0.9216, 1.5, 2.0, 3.0)]
    assert all(abs(a - expect) > 1e-3 for a in alt)
    # warm-up epochs ignore the GMM: Eq. 7
    tr.ctx.epoch = 2
    warm = tr.method.compute_loss(tr.model, batch, tr.ctx)
    ce = (-math.log(0.75) + math.log(2.0)) / 2
    l1 = (-math.log(0.75) - math.log(0.5)) / 2
    l2 = (-math.log(0.25) - math.log(0.6)) / 2
    assert float(warm.loss.detach()) == pytest.approx(ce + l1 + l2, rel=1e-5)


def test_balanced_majority_guard(monkeypatch):
    rng = np.random.default_rng(0)
    gaps = np.concatenate([rng.normal(0.0, 0.05, 490), rng.normal(0.5, 0.05, 510)])  # pi0 ~ 0.49
    off = fit_gap_gmm(torch.tensor(gaps))
    assert abs(off.mu0) < 0.02 and 0.45 < off.weights[0] < 0.5 and not off.degenerate
    on = fit_gap_gmm(torch.tensor(gaps), balanced_majority=True)
    assert on.degenerate and on.means == off.means
    # a majority balanced component passes the guard
    assert not fit_gap_gmm(torch.tensor(_planted()), balanced_majority=True).degenerate
    # through the method: the option reaches the fit, and the loss becomes alpha CE + lam beta g^2
    monkeypatch.setattr(gmm_mod, "collect_gaps", lambda model, batches: torch.tensor(gaps, dtype=torch.float32))
    for flag in (False, True):
        torch.manual_seed(0)
        tr = _trainer(None, ["method.warmup_epochs=0", f"method.balanced_majority={str(flag).lower()}"])
        assert tr.method.fit(tr.model, tr.ctx).degenerate is flag
    batch = _plant(monkeypatch, tr)
    res = tr.method.compute_loss(tr.model, batch, tr.ctx)
    ce = -math.log(0.75) + math.log(2.0)
    assert float(res.loss.detach()) == pytest.approx((ce + 0.5 ** 2 + 0.1 ** 2) / 2, rel=1e-5)
    assert float(res.logs["w_balanced"]) == 1.0


def test_options_reject_negative_coefficients():
    for k in ("alpha", "beta", "gamma"):
        with pytest.raises(ConfigError, match=k):
            tiny_config("gmm_adaptive", [f"method.{k}=-0.5"])
    assert tiny_config("gmm_adaptive").method_options.balanced_majority is False

"""gmm_adaptive: GMM fit and component identification, Eq. 10 on a hand case, the optimiser reset,
refusal of M=3, steps, checkpoints, and the gap collection over two processes."""
import copy
import math
import os
import tempfile

import numpy as np
import pytest
import torch

from mmbalance.errors import MethodSetupError
from mmbalance.functional.gmm import (adaptive_loss, anneal, fit_gap_gmm, gmm_posteriors, modality_gap,
                                      order_components, warmup_loss)
from mmbalance.methods import build_method
from mmbalance.methods.gmm import collect_gaps
from mmbalance.training.trainer import Trainer
from utils import tiny_bundle, tiny_config


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

    def spy(model, ctx):
        orig(model, ctx)
        seen.append(ctx.optimizer)
        fits.append(tr.method.fits)

    tr.method.on_epoch_start = spy
    before = tr.optimizer
    tr.fit()
    assert seen[0] is before  # warm-up: the original optimiser
    assert seen[1] is not before  # fresh at the first adaptive epoch ...
    assert seen[2] is seen[1] and seen[3] is seen[1]  # ... and not at the later refit
    assert tr.optimizer is seen[1]
    assert fits == [0, 1, 2, 2]  # refit at each round start, none after the last round
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
    state = copy.deepcopy(tr.method.state_dict())
    other = build_method("gmm_adaptive", tr.cfg.method_options, ["m1", "m2"], 3)
    other.load_state_dict(state)
    assert other.gmm == tr.method.gmm and other.fits == 1 and other.reset_done is True
    torch.save(state, os.path.join(tempfile.mkdtemp(), "s.pt"))  # picklable for checkpoints


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

"""MCR (Kontras et al.): JSD, permuted logits, the detach-pattern game (fusion_in_game, subsets),
NT-Xent, training, options and checkpoints."""
import io
import math

import pytest
import torch
from torch import nn

from mmbalance.errors import MethodSetupError
from mmbalance.errors import ConfigError
from mmbalance.functional.mcr import (game_subsets, js_divergence, mcr_game_loss, perturbation_jsd, perturbed_logits,
                                      random_permutations, supervised_nt_xent)
from mmbalance.methods import build_method
from mmbalance.training.checkpoint import load_checkpoint
from mmbalance.training.trainer import Trainer
from utils import tiny_bundle, tiny_config


# --------------------------------------------------------------------------------------- JSD
def test_jsd_hand_value():
    p = torch.tensor([[0.0, 0.0]])  # softmax = [1/2, 1/2]
    q = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [3/4, 1/4]
    m = [0.625, 0.375]
    expected = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
                      + 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    assert float(js_divergence(p, q)) == pytest.approx(expected, rel=1e-5)
    # batchmean: a second identical row averages to the same value; a row of zeros halves it
    assert float(js_divergence(p.repeat(2, 1), q.repeat(2, 1))) == pytest.approx(expected, rel=1e-5)
    assert float(js_divergence(torch.cat([p, p]), torch.cat([q, p]))) == pytest.approx(expected / 2, rel=1e-5)


def test_jsd_bounds():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 5, generator=g) * 5, torch.randn(64, 5, generator=g) * 5
    v = float(js_divergence(a, b))
    assert 0.0 < v < math.log(2)
    assert float(js_divergence(a, a)) == pytest.approx(0.0, abs=1e-7)
    far = torch.tensor([[1e9, -1e9]])  # clamped to +-1e7: disjoint one-hot distributions
    assert float(js_divergence(far, -far)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(js_divergence(b, a)) == pytest.approx(v, rel=1e-6)  # symmetric


# --------------------------------------------------------------------------- permuted logits
def test_perturbed_logits_rows():
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g)]
    w = [torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g), torch.randn(5, 3, generator=g)]
    b = torch.randn(5, generator=g)
    perms = random_permutations(4, 3, generator=g)
    assert perms.shape == (3, 4) and all(sorted(r.tolist()) == [0, 1, 2, 3] for r in perms)
    out = perturbed_logits(z, w, b, 1, perms)
    assert out.shape == (12, 5)
    for p in range(3):
        for i in range(4):
            ref = z[0][i] @ w[0].t() + z[1][perms[p, i]] @ w[1].t() + z[2][i] @ w[2].t() + b
            assert torch.allclose(out[p * 4 + i], ref, atol=1e-6)


# ----------------------------------------------------------------------------------- the game
def _linear_setup(seed=0, B=8, K=4):
    torch.manual_seed(seed)
    enc = nn.ModuleList([nn.Linear(5, 3), nn.Linear(4, 3)])
    fc = nn.Linear(6, K)
    x = [torch.randn(B, 5), torch.randn(B, 4)]
    perms = random_permutations(B, 6, generator=torch.Generator().manual_seed(seed))
    return enc, fc, x, perms


def _forward(enc, fc, x):
    z = [e(xi) for e, xi in zip(enc, x)]
    base = fc(torch.cat(z, 1))
    ws = [fc.weight[:, :3], fc.weight[:, 3:]]
    return z, ws, base


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _path_grads(enc, fc, x, perms, m, path):
    """Gradient per encoder (flattened) of J_m = JSD(perturbed, base) through one path: ``pert``
    (base detached), ``base`` (perturbed detached) or ``all``."""
    z, ws, base = _forward(enc, fc, x)
    pert = perturbed_logits(z, ws, fc.bias, m, perms)
    rep = base.repeat(perms.shape[0], 1)
    if path == "pert":
        rep = rep.detach()
    elif path == "base":
        pert = pert.detach()
    gs = _grads(js_divergence(pert, rep), [p for e in enc for p in e.parameters()])
    return [torch.cat([g.flatten() for g in gs[:2]]), torch.cat([g.flatten() for g in gs[2:]])]


def _game_grads(enc, fc, x, perms, strategy, lam=1.0, fusion_in_game="none"):
    z, ws, base = _forward(enc, fc, x)
    loss, _ = mcr_game_loss(z, ws, fc.bias, base, perms, strategy, lam, fusion_in_game)
    params = [p for e in enc for p in e.parameters()] + [fc.weight, fc.bias]
    gs = _grads(loss, params)
    enc_g = [torch.cat([g.flatten() for g in gs[:2]]), torch.cat([g.flatten() for g in gs[2:4]])]
    return enc_g, gs[4], gs[5]


def test_greedy_game_no_fusion_gradient_and_opposite_encoder_signals():
    enc, fc, x, perms = _linear_setup()
    enc_g, gw, gb = _game_grads(enc, fc, x, perms, "greedy")
    assert gw.abs().max() < 1e-7 and gb.abs().max() < 1e-7  # fusion weights and bias untouched
    p0 = _path_grads(enc, fc, x, perms, 0, "pert")
    p1 = _path_grads(enc, fc, x, perms, 1, "pert")
    assert min(float(g.abs().max()) for g in p0 + p1) > 1e-4
    # the base path cancels; through the perturbed logits encoder 0 ascends J0 and descends J1,
    # encoder 1 the opposite
    assert torch.allclose(enc_g[0], -p0[0] + p1[0], atol=1e-6)
    assert torch.allclose(enc_g[1], p0[1] - p1[1], atol=1e-6)
    # scaled by lam_M
    enc_h, _, _ = _game_grads(enc, fc, x, perms, "greedy", lam=0.1)
    assert torch.allclose(enc_h[0], 0.1 * enc_g[0], atol=1e-7)


def test_greedy_single_term_moves_encoders_in_opposite_directions():
    """Modality 0's term alone: a small descent step of encoder 0 raises J0 (perturbed logits vs
    the fixed base), one of encoder 1 lowers it; the fusion layer gets nothing."""
    enc, fc, x, perms = _linear_setup(seed=3)
    with torch.no_grad():
        fixed_base = _forward(enc, fc, x)[2].repeat(perms.shape[0], 1)

    def j0():
        with torch.no_grad():
            z, ws, _ = _forward(enc, fc, x)
            return float(js_divergence(perturbed_logits(z, ws, fc.bias, 0, perms), fixed_base))

    z, ws, base = _forward(enc, fc, x)
    term = -perturbation_jsd(z, ws, fc.bias, base, perms, 0, "own") + perturbation_jsd(z, ws, fc.bias, base, perms, 0, "oth")
    term.backward()
    before = j0()
    for i, sign in ((0, 1), (1, -1)):
        saved = [p.detach().clone() for p in enc[i].parameters()]
        with torch.no_grad():
            for p in enc[i].parameters():
                p -= 1e-2 * p.grad  # gradient descent on the game term
        assert sign * (j0() - before) > 0
        with torch.no_grad():
            for p, s in zip(enc[i].parameters(), saved):
                p.copy_(s)
    assert fc.weight.grad.abs().max() < 1e-7 and fc.bias.grad.abs().max() < 1e-7


def test_independent_and_collaborative_differ_as_specified():
    enc, fc, x, perms = _linear_setup(seed=1)
    P = [_path_grads(enc, fc, x, perms, m, "pert") for m in (0, 1)]
    Bs = [_path_grads(enc, fc, x, perms, m, "base") for m in (0, 1)]
    A = [_path_grads(enc, fc, x, perms, m, "all") for m in (0, 1)]
    ind, ind_w, ind_b = _game_grads(enc, fc, x, perms, "independent", lam=0.5)
    col, col_w, col_b = _game_grads(enc, fc, x, perms, "collaborative", lam=0.5)
    # independent: encoder m maximises J_m through the perturbed logits of its own permutation
    # only (own = others detached); the non-detached base passes every J's gradient to it
    for i in (0, 1):
        assert torch.allclose(ind[i], -0.5 * (P[i][i] + Bs[0][i] + Bs[1][i]), atol=1e-6)
    # collaborative: every encoder maximises every J through every path
    for i in (0, 1):
        assert torch.allclose(col[i], -0.5 * (A[0][i] + A[1][i]), atol=1e-6)
    # they differ exactly by the perturbed-path gradient of the other modality's J
    assert torch.allclose(col[0] - ind[0], -0.5 * P[1][0], atol=1e-6)
    assert float((col[0] - ind[0]).abs().max()) > 1e-5
    # both give the fusion layer gradient (greedy does not), and the same one (values identical)
    assert ind_w.abs().max() > 1e-5 and ind_b.abs().max() > 1e-6
    assert torch.allclose(ind_w, col_w, atol=1e-6) and torch.allclose(ind_b, col_b, atol=1e-6)


def test_game_three_modalities_own_and_oth():
    torch.manual_seed(0)
    z = [torch.randn(6, 2, requires_grad=True) for _ in range(3)]
    w = [torch.randn(3, 2, requires_grad=True) for _ in range(3)]
    b = torch.randn(3, requires_grad=True)
    perms = random_permutations(6, 4, generator=torch.Generator().manual_seed(0))
    base = sum(zi @ wi.t() for zi, wi in zip(z, w)) + b
    own = perturbation_jsd(z, w, b, base, perms, 1, "own")
    gz = torch.autograd.grad(own, z, retain_graph=True, allow_unused=True)
    # own: gradient reaches feature 1 (permuted) and, via the non-detached base, every feature
    assert gz[1] is not None
    loss, vals = mcr_game_loss(z, w, b, base, perms, "greedy")
    gz = torch.autograd.grad(loss, z + w + [b])
    assert all(g.abs().max() < 1e-6 for g in gz[3:])  # fusion layer: cancels
    assert all(g.abs().max() > 1e-5 for g in gz[:3])  # every encoder feature gets a signal
    assert set(vals) == {(0,), (1,), (2,)} and all(0 <= float(v) <= math.log(2) for v in vals.values())


# ----------------------------------------------------------------------------------- NT-Xent
def _nt_xent_loop(emb, labels, t):
    z = torch.nn.functional.normalize(emb, dim=1)
    n = len(labels)
    losses = []
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            s_ap = float(z[a] @ z[p]) / t
            negs = [math.exp(float(z[a] @ z[k]) / t) for k in range(n) if labels[k] != labels[a]]
            losses.append(-math.log(math.exp(s_ap) / (math.exp(s_ap) + sum(negs))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_loop(t):
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(10, 4, generator=g) * 3
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 1, 3])  # class 3 has no positive
    assert float(supervised_nt_xent(emb, labels, t)) == pytest.approx(_nt_xent_loop(emb, labels, t), rel=1e-5)


def test_nt_xent_no_positives_is_zero_and_differentiable():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = supervised_nt_xent(emb, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mods", [2, 3])
def test_two_steps_finite(mods, tmp_path):
    bundle = tiny_bundle(num_modalities=mods, n=32)
    cfg = tiny_config("mcr", ["train.epochs=1", "method.num_samples=4"])
    res = Trainer(cfg, tmp_path, quiet=True, bundle=bundle).fit()
    assert math.isfinite(res["test"]["loss"])
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"loss_game"' in rows[0] and '"loss_con"' in rows[0]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["method"] == {}
    assert f'"game_terms": {float(mods)}' in rows[0]  # singles: one term per modality


def test_ceb_and_projection_extras_train_and_checkpoint(tmp_path):
    bundle = tiny_bundle(num_modalities=2, n=32)
    cfg = tiny_config("mcr", ["train.epochs=1", "method.num_samples=2", "method.ceb_weight=1",
                              "method.con_projection=always", "method.strategy=collaborative"])
    tr = Trainer(cfg, tmp_path, quiet=True, bundle=bundle)
    assert set(tr.model.extras) == {"mcr_ceb", "mcr_proj"}
    before = tr.model.extras["mcr_ceb"][0].weight.detach().clone()
    tr.fit()
    assert not torch.equal(before, tr.model.extras["mcr_ceb"][0].weight)  # optimised with the model
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert any(k.startswith("extras.mcr_ceb") for k in state["model"])


def test_state_dict_round_trip():
    a = build_method("mcr", None, ["a", "b"], 3)
    b = build_method("mcr", None, ["a", "b"], 3)
    b.load_state_dict(a.state_dict())
    assert a.state_dict() == b.state_dict() == {}


def test_refuses_non_concat_fusion_and_one_modality():
    with pytest.raises(MethodSetupError, match="concat"):
        Trainer(tiny_config("mcr", ["model.fusion=sum"]), None, quiet=True, bundle=tiny_bundle(n=16))
    with pytest.raises(MethodSetupError):
        build_method("mcr", None, ["a"], 3)


def test_defaults_and_options():
    cfg = tiny_config("mcr")
    o = cfg.method_options
    assert (o.lam_M, o.lambda_uni, o.num_samples, o.strategy, o.temperature, o.con_weight, o.ceb_weight) == \
        (0.1, 0.01, 32, "greedy", 0.5, 1.0, 0.0)
    assert (o.fusion_in_game, o.subsets) == ("with_encoder", "singles")
    with pytest.raises(ConfigError, match="strategy"):
        tiny_config("mcr", ["method.strategy=minmax"])


@pytest.mark.parametrize("override, match", [("method.fusion_in_game=weights", "fusion_in_game"),
                                             ("method.subsets=pairs", "subsets"),
                                             ("method.lam_M=-0.1", "lam_M"),
                                             ("method.lambda_uni=-1", "lambda_uni"),
                                             ("method.num_samples=0", "num_samples"),
                                             ("method.start_epoch=-1", "start_epoch")])
def test_invalid_options_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("mcr", [override])


# ------------------------------------------------------------------ what a detach covers
def _hand_case():
    """B = 2, K = 2, d = 1, one swap. z_1 is constant, so permuting it changes nothing (J_1 = 0
    and its gradients vanish); W_0 = [[ln 3], [0]], W_1 = 0, b = 0 -> base logit differences
    (+ln 3, -ln 3), permuted ones (-ln 3, +ln 3): p = sigma(-+ln 3) = 1/4, 3/4 against q = 3/4,
    1/4, m = 1/2 per row."""
    z = [torch.tensor([[1.0], [-1.0]], requires_grad=True), torch.tensor([[0.5], [0.5]], requires_grad=True)]
    w = [torch.tensor([[math.log(3.0)], [0.0]], requires_grad=True), torch.zeros(2, 1, requires_grad=True)]
    b = torch.zeros(2, requires_grad=True)
    base = sum(zi @ wi.t() for zi, wi in zip(z, w)) + b
    return z, w, b, base, torch.tensor([[1, 0]])


@pytest.mark.parametrize("fusion_in_game", ["none", "with_encoder"])
def test_fusion_in_game_hand_gradients(fusion_in_game):
    """Two-class JSD: dJSD/dt = p(1-p)(t - logit m)/2 for the perturbed logit difference t. Per
    row that is -+(3/32) ln 3; with batchmean over 2 rows, dJ0/dW_0[0] through the permuted
    product = (1/2)[(-3/32 ln3)(z_0[1] = -1) + (3/32 ln3)(z_0[0] = 1)] = (3/32) ln 3, and the game
    is -J0_own + J0_oth: with_encoder -> W_0 gets -(3/32) ln 3 (class 0) and +(3/32) ln 3
    (class 1: the softmax depends on the difference); none -> own and oth cancel -> 0. The
    encoder feature z_0 gets -+(3/64) (ln 3)^2 in both readings."""
    z, w, b, base, perms = _hand_case()
    loss, vals = mcr_game_loss(z, w, b, base, perms, "greedy", 1.0, fusion_in_game)
    c = 3.0 / 32.0 * math.log(3.0)
    assert float(vals[(0,)]) == pytest.approx(0.75 * math.log(3.0) - math.log(2.0), abs=1e-6)  # H(1/2) - H(1/4)
    assert float(vals[(1,)]) == pytest.approx(0.0, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)  # -J + J per modality
    gz0, gz1, gw0, gw1, gb = torch.autograd.grad(loss, z + w + [b])
    expect_w0 = [[-c], [c]] if fusion_in_game == "with_encoder" else [[0.0], [0.0]]
    assert torch.allclose(gw0, torch.tensor(expect_w0), atol=1e-6)
    assert torch.allclose(gw1, torch.zeros(2, 1), atol=1e-7)
    assert torch.allclose(gb, torch.zeros(2), atol=1e-7)
    e = 3.0 / 64.0 * math.log(3.0) ** 2
    assert torch.allclose(gz0, torch.tensor([[-e], [e]]), atol=1e-6)
    assert torch.allclose(gz1, torch.zeros(2, 1), atol=1e-7)


def _manual_jsd_pert_path(z, w, b, base, perms, subset, wrt):
    """Reference (no function under test but js_divergence): gradient of J_S w.r.t. ``wrt``
    through the permuted logits only (base detached), rows built one by one."""
    rows = []
    for p in range(perms.shape[0]):
        for i in range(perms.shape[1]):
            row = b.clone()
            for j in range(len(z)):
                src = int(perms[p, i]) if j in subset else i
                row = row + z[j][src] @ w[j].t()
            rows.append(row)
    pert = torch.stack(rows)
    jsd = js_divergence(pert, base.detach().repeat(perms.shape[0], 1))
    return torch.autograd.grad(jsd, wrt)


def test_with_encoder_weight_blocks_play_with_their_encoders():
    """Random M = 2 case: with_encoder gives W_0 the pert-path gradient -dJ0/dW_0 + dJ1/dW_0
    (it ascends its own importance with encoder 0 and descends modality 1's), W_1 the mirror;
    none gives the weight blocks nothing; the bias gets nothing in both; the encoders get the
    same gradients in both readings."""
    g = torch.Generator().manual_seed(5)
    z = [torch.randn(6, 3, generator=g).requires_grad_(), torch.randn(6, 2, generator=g).requires_grad_()]
    w = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(4, 2, generator=g).requires_grad_()]
    b = torch.randn(4, generator=g).requires_grad_()
    perms = random_permutations(6, 3, generator=g)
    grads = {}
    for mode in ("none", "with_encoder"):
        base = sum(zi @ wi.t() for zi, wi in zip(z, w)) + b
        loss, _ = mcr_game_loss(z, w, b, base, perms, "greedy", 0.5, mode)
        grads[mode] = torch.autograd.grad(loss, z + w + [b])
    j0 = _manual_jsd_pert_path(z, w, b, sum(zi @ wi.t() for zi, wi in zip(z, w)) + b, perms, (0,), w)
    j1 = _manual_jsd_pert_path(z, w, b, sum(zi @ wi.t() for zi, wi in zip(z, w)) + b, perms, (1,), w)
    gw0, gw1 = grads["with_encoder"][2], grads["with_encoder"][3]
    assert torch.allclose(gw0, 0.5 * (-j0[0] + j1[0]), atol=1e-6)
    assert torch.allclose(gw1, 0.5 * (j0[1] - j1[1]), atol=1e-6)
    assert float(gw0.abs().max()) > 1e-4 and float(gw1.abs().max()) > 1e-4
    for k in (2, 3, 4):
        assert float(grads["none"][k].abs().max()) < 1e-6
    assert float(grads["with_encoder"][4].abs().max()) < 1e-6
    for k in (0, 1):
        assert torch.allclose(grads["none"][k], grads["with_encoder"][k], atol=1e-6)


def test_trainer_fusion_layer_gets_game_gradient_only_with_encoder():
    """Through the method's compute_loss on a tiny model: the game's own gradient on the fusion
    weight (loss with lam_M minus loss without, same permutations) is non-zero only with
    with_encoder; the fusion bias gets none in either reading."""
    bundle = tiny_bundle(num_modalities=2, n=16)
    res = {}
    for mode in ("none", "with_encoder"):
        grads = []
        for lam in (0.0, 1.0):
            torch.manual_seed(0)
            tr = Trainer(tiny_config("mcr", ["method.num_samples=3", f"method.lam_M={lam}", "method.con_weight=0",
                                            f"method.fusion_in_game={mode}"]), None, quiet=True, bundle=bundle)
            b = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
            torch.manual_seed(1)
            out = tr.method.compute_loss(tr.model, b, tr.ctx)
            fc = tr.model.fusion.fc
            grads.append(torch.autograd.grad(out.loss, [fc.weight, fc.bias]))
        res[mode] = [g1 - g0 for g0, g1 in zip(*grads)]
    assert float(res["none"][0].abs().max()) < 1e-6
    assert float(res["with_encoder"][0].abs().max()) > 1e-5
    assert float(res["none"][1].abs().max()) < 1e-6 and float(res["with_encoder"][1].abs().max()) < 1e-6


# ------------------------------------------------------------------------------- subsets
def test_game_subsets_lists():
    assert game_subsets(2, "singles") == game_subsets(2, "all") == [(0,), (1,)]
    assert game_subsets(3, "singles") == [(0,), (1,), (2,)]
    assert game_subsets(3, "all") == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
    assert len(game_subsets(4, "all")) == 14  # 2^4 - 2: no empty set, no full set
    with pytest.raises(ValueError, match="subsets"):
        game_subsets(3, "pairs")


def test_subset_permutation_rows_and_game():
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(5, 2, generator=g).requires_grad_() for _ in range(3)]
    w = [torch.randn(3, 2, generator=g).requires_grad_() for _ in range(3)]
    b = torch.randn(3, generator=g).requires_grad_()
    perms = random_permutations(5, 2, generator=g)
    out = perturbed_logits(z, w, b, (0, 2), perms)
    for p in range(2):
        for i in range(5):
            k = int(perms[p, i])  # one permutation shared by the whole subset
            ref = z[0][k] @ w[0].t() + z[1][i] @ w[1].t() + z[2][k] @ w[2].t() + b
            assert torch.allclose(out[p * 5 + i], ref, atol=1e-6)
    base = sum(zi @ wi.t() for zi, wi in zip(z, w)) + b
    single, vs = mcr_game_loss(z, w, b, base, perms, "greedy", 1.0, "none", "singles")
    full, va = mcr_game_loss(z, w, b, base, perms, "greedy", 1.0, "none", "all")
    assert set(vs) == {(0,), (1,), (2,)} and set(va) == set(vs) | {(0, 1), (0, 2), (1, 2)}
    for s in vs:
        assert torch.equal(vs[s], va[s])
    # the pair (0, 2): own gives gradient to z_0 and z_2 through the permuted logits only, oth to z_1
    own = perturbation_jsd(z, w, b, base.detach(), perms, (0, 2), "own")
    gz = torch.autograd.grad(own, z, allow_unused=True)
    assert gz[1] is None and gz[0] is not None and gz[2] is not None
    oth = perturbation_jsd(z, w, b, base.detach(), perms, (0, 2), "oth")
    gz = torch.autograd.grad(oth, z, allow_unused=True)
    assert gz[0] is None and gz[2] is None and gz[1] is not None
    # extra pair terms change the encoder gradients; the fusion layer still cancels under none
    g_s = torch.autograd.grad(single, z + w + [b], retain_graph=True)
    g_a = torch.autograd.grad(full, z + w + [b])
    assert float((g_s[0] - g_a[0]).abs().max()) > 1e-5
    assert all(float(g.abs().max()) < 1e-6 for g in g_a[3:])


def test_three_modalities_all_subsets_train(tmp_path):
    bundle = tiny_bundle(num_modalities=3, n=32)
    cfg = tiny_config("mcr", ["train.epochs=1", "method.num_samples=2", "method.subsets=all"])
    res = Trainer(cfg, tmp_path, quiet=True, bundle=bundle).fit()
    assert math.isfinite(res["test"]["loss"])
    row = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert '"game_terms": 6.0' in row and '"jsd_m1+m3"' in row


def test_state_dict_loads_with_weights_only():
    m = build_method("mcr", None, ["a", "b"], 3)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == m.state_dict()

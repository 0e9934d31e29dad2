"""LFM (Yang et al., NeurIPS 2024), heuristic schedule and learnable alpha: alpha, JS term, Hessian-vector
hypergradient, loss wiring, holdout, state, M=3, no-op, CLI, exact resume."""
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
from mmbalance.errors import ConfigError
from mmbalance.functional.lfm import (
    alpha_hypergradient,
    heuristic_alpha1,
    heuristic_polynomial,
    learnable_lr,
    lfm_loss,
    mean_pairwise_js,
    update_alpha2,
)
from mmbalance.models.fusion import LateFusion
from mmbalance.training.trainer import Trainer


def _js_by_hand(la, lb):
    p, q = la.softmax(-1), lb.softmax(-1)
    m = 0.5 * (p + q)
    return float((0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean())


def test_js_hand_case():
    # spec §4.13: o_a = [2, 0], o_v = [0, 0] -> JS = 0.089541
    js = mean_pairwise_js({"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])})
    assert float(js) == pytest.approx(0.089541, abs=1e-6)
    # three modalities: mean over the 3 pairs; (a, v) = 0.089541, (a, t) = 0.089541 (t = v), (v, t) = 0
    js3 = mean_pairwise_js({"a": torch.tensor([[2.0, 0.0]]), "v": torch.zeros(1, 2), "t": torch.zeros(1, 2)})
    assert float(js3) == pytest.approx(2 * 0.089541 / 3, abs=1e-6)


def test_heuristic_alpha_values():
    # spec values of the raw fit (a 200-epoch run)
    for e, a in ((0, 0.20462), (25, 0.32780), (50, 0.43668), (100, 0.53916), (150, 0.82131), (199, 0.91599)):
        assert heuristic_alpha1(e, 200) == pytest.approx(a, abs=5e-6), e
    # rescaled to the run length: epoch 25 of 100 is epoch 50 of the fit
    assert heuristic_alpha1(25, 100) == pytest.approx(0.43668, abs=5e-6)
    assert heuristic_alpha1(25, 100, rescale=False) == pytest.approx(0.32780, abs=5e-6)
    # the polynomial diverges after 200 (-2.31 at 250) and exceeds 1 near 184: clamped to [0, 1]
    assert heuristic_polynomial(250) == pytest.approx(-2.31, abs=0.01)
    assert heuristic_alpha1(250, 200, rescale=False) == 0.0
    assert heuristic_polynomial(184) > 1.0 and heuristic_alpha1(184, 200) == 1.0


def test_loss_formula():
    assert float(lfm_loss(torch.tensor(1.0), torch.tensor(0.5), 0.2)) == pytest.approx(2 * (0.2 + 0.8 * 0.5))


def _trainer(overrides=(), mods=2, out=None):
    return Trainer(tiny_config("lfm", ["train.epochs=1"] + list(overrides)), out, quiet=True, bundle=tiny_bundle(mods))


def test_compute_loss_wiring_and_model():
    tr = _trainer(["train.epochs=100"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    assert isinstance(model.fusion, LateFusion)
    ctx.epoch = 25
    method.on_epoch_start(model, ctx)
    assert method.alpha1 == pytest.approx(0.43668, abs=5e-6)
    batch = batch_of(tr.bundle, n=16)
    res = method.compute_loss(model, batch, ctx)
    feats = {m: z.detach() for m, z in res.output.features.items()}
    with torch.no_grad():
        oa = model.fusion.branches["m1"](feats["m1"])
        ov = model.fusion.branches["m2"](feats["m2"])
    ce = F.cross_entropy(0.5 * oa + 0.5 * ov, batch.labels)
    a1 = method.alpha1
    expect = 2 * (a1 * float(ce) + (1 - a1) * _js_by_hand(oa, ov))
    assert float(res.loss.detach()) == pytest.approx(expect, rel=1e-5)
    assert float(res.logs["alpha_align"]) == pytest.approx(1 - a1)
    # per-modality predictions are each modality's own classifier
    with torch.no_grad():
        zo = method.zero_out_logits(model, res.output)
    assert torch.allclose(zo["m1"], oa) and torch.allclose(zo["m2"], ov)


def test_fixed_mode_and_options():
    tr = _trainer(["method.mode=fixed", "method.alpha1=0.3"])
    tr.ctx.epoch = 0
    tr.method.on_epoch_start(tr.model, tr.ctx)
    assert tr.method.alpha1 == 0.3
    for bad in ("method.mode=x", "method.alpha1=1.5", "method.alpha1=-0.1", "method.scale=-1",
                "method.learn_init=0.99", "method.lr_alpha=-1", "method.lr_alpha_halve_every=-1", "method.holdout=0",
                "method.holdout=0.5", "method.hvp_samples=0"):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", "lfm", None, [bad])


def test_state_round_trip():
    state_round_trip_reproduces_next_step("lfm", ["train.epochs=100"], epoch=30)


def test_three_modalities_train(tmp_path):
    tr = _trainer([], mods=3, out=tmp_path)
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"])
    row = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert '"loss_align"' in row


def test_noop_is_joint_on_late_fusion():
    assert_same_step("lfm", ["model.fusion=late", "method.mode=fixed", "method.alpha1=1", "method.scale=1"],
                     base="joint", base_overrides=["model.fusion=late"])
    with pytest.raises(AssertionError):  # the alignment term changes the step
        assert_same_step("lfm", ["model.fusion=late"], base="joint", base_overrides=["model.fusion=late"])


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "lfm", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


# ------------------------------------------------------------------------------- learnable alpha
def test_hypergradient_hand_case():
    # theta = ([a, b], [c]); L_cls = a^2 b + c^2, L_align = b^2 + c^3, alpha1 = 0.25 at a=1, b=2, c=1:
    # v = grad L_cls = (2ab, a^2, 2c) = (4, 1, 2); H_T on (a, b) = [[2 a1 b, 2 a1 a], [2 a1 a, 2 a2]] = [[1, .5], [.5, 1.5]]
    # and no (a,b)-c cross terms: HVP[first tensor] = (1*4 + .5*1, .5*4 + 1.5*1) = (4.5, 3.5) -> mean 4.0
    ab = torch.tensor([1.0, 2.0], requires_grad=True)
    c = torch.tensor([1.0], requires_grad=True)
    l_cls = ab[0] ** 2 * ab[1] + (c ** 2).sum()
    l_align = ab[1] ** 2 + (c ** 3).sum()
    assert alpha_hypergradient(l_cls, l_align, 0.25, [ab, c]) == pytest.approx(4.0)
    # the FIRST tensor only: with c first, HVP[c] = H_T[c,c] v_c = (2 a1 + 6 a2 c) * 2 = (0.5 + 4.5) * 2 = 10
    l_cls = ab[0] ** 2 * ab[1] + (c ** 2).sum()
    l_align = ab[1] ** 2 + (c ** 3).sum()
    assert alpha_hypergradient(l_cls, l_align, 0.25, [c, ab]) == pytest.approx(10.0)
    # update: alpha2 = clip(0.75 - 1e-4 * 4.0) = 0.7496; clipped to [0.05, 0.95]
    assert update_alpha2(0.75, 4.0, 1e-4) == pytest.approx(0.7496)
    assert update_alpha2(0.06, 1000.0, 1e-4) == 0.05
    assert update_alpha2(0.9, -1000.0, 1e-4) == 0.95
    # step size: halved at epochs 20, 40, ... (before that epoch's update)
    assert [learnable_lr(e, 1e-4) for e in (0, 19, 20, 39, 40)] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])
    assert learnable_lr(100, 1e-4, 0) == 1e-4


def _reference_hypergradient(model, method, batch):
    """mean(HVP[first parameter]) through torch.autograd.functional.hvp on a flat parameter vector."""
    from torch.func import functional_call
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if p.requires_grad])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def losses(v):
        params = unflat(v)
        feats = {m: functional_call(model.encoders[m], {k[len(f"encoders.{m}."):]: t for k, t in params.items()
                                                         if k.startswith(f"encoders.{m}.")}, (batch.inputs[m],))
                 for m in model.modalities}
        fusion = {k[len("fusion."):]: t for k, t in params.items() if k.startswith("fusion.")}
        branch = {m: functional_call(model.fusion.branches[m], {k[len(f"branches.{m}."):]: t for k, t in fusion.items()
                                                              if k.startswith(f"branches.{m}.")}, (feats[m],))
                  for m in model.modalities}
        fused = torch.stack([branch[m] for m in model.modalities]).mean(0)
        return F.cross_entropy(fused, batch.labels), mean_pairwise_js(branch)

    a1 = method.alpha1
    x = flat0.clone().requires_grad_(True)
    g_cls = torch.autograd.grad(losses(x)[0], x)[0]
    _, hvp = torch.autograd.functional.hvp(lambda t: a1 * losses(t)[0] + (1 - a1) * losses(t)[1], flat0, g_cls)
    return float(hvp[: shapes[0].numel()].double().mean())


def test_learnable_alpha_wiring_and_holdout():
    tr = _trainer(["method.mode=learnable", "method.lr_alpha=100", "method.holdout=0.25", "method.hvp_samples=8",
                   "method.learn_init=0.5"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    # 25 % of the 48 training rows (12, stratified over 3 classes) are held out and leave train
    assert ctx.holdout_size == 12 and len(tr.bundle.train) == 36
    assert method.alpha1 == pytest.approx(0.5)
    batch = next(iter(ctx.holdout_batches(batch_size=8)))
    assert len(batch) == 8
    ref = _reference_hypergradient(model, method, batch)
    assert ref != 0.0
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    logs = method.on_epoch_end(model, ctx)
    assert logs["alpha_hypergrad"] == pytest.approx(ref, rel=1e-4, abs=1e-9)
    assert logs["alpha_lr"] == 100
    assert method.alpha1 == pytest.approx(1 - (0.5 - 100 * logs["alpha_hypergrad"]), abs=1e-12)
    assert abs(method.alpha1 - 0.5) > 1e-4  # moved, not clipped
    # epoch 20 halves the step: 50
    a1 = method.alpha1
    ctx.epoch = 20
    method.on_epoch_start(model, ctx)
    g = method.on_epoch_end(model, ctx)["alpha_hypergrad"]
    assert method.alpha1 == pytest.approx(1 - min(0.95, max(0.05, (1 - a1) - 50 * g)), abs=1e-12)
    # the loss uses the learned alpha
    res = method.compute_loss(model, batch_of(tr.bundle), ctx)
    assert float(res.logs["alpha_cls"]) == method.alpha1


def test_learnable_only_mode_holds_out():
    assert _trainer().ctx.holdout_size == 0
    assert _trainer(["method.mode=fixed"]).ctx.holdout_size == 0
    tr = _trainer(["method.mode=learnable", "data.method_holdout=0.3"])  # the data key wins
    assert tr.ctx.holdout_size > 12


def test_learnable_state_round_trip():
    state_round_trip_reproduces_next_step("lfm", ["method.mode=learnable", "method.lr_alpha=100",
                                                  "method.holdout=0.25", "method.learn_init=0.5"], epoch=1)


def test_learnable_three_modalities(tmp_path):
    tr = _trainer(["method.mode=learnable", "method.holdout=0.25", "train.epochs=2"], mods=3, out=tmp_path)
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"]) and res["holdout_size"] == 12
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("alpha_hypergrad" in r for r in rows)


def test_learnable_noop_is_fixed_alpha():
    # lr_alpha = 0: alpha stays at its start, i.e. fixed mode with alpha1 = learn_init on the same split
    hold = ["method.holdout=0.25", "method.learn_init=0.5"]
    fixed = ["method.mode=fixed", "method.alpha1=0.5", "data.method_holdout=0.25"]
    assert_same_step("lfm", ["method.mode=learnable", "method.lr_alpha=0"] + hold, base="lfm", base_overrides=fixed)
    with pytest.raises(AssertionError):
        assert_same_step("lfm", ["method.mode=learnable", "method.lr_alpha=1000"] + hold, base="lfm",
                         base_overrides=fixed)


def test_learnable_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "lfm", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                 "method.mode=learnable"]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["holdout_size"] > 0


def test_learnable_resume_is_exact_across_a_step_halving(tmp_path):
    over = ["data.n_train=200", "data.n_val=60", "data.n_test=60", "data.batch_size=32", "method.mode=learnable",
            "method.lr_alpha=50", "method.lr_alpha_halve_every=2", "method.holdout=0.1", "method.learn_init=0.5"]
    resume_is_exact("lfm", over, total_epochs=4, stop_after=2, tmp_path=tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alpha_lr"] for r in rows] == [50, 50, 25, 25]
    assert len({r["alpha_cls"] for r in rows}) > 1  # alpha moved

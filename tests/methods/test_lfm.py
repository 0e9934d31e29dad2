"""LFM (Yang et al., NeurIPS 2024), heuristic schedule: alpha, JS term, loss wiring, state, M=3, no-op, CLI."""
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
from mmbalance.functional.lfm import (
    heuristic_alpha1,
    heuristic_polynomial,
    lfm_loss,
    mean_pairwise_js,
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
    for bad in ("method.mode=learnable", "method.mode=x", "method.alpha1=1.5", "method.alpha1=-0.1", "method.scale=-1"):
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

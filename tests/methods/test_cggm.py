"""CGGM (Guo et al., NeurIPS 2024): coefficients, direction loss, the modulated step, state, resume."""
import copy
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

from mmbalance.errors import MethodSetupError
from mmbalance.functional.cggm import coefficients, direction_cosines, gm_loss
from mmbalance.training.trainer import Trainer

PLAIN = ["optim.momentum=0", "optim.weight_decay=0"]


# ------------------------------------------------------------------------------------ pure math
def test_coefficients_spec_hand_case():
    # acc_prev = [0.5, 0.4], acc = [0.6, 0.45]: d = [0.1, 0.05], sum 0.15 -> [0.05, 0.1] / 0.15
    c = coefficients(torch.tensor([0.6, 0.45]), torch.tensor([0.5, 0.4]))
    assert c.tolist() == pytest.approx([0.333333, 0.666667], abs=1e-6)  # the faster modality is damped


def test_coefficients_guards_and_raw_code_values():
    acc, prev = torch.tensor([0.7, 0.3], dtype=torch.float64), torch.tensor([0.4, 0.4], dtype=torch.float64)
    # d = [0.3, -0.1], sum 0.2: raw [(0.2 - 0.3) / 0.2, (0.2 + 0.1) / 0.2] = [-0.5, 1.5]
    assert coefficients(acc, prev, guard=False).tolist() == pytest.approx([-0.5, 1.5], abs=1e-6)
    assert coefficients(acc, prev).tolist() == pytest.approx([0.0, 1.5], abs=1e-6)  # clipped to [0, 2]
    # d = [0.5, -0.3], sum 0.2: raw [-1.5, 2.5] -> clipped [0, 2] (bounded amplification)
    big = coefficients(torch.tensor([0.9, 0.1], dtype=torch.float64), prev)
    assert big.tolist() == pytest.approx([0.0, 2.0], abs=1e-6)
    # d = [0.1, -0.1]: sum 0 -> undefined; guarded: every coefficient 1
    flat = coefficients(torch.tensor([0.6, 0.3]), torch.tensor([0.5, 0.4]))
    assert flat.tolist() == [1.0, 1.0]
    # M = 3: d = [0.1, 0.2, 0.1], sum 0.4 -> [0.3, 0.2, 0.3] / 0.4
    c3 = coefficients(torch.tensor([0.1, 0.2, 0.1]), torch.zeros(3))
    assert c3.tolist() == pytest.approx([0.75, 0.5, 0.75], abs=1e-6)


def test_direction_cosines_and_gm_loss_hand_case():
    cos = direction_cosines([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])],
                            [torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, -1.0]])])
    assert cos.tolist() == pytest.approx([1 / math.sqrt(2), -1.0], abs=1e-6)
    # coeff [0.5, -1], cos [0.5, 1]: (0.5 + 1 - (0.25 - 1)) / 2 = 1.125
    assert gm_loss(torch.tensor([0.5, -1.0]), torch.tensor([0.5, 1.0])).item() == pytest.approx(1.125)
    with pytest.raises(ValueError, match="cannot compare"):
        direction_cosines([torch.zeros(2, 3)], [torch.zeros(2, 2)])


def test_options_validate_and_presets():
    from mmbalance.config import resolve_config
    from mmbalance.errors import ConfigError
    for bad in ("rho=-1", "lamda=-0.1", "aux_lr=0", "clip=-1", "aux_weight_decay=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            resolve_config("synthetic", "cggm", None, [f"method.{bad}"])
    o = resolve_config("synthetic", "cggm").method_options
    assert (o.rho, o.lamda, o.aux_lr, o.aux_weight_decay, o.clip, o.guard) == (1.3, 0.05, 5e-4, 3e-3, 0.8, True)
    from mmbalance.methods.cggm import CGGM_PRESETS
    assert CGGM_PRESETS["mosi"]["method"]["lamda"] == 0.2


# ------------------------------------------------------------------------------------ wiring
def _trainer(overrides=(), mods=2, out=None):
    cfg = tiny_config("cggm", ["train.epochs=2"] + list(overrides))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(num_modalities=mods, n=32))


def _step(tr, batch):
    tr.model.train()
    return tr.method.training_step(tr.model, batch, tr.ctx)


def _grads(model, loss, names):
    params = dict(model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)))


def test_first_step_scales_each_encoder_by_rho_times_its_coefficient():
    """Plain SGD, no clipping. acc_prev = 0, so d = acc of each auxiliary classifier on this batch
    (before its step) and coeff_m = (sum acc - acc_m) / sum acc; encoder m moves by
    -lr * rho * coeff_m * grad CE, the fusion by -lr * grad CE."""
    tr = _trainer(PLAIN + ["method.clip=0", "method.rho=1.7"])
    model = tr.model
    batch = batch_of(tr.bundle, n=16)
    ref = copy.deepcopy(model)
    out = ref(batch.inputs)
    names = [n for n, _ in ref.named_parameters() if not n.startswith("extras.")]
    g = _grads(ref, F.cross_entropy(out.logits, batch.labels), names)
    acc = {m: float((ref.extras["cggm"][m](out.features[m].detach()).argmax(1) == batch.labels).float().mean())
           for m in ("m1", "m2")}
    aux_loss = sum(F.cross_entropy(ref.extras["cggm"][m](out.features[m].detach()), batch.labels).item()
                   for m in ("m1", "m2"))  # L_aux = sum (not mean) over modalities
    total = acc["m1"] + acc["m2"]
    assert total > 0
    coeff = {"m1": acc["m2"] / total, "m2": acc["m1"] / total}  # (sum - own) / sum for M = 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = _step(tr, batch)
    lr = tr.cfg.optim.lr
    for n, p in model.named_parameters():
        if n.startswith("extras."):
            continue
        k = 1.7 * coeff[n.split(".")[1]] if n.startswith("encoders.") else 1.0
        assert torch.allclose(p, before[n] - lr * k * g[n], atol=1e-6), n
    assert res.logs["coeff_m1"] == pytest.approx(coeff["m1"], abs=1e-6)
    assert res.logs["aux_accuracy_m2"] == pytest.approx(acc["m2"], abs=1e-6)
    assert float(res.logs["loss_aux"]) == pytest.approx(aux_loss, abs=1e-6)
    assert "loss_gm" not in res.logs or res.logs["loss_gm"] == 0.0


def test_second_step_coefficients_use_the_previous_steps_accuracies_per_modality():
    """Step 2: d_m = acc_m(step 2) - acc_m(step 1) (acc_prev carried over), coeff_m = (sum d - d_m) /
    sum d for M = 2 = d_other / sum d, clipped to [0, 2]; encoder m's step is lr * rho * coeff_m *
    grad CE. The accuracies differ between modalities here (seed 0), so a swap of the modalities'
    coefficients or a stale acc_prev (0) fails."""
    tr = _trainer(PLAIN + ["method.clip=0", "method.lamda=0", "method.rho=1.3"])
    model, method = tr.model, tr.method
    b1, b2 = batch_of(tr.bundle, n=16), batch_of(tr.bundle, "val", n=16)

    def aux_acc(batch):
        with torch.no_grad():
            out = model(batch.inputs)
            return {m: float((method._aux[m](out.features[m]).argmax(1) == batch.labels).double().mean())
                    for m in ("m1", "m2")}

    model.train()
    acc1 = aux_acc(b1)
    _step(tr, b1)
    acc2 = aux_acc(b2)
    d = {m: acc2[m] - acc1[m] for m in acc1}
    total = d["m1"] + d["m2"]
    assert abs(total) > 1e-3
    want = {"m1": min(max(d["m2"] / total, 0.0), 2.0), "m2": min(max(d["m1"] / total, 0.0), 2.0)}
    assert want["m1"] != pytest.approx(want["m2"], abs=0.05)  # the modalities are told apart
    ref = copy.deepcopy(model)
    names = [n for n, _ in ref.named_parameters() if n.startswith("encoders.")]
    g = _grads(ref, F.cross_entropy(ref(b2.inputs).logits, b2.labels), names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = _step(tr, b2)
    assert float(res.logs["coeff_m1"]) == pytest.approx(want["m1"], abs=1e-6)
    assert float(res.logs["coeff_m2"]) == pytest.approx(want["m2"], abs=1e-6)
    params = dict(model.named_parameters())
    for n in names:
        k = 1.3 * want[n.split(".")[1]]
        assert torch.allclose(params[n], before[n] - tr.cfg.optim.lr * k * g[n], atol=1e-6), n


def test_second_step_adds_lambda_gm_at_the_previous_weights():
    """Step 2's loss = CE + lambda * l_gm(step 1), with the cosine of step 1's weights; its
    gradient reaches the fusion weights (evaluated at step 1's weights), not the auxiliaries."""
    tr = _trainer(PLAIN + ["method.clip=0", "method.lamda=0.5", "method.rho=1.0"])
    model, method = tr.model, tr.method
    b1, b2 = batch_of(tr.bundle, n=16), batch_of(tr.bundle, "val", n=16)
    aux1 = {m: method._aux[m].out.weight.detach().clone() for m in ("m1", "m2")}
    w1 = model.fusion.fc.weight.detach().clone()  # concat: blocks [:, :8] and [:, 8:]
    r1 = _step(tr, b1)
    coeff = torch.tensor([r1.logs["coeff_m1"], r1.logs["coeff_m2"]])
    # l_gm by hand from step 1's weights (before either optimiser stepped)
    W = w1.clone().requires_grad_(True)
    cos = torch.stack([F.cosine_similarity(aux1["m1"].reshape(-1), W[:, :8].reshape(-1), dim=0),
                       F.cosine_similarity(aux1["m2"].reshape(-1), W[:, 8:].reshape(-1), dim=0)])
    assert [r1.logs["cos_m1"], r1.logs["cos_m2"]] == pytest.approx(cos.tolist(), abs=1e-6)
    gm = (coeff.abs().sum() - (coeff * cos).sum()) / 2
    (g_gm,) = torch.autograd.grad(gm, [W])
    ref = copy.deepcopy(model)
    out = ref(b2.inputs)
    ce = F.cross_entropy(out.logits, b2.labels)
    (g_ce,) = torch.autograd.grad(ce, [ref.fusion.fc.weight])
    before = model.fusion.fc.weight.detach().clone()
    r2 = _step(tr, b2)
    assert r2.logs["loss_gm"] == pytest.approx(gm.item(), abs=1e-6)
    assert r2.loss.item() == pytest.approx(ce.item() + 0.5 * gm.item(), abs=1e-6)
    lr = tr.cfg.optim.lr
    assert torch.allclose(model.fusion.fc.weight, before - lr * (g_ce + 0.5 * g_gm), atol=1e-6)


def test_auxiliaries_have_their_own_adamw_and_the_main_optimiser_skips_them():
    tr = _trainer()
    aux_ids = {id(p) for p in tr.model.extras["cggm"].parameters()}
    main_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not aux_ids & main_ids
    opt = tr.method.optimizers()["aux"]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[0]["weight_decay"] == 3e-3
    before = [p.detach().clone() for p in tr.model.extras["cggm"].parameters()]
    _step(tr, batch_of(tr.bundle, n=16))
    assert all(not torch.equal(a, p) for a, p in zip(before, tr.model.extras["cggm"].parameters()))
    assert len(opt.state) == len(before)


def test_method_clips_the_model_gradients_only():
    tr = _trainer(PLAIN + ["method.clip=0.001", "method.lamda=0"])
    model = tr.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("extras.")}
    _step(tr, batch_of(tr.bundle, n=16))
    lr = tr.cfg.optim.lr
    step = torch.cat([(before[n] - p.detach()).reshape(-1) for n, p in model.named_parameters() if n in before])
    assert float(step.norm() / lr) == pytest.approx(0.001, rel=1e-3)
    assert tr.method.grad_clip_owner == "method"
    with pytest.raises(MethodSetupError, match="train.grad_clip"):
        _trainer(["train.grad_clip=1.0"])


def test_fusions_without_per_modality_weights_are_refused():
    with pytest.raises(MethodSetupError, match="concat, sum or late"):
        _trainer(["model.fusion=film"])
    tr = _trainer(["model.fusion=sum"])
    assert torch.isfinite(_step(tr, batch_of(tr.bundle, n=16)).loss)


def test_flat_accuracy_change_leaves_gradients_at_rho():
    """When the auxiliary accuracies do not change (same batch, acc_prev = acc), every coefficient
    is 1 (guard): the encoder step is rho times the plain one."""
    tr = _trainer(PLAIN + ["method.clip=0", "method.lamda=0", "method.rho=0.5"])
    model, method = tr.model, tr.method
    batch = batch_of(tr.bundle, n=16)
    out = model(batch.inputs)
    method.acc_prev = torch.tensor([float((method._aux[m](out.features[m].detach()).argmax(1) == batch.labels)
                                          .double().mean()) for m in ("m1", "m2")], dtype=torch.float64)
    ref = copy.deepcopy(model)
    names = [n for n, _ in ref.named_parameters() if n.startswith("encoders.")]
    g = _grads(ref, F.cross_entropy(ref(batch.inputs).logits, batch.labels), names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = _step(tr, batch)
    assert res.logs["coeff_m1"] == res.logs["coeff_m2"] == 1.0
    for n in names:
        assert torch.allclose(dict(model.named_parameters())[n], before[n] - tr.cfg.optim.lr * 0.5 * g[n], atol=1e-6)


# ------------------------------------------------------------------------------------ harness
def test_state_round_trip_reproduces_next_step():
    # after 2 steps: acc_prev, l_gm's weights and the auxiliary AdamW state all matter (seed 1: the
    # auxiliary accuracies differ between modalities, so acc_prev changes step 3's coefficients)
    state_round_trip_reproduces_next_step("cggm", bundle=tiny_bundle(2, seed=1), steps=2)


def test_three_modalities():
    tr = _trainer(mods=3)
    res = _step(tr, batch_of(tr.bundle, n=16))
    assert {f"coeff_m{i}" for i in (1, 2, 3)} <= set(res.logs)
    assert sum(res.logs[f"coeff_m{i}"] for i in (1, 2, 3)) == pytest.approx(2.0, abs=1e-6) or \
        any(res.logs[f"coeff_m{i}"] in (0.0, 2.0) for i in (1, 2, 3))  # sum M - 1 unless clipped
    assert 0.0 <= tr.fit()["test"]["accuracy"] <= 1.0


def test_noop_configuration_is_joint():
    assert_same_step("cggm", ["method.modulate=false", "method.clip=0"])


def test_cli_end_to_end(tmp_path):
    from mmbalance.cli import main
    assert main(["train", "--dataset", "synthetic", "--method", "cggm", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


def test_resume_is_exact(tmp_path):
    resume_is_exact("cggm", ["data.n_train=96", "data.n_val=32", "data.n_test=32", "model.feature_dim=8"],
                    total_epochs=3, stop_after=1, tmp_path=tmp_path)

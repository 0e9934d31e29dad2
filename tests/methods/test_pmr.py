"""PMR (Fan et al., CVPR 2023): prototype logits, prototypes, coefficients, loss wiring, training."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import (
    assert_same_step,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.functional.common import class_prototypes
from mmbalance.functional.pmr import (
    entropy,
    momentum_prototypes,
    prototype_logits,
    ratios,
    weak_coefficients,
)
from mmbalance.methods import TrainContext, build_method
from mmbalance.methods.pmr import PMROptions
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.training.trainer import Trainer


# ------------------------------------------------------------------------------- pure math
def test_prototype_logits_hand_case():
    # spec §4.2: z_a = [[0,0],[2,0]], c_a = [[0,0],[2,0]] -> s_a = [[0,-2],[-2,0]]
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1])
    s = prototype_logits(z, c)
    assert torch.allclose(s, torch.tensor([[0.0, -2.0], [-2.0, 0.0]]), atol=1e-5)
    p = s.softmax(1).gather(1, y.view(-1, 1)).squeeze(1)
    assert torch.allclose(p, torch.tensor([0.880797, 0.880797]), atol=1e-5)
    assert float(p.sum()) == pytest.approx(1.761594, abs=1e-5)
    assert float(F.cross_entropy(s, y)) == pytest.approx(0.126928, abs=1e-5)
    # not squared: distance 3-4-5
    assert float(prototype_logits(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2))) == pytest.approx(-5.0, abs=1e-6)
    # finite gradient at z == c (eps inside the root)
    zz = torch.zeros(1, 2, requires_grad=True)
    prototype_logits(zz, torch.zeros(1, 2)).sum().backward()
    assert torch.isfinite(zz.grad).all()
    # the prototypes are constants
    cc = torch.ones(2, 2, requires_grad=True)
    assert not prototype_logits(torch.zeros(1, 2), cc).requires_grad


def test_class_prototypes_and_momentum_hand_case():
    protos, counts = class_prototypes(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
    assert torch.equal(protos, torch.tensor([[2.0], [5.0]]))
    mixed = momentum_prototypes(protos, torch.tensor([[0.0], [1.0]]), 0.5, counts)
    assert torch.equal(mixed, torch.tensor([[1.0], [3.0]]))
    assert torch.equal(momentum_prototypes(protos, None, 0.5), protos)
    # an unseen class keeps its previous prototype (the code would give NaN)
    protos3, counts3 = class_prototypes(torch.tensor([[1.0], [3.0]]), torch.tensor([0, 0]), 2)
    kept = momentum_prototypes(protos3, torch.tensor([[0.0], [7.0]]), 0.0, counts3)
    assert torch.equal(kept, torch.tensor([[2.0], [7.0]]))


def test_ratios_and_coefficients_hand_case():
    rho = ratios(torch.tensor([1.761594, 1.0]))
    assert torch.allclose(rho, torch.tensor([1.761594, 1 / 1.761594], dtype=torch.float64), atol=1e-6)
    assert weak_coefficients(rho, 2.0).tolist() == [0.0, 2.0]  # only the weaker modality
    assert weak_coefficients(ratios(torch.tensor([1.0, 3.0])), 2.0).tolist() == [2.0, 0.0]
    assert weak_coefficients(ratios(torch.tensor([2.0, 2.0])), 2.0).tolist() == [0.0, 0.0]
    # ratio rule: alpha * (1/rho_weak - 1) clipped to [0, alpha]: scores 1, 1.5 -> rho_a = 2/3 -> 0.5 * alpha
    r = weak_coefficients(ratios(torch.tensor([1.0, 1.5])), 2.0, "ratio")
    assert r.tolist() == pytest.approx([1.0, 0.0])
    assert weak_coefficients(ratios(torch.tensor([1.0, 5.0])), 2.0, "ratio").tolist() == pytest.approx([2.0, 0.0])
    # M = 3: rho_m = score_m / mean of the others: [1, 2, 3] -> [0.4, 1, 2]
    assert ratios(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([0.4, 1.0, 2.0])
    assert weak_coefficients(ratios(torch.tensor([1.0, 2.0, 3.0])), 1.0).tolist() == [1.0, 0.0, 0.0]


def test_entropy_hand_case():
    assert float(entropy(torch.zeros(2, 4))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([[100.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_options_validate():
    assert PMROptions().validate() == []
    assert PMROptions().momentum == 0.0 and PMROptions().alpha == 1.0
    assert any("alpha" in e for e in PMROptions(alpha=-1).validate())
    assert any("coef" in e for e in PMROptions(coef="x").validate())
    assert any("end_epoch" in e for e in PMROptions(start_epoch=5, end_epoch=2).validate())
    assert any("per_weight" in e for e in PMROptions(per_weight=-0.1).validate())


# ------------------------------------------------------------------------------ loss wiring
def _hand_model():
    """Identity linear encoders (2 -> 2) and a concat head; features = inputs."""
    encs = {}
    for m in ("a", "v"):
        lin = nn.Linear(2, 2)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        encs[m] = lin
    torch.manual_seed(0)
    return MultimodalModel.from_encoders(encs, 2, "concat", dims={"a": 2, "v": 2})


def _hand_case(swap: bool, alpha: float = 1.5, epoch: int = 0, **opts):
    """spec §4.2: modality 'strong' has z = [[0,0],[2,0]] on its prototypes (score 1.761594);
    the other is equidistant from its two prototypes (softmax 0.5 each, score 1.0, CE ln 2)."""
    strong, weak = ("v", "a") if swap else ("a", "v")
    model = _hand_model()
    method = build_method("pmr", PMROptions(alpha=alpha, **opts), ["a", "v"], 2)
    method.prototypes = {strong: torch.tensor([[0.0, 0.0], [2.0, 0.0]]), weak: torch.tensor([[0.0, 1.0], [2.0, 1.0]])}
    inputs = {strong: torch.tensor([[0.0, 0.0], [2.0, 0.0]]), weak: torch.tensor([[1.0, 0.0], [1.0, 5.0]])}
    y = torch.tensor([0, 1])
    ctx = TrainContext(model=model)
    ctx.epoch = epoch

    class B:
        pass
    batch = B()
    batch.inputs, batch.labels = inputs, y
    res = method.compute_loss(model, batch, ctx)
    model.zero_grad()
    res.loss.backward()
    grads = {m: model.encoders[m].weight.grad.clone() for m in ("a", "v")}
    # reference: the fused cross-entropy alone
    model.zero_grad()
    ce = F.cross_entropy(model(inputs).logits, y)
    ce.backward()
    ref = {m: model.encoders[m].weight.grad.clone() for m in ("a", "v")}
    return res, float(ce.detach()), grads, ref, strong, weak


@pytest.mark.parametrize("swap", [False, True])
def test_loss_hand_case_only_the_weaker_modality_gets_the_prototype_ce(swap):
    res, ce, grads, ref, strong, weak = _hand_case(swap, alpha=1.5)
    assert float(res.loss.detach()) == pytest.approx(ce + 1.5 * math.log(2), abs=1e-5)
    assert float(res.logs[f"coeff_{strong}"]) == 0.0 and float(res.logs[f"coeff_{weak}"]) == 1.5
    assert float(res.logs[f"ratio_{strong}"]) == pytest.approx(1.761594, abs=1e-5)
    assert float(res.logs[f"ratio_{weak}"]) == pytest.approx(1 / 1.761594, abs=1e-5)
    assert float(res.logs[f"loss_proto_{strong}"]) == pytest.approx(0.126928, abs=1e-5)
    # the strong encoder's gradient is that of CE_fused alone; the weak one's is not
    assert torch.allclose(grads[strong], ref[strong], atol=1e-7)
    assert not torch.allclose(grads[weak], ref[weak], atol=1e-4)


def test_outside_the_window_the_loss_is_the_fused_ce():
    res, ce, grads, ref, _strong, weak = _hand_case(False, alpha=1.5, epoch=3, start_epoch=0, end_epoch=2)
    assert float(res.loss.detach()) == pytest.approx(ce, abs=1e-6)
    assert float(res.logs[f"coeff_{weak}"]) == 0.0
    for m in ("a", "v"):
        assert torch.allclose(grads[m], ref[m], atol=1e-7)
    # window bounds are inclusive
    res2, ce2, *_ = _hand_case(False, alpha=1.5, epoch=2, start_epoch=0, end_epoch=2)
    assert float(res2.loss.detach()) == pytest.approx(ce2 + 1.5 * math.log(2), abs=1e-5)


def test_ratio_coefficient_and_per_term():
    # ratio rule: alpha * (1 / rho_weak - 1) = 1.5 * 0.761594 = 1.142391 on the weak modality
    res, ce, *_ = _hand_case(False, alpha=1.5, coef="ratio")
    assert float(res.logs["coeff_v"]) == pytest.approx(1.142391, abs=1e-5)
    assert float(res.logs["coeff_a"]) == 0.0
    assert float(res.loss.detach()) == pytest.approx(ce + 1.142391 * math.log(2), abs=1e-5)
    # PER: minus per_weight * entropy of the strong modality's prototype softmax (early epochs only)
    h_strong = -(0.880797 * math.log(0.880797) + 0.119203 * math.log(0.119203))
    res, ce, *_ = _hand_case(False, alpha=1.5, per_weight=0.3, per_epochs=1)
    assert float(res.loss.detach()) == pytest.approx(ce + 1.5 * math.log(2) - 0.3 * h_strong, abs=1e-5)
    res, ce, *_ = _hand_case(False, alpha=1.5, per_weight=0.3, per_epochs=1, epoch=1)
    assert float(res.loss.detach()) == pytest.approx(ce + 1.5 * math.log(2), abs=1e-5)


# ------------------------------------------------------------------------------- prototypes
def test_prototypes_from_the_first_tenth_of_train_and_momentum():
    bundle = tiny_bundle(2, n=48)
    tr = Trainer(tiny_config("pmr", ["train.epochs=1", "method.momentum=0.5"]), None, quiet=True, bundle=bundle)
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    method.on_epoch_start(model, ctx)
    assert model.training  # mode restored
    # expected: first ceil(0.1 * 48) = 5 rows of the train-eval pass, eval mode
    rows = list(ctx.train_eval_batches())
    model.eval()
    with torch.no_grad():
        xs = {m: torch.cat([b.inputs[m] for b in rows])[:5] for m in model.modalities}
        ys = torch.cat([b.labels for b in rows])[:5]
        z = model.encode(xs)
    model.train()
    first = {}
    for m in model.modalities:
        exp, _ = class_prototypes(z[m], ys, 3)
        assert torch.allclose(method.prototypes[m], exp, atol=1e-6)
        first[m] = exp
    # second epoch: momentum with the previous prototypes (weights changed in between)
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.1)
    method.on_epoch_start(model, ctx)
    model.eval()
    with torch.no_grad():
        z2 = model.encode(xs)
    model.train()
    for m in model.modalities:
        new, _ = class_prototypes(z2[m], ys, 3)
        assert torch.allclose(method.prototypes[m], 0.5 * new + 0.5 * first[m], atol=1e-6)


def test_compute_loss_needs_prototypes():
    tr = Trainer(tiny_config("pmr", ["train.epochs=1"]), None, quiet=True, bundle=tiny_bundle(2))
    from utils import batch_of
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        tr.method.compute_loss(tr.model, batch_of(tr.bundle), tr.ctx)


# ------------------------------------------------------------------------------ harness
def test_state_round_trip_reproduces_next_step():
    state_round_trip_reproduces_next_step("pmr", ["method.alpha=2.0", "method.momentum=0.2"])


def test_alpha_zero_is_joint():
    assert_same_step("pmr", ["method.alpha=0"], base="joint")


def test_active_pmr_differs_from_joint():
    with pytest.raises(AssertionError):
        assert_same_step("pmr", ["method.alpha=5.0"], base="joint")


def test_three_modalities_fit():
    tr = Trainer(tiny_config("pmr", ["train.epochs=1"]), None, quiet=True, bundle=tiny_bundle(3))
    res = tr.fit()
    assert res is not None
    assert set(tr.method.prototypes) == {"m1", "m2", "m3"}


def test_presets():
    from mmbalance.config import resolve_config
    assert resolve_config("cremad", "pmr").method_options.alpha == 2.0
    ave = resolve_config("ave", "pmr").method_options
    assert ave.alpha == 2.0 and ave.end_epoch == 70


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "pmr", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

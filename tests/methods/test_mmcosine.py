"""MMCosine (Xu et al., ICASSP 2023): the cosine head, its evaluation head, training."""
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
from mmbalance.errors import MethodSetupError
from mmbalance.functional.mmcosine import cosine_logits
from mmbalance.methods.mmcosine import CosineFusion, MMCosineOptions
from mmbalance.training.trainer import Trainer


def _hand_head():
    # spec §4.15: W_a rows [1,0], [0,2]; W_v rows [0,1], [1,1]
    head = CosineFusion({"a": 2, "v": 2}, 2, scale=10.0)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 1.0]]))
    return head


def test_cosine_logits_hand_case():
    la = cosine_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 10.0)
    assert torch.allclose(la, torch.tensor([[6.0, 8.0]]), atol=1e-5)
    lv = cosine_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]), 10.0)
    assert torch.allclose(lv, torch.tensor([[0.0, 7.071068]]), atol=1e-5)


def test_fusion_hand_case_and_modality_terms():
    head = _hand_head()
    feats = {"a": torch.tensor([[3.0, 4.0]]), "v": torch.tensor([[1.0, 0.0]])}
    assert torch.allclose(head(feats), torch.tensor([[6.0, 15.071068]]), atol=1e-5)
    per = head.modality_logits(feats)
    assert torch.allclose(per["a"], torch.tensor([[6.0, 8.0]]), atol=1e-5)
    assert torch.allclose(per["v"], torch.tensor([[0.0, 7.071068]]), atol=1e-5)
    # zeroing a modality leaves exactly the other's term (zero_out accuracies = cosine per modality)
    assert torch.allclose(head({"a": feats["a"], "v": torch.zeros(1, 2)}), per["a"], atol=1e-6)
    assert torch.allclose(head({"a": torch.zeros(1, 2), "v": feats["v"]}), per["v"], atol=1e-6)
    # the code's evaluation output: plain cat(z) @ W^T = [3 + 0, 8 + 1] = [3, 9]
    assert torch.allclose(head.linear_logits(feats), torch.tensor([[3.0, 9.0]]), atol=1e-6)


def test_scale_invariance_and_scaling():
    head = _hand_head()
    feats = {"a": torch.tensor([[3.0, 4.0], [-1.0, 2.0]]), "v": torch.tensor([[1.0, 0.0], [0.5, 0.5]])}
    base = head(feats)
    with torch.no_grad():
        head.fc.weight.mul_(7.5)
    scaled = {"a": feats["a"] * 0.3, "v": feats["v"] * 11.0}
    assert torch.allclose(head(scaled), base, atol=1e-5)
    # s multiplies the logits; every per-modality logit is bounded by s
    head2 = _hand_head()
    head2.scale = 15.0
    assert torch.allclose(head2(feats), base * 1.5, atol=1e-5)
    assert all(float(v.detach().abs().max()) <= 15.0 + 1e-5 for v in head2.modality_logits(feats).values())


def test_options_validate():
    assert MMCosineOptions().validate() == []
    assert MMCosineOptions().scaling == 10.0 and MMCosineOptions().eval_head == "cosine"
    assert any("scaling" in e for e in MMCosineOptions(scaling=0).validate())
    assert any("scaling" in e for e in MMCosineOptions(scaling=-1).validate())
    assert any("eval_head" in e for e in MMCosineOptions(eval_head="x").validate())
    assert any("head" in e for e in MMCosineOptions(head="x").validate())


def _trainer(overrides=(), mods=2):
    return Trainer(tiny_config("mmcosine", ["train.epochs=1"] + list(overrides)), None, quiet=True,
                   bundle=tiny_bundle(mods))


def test_trainer_installs_the_cosine_head_and_trains_on_it():
    tr = _trainer(["method.scaling=12"])
    model = tr.model
    assert isinstance(model.fusion, CosineFusion) and model.fusion.scale == 12.0
    assert model.fusion.fc.bias is None
    batch = batch_of(tr.bundle)
    model.train()
    res = tr.method.compute_loss(model, batch, tr.ctx)
    feats = model.encode(batch.inputs)
    w = model.fusion.weight_blocks()
    manual = sum(12.0 * F.normalize(feats[m], dim=1) @ F.normalize(w[m], dim=1).t() for m in model.modalities)
    assert torch.allclose(res.output.logits, manual, atol=1e-5)
    assert float(res.loss.detach()) == pytest.approx(float(F.cross_entropy(manual, batch.labels).detach()), abs=1e-5)


def test_eval_head_cosine_is_default_and_linear_is_the_code_reading():
    tr = _trainer()
    model = tr.model
    model.eval()
    batch = batch_of(tr.bundle)
    with torch.no_grad():
        out = tr.method.predict(model, batch)
        feats = model.encode(batch.inputs)
        assert torch.allclose(out.logits, model.fusion(feats), atol=1e-6)
        tr2 = _trainer(["method.eval_head=linear"])
        tr2.model.load_state_dict(model.state_dict())
        tr2.model.eval()
        lin = tr2.method.predict(tr2.model, batch)
        cat = torch.cat([feats[m] for m in model.modalities], 1)
        assert torch.allclose(lin.logits, cat @ model.fusion.fc.weight.t(), atol=1e-5)
        assert not torch.allclose(lin.logits, out.logits, atol=1e-3)


def test_film_and_gated_are_refused():
    for fusion in ("film", "gated"):
        with pytest.raises(MethodSetupError, match="not implemented"):
            _trainer([f"model.fusion={fusion}"])
    assert isinstance(_trainer(["model.fusion=sum"]).model.fusion, CosineFusion)


def test_state_round_trip_reproduces_next_step():
    state_round_trip_reproduces_next_step("mmcosine", ["method.scaling=10"])


def test_head_fusion_is_joint():
    assert_same_step("mmcosine", ["method.head=fusion"], base="joint")


def test_cosine_head_differs_from_joint():
    a = _trainer().model
    b = Trainer(tiny_config("joint", ["train.epochs=1"]), None, quiet=True, bundle=tiny_bundle(2)).model
    assert not isinstance(b.fusion, CosineFusion) and isinstance(a.fusion, CosineFusion)


def test_three_modalities_fit():
    tr = _trainer(mods=3)
    assert tr.fit() is not None
    assert len(tr.model.fusion.weight_blocks()) == 3
    res = tr.method.compute_loss(tr.model, batch_of(tr.bundle), tr.ctx)
    assert math.isfinite(float(res.loss.detach()))


def test_cli_end_to_end(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--method", "mmcosine", "--out", str(tmp_path), "--quiet",
                 "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0

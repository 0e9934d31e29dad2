"""UMT / UME (Du et al., ICML 2023): distillation and ensemble math, frozen eval-mode teachers, the
in-run teacher stage, teachers loaded from earlier unimodal runs (and the errors when they do not
fit), state, M=3, no-op, CLI, exact resume."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from utils import (
    assert_same_step,
    resume_is_exact,
    state_round_trip_reproduces_next_step,
    tiny_bundle,
    tiny_config,
)

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError, MethodSetupError
from mmbalance.functional.umt import alone, distillation_loss, ensemble_log_probs
from mmbalance.methods.umt import parse_teachers
from mmbalance.training.checkpoint import load_checkpoint
from mmbalance.training.trainer import Trainer

SYN = ["data.n_train=120", "data.n_val=40", "data.n_test=40", "train.threads=1"]


def test_distillation_hand_case():
    # spec §4.11: student [[1, 2]], teacher [[0, 0]], lambda 10 -> 10 * mean([1, 4]) = 25
    s = {"a": torch.tensor([[1.0, 2.0]])}
    t = {"a": torch.tensor([[0.0, 0.0]])}
    assert float(distillation_loss(s, t, 10.0)) == pytest.approx(25.0)
    # summed over modalities: + 10 * mean([(3-1)^2]) = 40
    s["v"], t["v"] = torch.tensor([[3.0]]), torch.tensor([[1.0]])
    assert float(distillation_loss(s, t, 10.0)) == pytest.approx(65.0)
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    distillation_loss({"a": z}, {"a": torch.zeros(1, 2, requires_grad=True)}, 10.0).backward()
    assert z.grad.tolist() == [[10.0, 20.0]]  # d/dz 10 * (z1^2 + z2^2) / 2 = 10 z
    with pytest.raises(ValueError):
        distillation_loss({"a": torch.zeros(1, 3)}, {"a": torch.zeros(1, 2)}, 1.0)


def test_ensemble_average_and_alone_by_hand():
    # softmax([0, 0]) = (.5, .5), softmax([ln 3, 0]) = (.75, .25): mean (.625, .375)
    out = ensemble_log_probs({"a": torch.tensor([[0.0, 0.0]]), "v": torch.tensor([[math.log(3.0), 0.0]])})
    assert out.exp().tolist()[0] == pytest.approx([0.625, 0.375])
    f = alone(torch.ones(2, 3), "v", {"a": 4, "v": 3})
    assert f["a"].tolist() == [[0.0] * 4] * 2 and f["v"].tolist() == [[1.0] * 3] * 2


def test_parse_teachers():
    assert parse_teachers("a=runs/x, v=runs/y") == {"a": "runs/x", "v": "runs/y"}
    assert parse_teachers({"a": "p"}) == {"a": "p"}
    assert parse_teachers("") == {}
    for bad in ("a", "a=x,a=y", "=x", "a="):
        with pytest.raises(ValueError):
            parse_teachers(bad)


BN = {"m1": (1, 8, 8), "m2": (6,)}  # m1 gets the small CNN (BatchNorm)


def _trainer(method, overrides=(), bundle=None, out=None):
    bundle = bundle or tiny_bundle(shapes=BN)
    return Trainer(tiny_config(method, ["train.epochs=1"] + list(overrides)), out, quiet=True, bundle=bundle)


def test_in_run_teachers_train_then_stay_frozen_in_eval_mode():
    tr = _trainer("umt", ["method.teacher_epochs=2"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    teachers = model.extras["umt_teachers"]
    init = {k: v.clone() for k, v in teachers.state_dict().items()}
    student0 = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    assert torch.equal(init["m1.encoder.proj.weight"], student0["m1.proj.weight"])  # teachers start from the student's init
    assert not any(p.requires_grad for p in teachers.parameters())
    assert all(id(p) not in {id(q) for g in tr.optimizer.param_groups for q in g["params"]} for p in teachers.parameters())
    model.train()
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    assert method.ready
    trained = {k: v.clone() for k, v in teachers.state_dict().items()}
    assert not torch.equal(trained["m1.encoder.proj.weight"], init["m1.encoder.proj.weight"])
    assert not torch.equal(trained["m1.encoder.features.1.running_mean"], init["m1.encoder.features.1.running_mean"])
    logs = method.on_epoch_end(model, ctx)
    assert logs["teacher_samples"] == 2 * 2 * 48 and 0 <= logs["teacher_acc_m1"] <= 1
    # the student is not initialised from the teachers (DECISION)
    assert all(torch.equal(v, student0[k]) for k, v in model.encoders.state_dict().items())
    model.train()
    assert not teachers["m1"].training and not teachers["m1"].encoder.features[1].training
    batch = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    res = method.training_step(model, batch, ctx)
    # teachers unchanged by a student step, BatchNorm buffers included (eval mode)
    for k, v in teachers.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # the loss by hand: CE(fused) + 10 * sum_m mean((z_m - t_m)^2), with the student's pre-step features
    assert float(res.logs["loss_distill"]) > 0
    assert float(res.loss.detach()) == pytest.approx(float(res.logs["loss_ce"] + res.logs["loss_distill"]), rel=1e-6)


def test_loss_by_hand():
    tr = _trainer("umt", ["method.teacher_epochs=1", "method.weight=3"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    ctx.epoch = 0
    method.on_epoch_start(model, ctx)
    model.train()
    batch = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    torch.manual_seed(0)
    res = method.compute_loss(model, batch, ctx)
    with torch.no_grad():
        teachers = model.extras["umt_teachers"]
        t = {m: teachers[m].encoder.eval()(batch.inputs[m]) for m in ("m1", "m2")}
        z = res.output.features
        expect = F.cross_entropy(res.output.logits, batch.labels) + 3 * sum(((z[m] - t[m]) ** 2).mean() for m in t)
    assert float(res.loss.detach()) == pytest.approx(float(expect), rel=1e-6)


def test_init_from_teacher_copies_the_teacher_encoders():
    tr = _trainer("umt", ["method.teacher_epochs=1", "method.init_from_teacher=true"])
    tr.ctx.epoch = 0
    tr.method.on_epoch_start(tr.model, tr.ctx)
    t = tr.model.extras["umt_teachers"]
    for m in ("m1", "m2"):
        for k, v in tr.model.encoders[m].state_dict().items():
            assert torch.equal(v, t[m].encoder.state_dict()[k])


def test_weight_zero_is_joint_and_needs_no_teachers():
    assert_same_step("umt", ["method.weight=0"], base="joint")
    tr = _trainer("umt", ["method.weight=0"])
    assert not hasattr(tr.model, "extras") or "umt_teachers" not in tr.model.extras
    with pytest.raises(AssertionError):  # with distillation the step differs
        assert_same_step("umt", ["method.teacher_epochs=1"], base="joint")


def test_state_round_trip():
    state_round_trip_reproduces_next_step("umt", ["method.teacher_epochs=1"])
    state_round_trip_reproduces_next_step("ume")


def test_ume_members_are_independent_unimodal_models():
    tr = _trainer("ume", bundle=tiny_bundle(2))
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.train()
    batch = next(iter(tr._batches(tr.bundle.train, range(16), 16)))
    res = method.compute_loss(model, batch, ctx)
    cls = model.extras["ume_classifiers"]
    with torch.no_grad():
        z = model.encode(batch.inputs)
        l1 = cls["m1"]({"m1": z["m1"], "m2": torch.zeros_like(z["m2"])})
        l2 = cls["m2"]({"m1": torch.zeros_like(z["m1"]), "m2": z["m2"]})
        expect = F.cross_entropy(l1, batch.labels) + F.cross_entropy(l2, batch.labels)
        avg = ((l1.softmax(1) + l2.softmax(1)) / 2).log()
    assert float(res.loss.detach()) == pytest.approx(float(expect), rel=1e-6)
    assert torch.allclose(res.output.logits, avg, atol=1e-6)
    # encoder m1's gradient comes from member m1 alone
    model.zero_grad(set_to_none=True)
    res.loss.backward()
    g_all = [p.grad.clone() for p in model.encoders["m1"].parameters()]
    model.zero_grad(set_to_none=True)
    z1 = model.encoders["m1"](batch.inputs["m1"])
    F.cross_entropy(cls["m1"]({"m1": z1, "m2": torch.zeros(16, model.feature_dims["m2"])}), batch.labels).backward()
    for g, p in zip(g_all, model.encoders["m1"].parameters()):
        assert torch.allclose(g, p.grad, atol=1e-7)
    assert all(id(p) not in {id(q) for g in tr.optimizer.param_groups for q in g["params"]}
               for p in model.fusion.parameters())  # the unused fusion is not optimised
    pred = method.predict(model, batch)
    assert set(method.zero_out_logits(model, pred)) == {"m1", "m2"}


# ------------------------------------------------------------------------- teachers from earlier runs
def _unimodal_run(out: Path, modality: str, extra=()):
    assert main(["train", "--dataset", "synthetic", "--method", "unimodal", "--out", str(out), "--quiet", "epochs=1",
                 f"method.modality={modality}", "model.feature_dim=8", "model.hidden_dim=16"] + SYN + list(extra)) == 0
    return load_checkpoint(out / "checkpoints" / "best.pt")["model"]


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    states = {m: _unimodal_run(root / f"uni_{m}", m) for m in ("x1", "x2")}
    return root, states


def test_umt_with_teachers_from_unimodal_runs(teacher_runs, tmp_path):
    root, states = teacher_runs
    over = ["model.feature_dim=8", "model.hidden_dim=16", "epochs=2",
            f"method.teachers=x1={root / 'uni_x1'},x2={root / 'uni_x2'}"]
    assert main(["train", "--dataset", "synthetic", "--method", "umt", "--out", str(tmp_path / "umt"), "--quiet"]
                + SYN + over) == 0
    ck = load_checkpoint(tmp_path / "umt" / "checkpoints" / "last.pt")
    for m in ("x1", "x2"):
        for k, v in states[m].items():
            if k.startswith(f"encoders.{m}."):
                assert torch.equal(ck["model"][f"extras.umt_teachers.{m}.encoder." + k[len(f"encoders.{m}."):]], v), k
    rows = [json.loads(l) for l in (tmp_path / "umt" / "metrics.jsonl").read_text().splitlines()]
    assert "teacher_samples" not in rows[0] and rows[0]["loss_distill"] > 0  # no in-run stage
    # one teacher loaded, the other trained in the run
    tr = Trainer(tiny_config("umt", SYN + ["method.teacher_epochs=1", f"method.teachers=x2={root / 'uni_x2'}"]),
                 None, quiet=True)
    tr.ctx.epoch = 0
    tr.method.on_epoch_start(tr.model, tr.ctx)
    t = tr.model.extras["umt_teachers"]
    assert torch.equal(t["x2"].encoder.state_dict()["net.0.weight"], states["x2"]["encoders.x2.net.0.weight"])
    assert not torch.equal(t["x1"].encoder.state_dict()["net.0.weight"], states["x1"]["encoders.x1.net.0.weight"])
    assert tr.method.on_epoch_end(tr.model, tr.ctx)["teacher_samples"] == 120


def test_ume_loaded_members_predict_as_the_ensemble_and_do_not_train(teacher_runs, tmp_path):
    root, states = teacher_runs
    cfg = tiny_config("ume", SYN + [f"method.teachers=x1={root / 'uni_x1'},x2={root / 'uni_x2'}"])
    tr = Trainer(cfg, tmp_path, quiet=True)
    res = tr.fit()
    for m in ("x1", "x2"):
        for k, v in tr.model.encoders[m].state_dict().items():
            assert torch.equal(v, states[m][f"encoders.{m}.{k}"])
        for k, v in tr.model.extras["ume_classifiers"][m].state_dict().items():
            assert torch.equal(v, states[m][f"fusion.{k}"])
    # test accuracy of each member alone = its unimodal run's test accuracy
    for m in ("x1", "x2"):
        uni = json.loads((root / f"uni_{m}" / "result.json").read_text())
        assert res["test"]["modalities"][m]["zero_out_accuracy"] == uni["test"]["accuracy"]


def test_teacher_errors_name_the_folder(teacher_runs, tmp_path):
    root, _ = teacher_runs

    def start(method, teachers, extra=(), bundle=None):
        tr = Trainer(tiny_config(method, SYN + [f"method.teachers={teachers}"] + list(extra)), None, quiet=True,
                     bundle=bundle)
        tr.ctx.epoch = 0
        tr.method.on_epoch_start(tr.model, tr.ctx)

    with pytest.raises(MethodSetupError, match="nowhere.*does not exist"):
        start("umt", f"x1={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MethodSetupError, match="has no checkpoint"):
        start("umt", f"x1={tmp_path / 'empty'}")
    with pytest.raises(MethodSetupError, match="trained modality 'x2', not 'x1'"):
        start("umt", f"x1={root / 'uni_x2'}")
    with pytest.raises(MethodSetupError, match="encoders.x1.net.0.weight' has shape"):
        start("umt", f"x1={root / 'uni_x1'}", ["model.hidden_dim=12"])
    with pytest.raises(MethodSetupError, match="fusion.fc.weight' has shape"):
        start("ume", f"x1={root / 'uni_x1'},x2={root / 'uni_x2'}", ["data.num_classes=3"])
    with pytest.raises(MethodSetupError, match="trained on dataset 'synthetic', this run is on 'custom:tiny'"):
        start_custom(root)
    joint = tmp_path / "joint"
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(joint), "--quiet", "epochs=1",
                 "model.feature_dim=8", "model.hidden_dim=16"] + SYN) == 0
    with pytest.raises(MethodSetupError, match="trained with method 'joint'"):
        start("umt", f"x1={joint}")
    with pytest.raises(MethodSetupError, match="does not have"):
        Trainer(tiny_config("umt", SYN + [f"method.teachers=x3={joint}"]), None, quiet=True)
    with pytest.raises(MethodSetupError, match="every member or none"):
        Trainer(tiny_config("ume", SYN + [f"method.teachers=x1={joint}"]), None, quiet=True)


def start_custom(root):
    """A run on a Python-made bundle whose modalities are named like synthetic's: the teacher's dataset differs."""
    b = tiny_bundle(shapes={"x1": (32,), "x2": (32,)})
    tr = Trainer(tiny_config("umt", [f"method.teachers=x1={root / 'uni_x1'}"]), None, quiet=True, data=b)
    tr.ctx.epoch = 0
    tr.method.on_epoch_start(tr.model, tr.ctx)


def test_three_modalities_train(tmp_path):
    for method, extra in (("umt", ["method.teacher_epochs=1"]), ("ume", [])):
        res = _trainer(method, ["train.epochs=2"] + extra, bundle=tiny_bundle(3), out=tmp_path / method).fit()
        assert math.isfinite(res["test"]["loss"])


def test_resume_is_exact(tmp_path):
    resume_is_exact("umt", SYN + ["method.teacher_epochs=1"], total_epochs=3, stop_after=1, tmp_path=tmp_path / "umt")
    resume_is_exact("ume", SYN, total_epochs=3, stop_after=1, tmp_path=tmp_path / "ume")


def test_cli_end_to_end(tmp_path):
    for method in ("umt", "ume"):
        assert main(["train", "--dataset", "synthetic", "--method", method, "--out", str(tmp_path / method), "--quiet",
                     "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0


def test_options_validated():
    for method, bad in (("umt", "method.weight=-1"), ("umt", "method.teacher_epochs=-1"), ("umt", "method.teachers=x1"),
                        ("ume", "method.teachers=x1=a,x1=b")):
        with pytest.raises(ConfigError):
            resolve_config("synthetic", method, None, [bad])

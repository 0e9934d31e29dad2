"""MM and B-MM: the pure math on hand-computed tensors, and the methods through the trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError
from mmbalance.functional.mixup import (bmm_lambdas, discrepancy, mix_features, mixed_cross_entropy,
                                        mixed_targets, sample_lambda, score_sums)
from mmbalance.methods import mixup as mixup_mod
from mmbalance.methods.mixup import BMM, MM, bmm_rho_eval_pass
from mmbalance.training.trainer import Trainer
from utils import batch_of, tiny_bundle, tiny_config, two_steps


# ----------------------------------------------------------------------------- pure math
def test_sample_lambda_fixed_and_beta():
    assert sample_lambda("fixed", 0.3, 1.0) == 0.3
    torch.manual_seed(0)
    a = [sample_lambda("beta", 0.3, 0.4) for _ in range(50)]
    torch.manual_seed(0)
    b = [sample_lambda("beta", 0.3, 0.4) for _ in range(50)]
    assert a == b and all(0.0 <= v <= 1.0 for v in a) and len(set(a)) > 40
    with pytest.raises(ValueError):
        sample_lambda("uniform", 0.3, 1.0)


def test_mix_features_fixed_permutation_hand_computed():
    feats = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]),
             "b": torch.tensor([[1.0], [2.0], [3.0]])}
    perm = torch.tensor([2, 0, 1])
    out = mix_features(feats, perm, {"a": 0.3})
    expected_a = torch.tensor([[0.3 + 1.4, 1.4], [0.7, 0.3], [0.6, 0.6 + 0.7]])
    assert torch.allclose(out["a"], expected_a)
    assert out["b"] is feats["b"]  # not in lambdas: untouched
    both = mix_features(feats, perm, {"a": 0.3, "b": 0.3})
    assert torch.allclose(both["b"], torch.tensor([[0.3 + 2.1], [0.6 + 0.7], [0.9 + 1.4]]))


def test_mixed_labels_and_loss_hand_computed():
    labels = torch.tensor([0, 1, 2])
    perm = torch.tensor([2, 0, 1])
    t = mixed_targets(labels, perm, 0.3, 3)
    assert torch.allclose(t, torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.3, 0.0], [0.0, 0.7, 0.3]]))
    # logits = log-probabilities: CE of label k is -log p_k
    p = torch.tensor([[0.5, 0.25, 0.25]] * 3)
    logits = p.log()
    loss = mixed_cross_entropy(logits, labels, perm, 0.3)
    # rows: y=(0,1,2), y[perm]=(2,0,1)
    ce_y = (math.log(2) + math.log(4) + math.log(4)) / 3
    ce_p = (math.log(4) + math.log(2) + math.log(4)) / 3
    assert loss.item() == pytest.approx(0.3 * ce_y + 0.7 * ce_p, abs=1e-6)
    soft = -(t * F.log_softmax(logits, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(soft.item(), abs=1e-6)


def test_rho_from_hand_computed_score_table():
    labels = torch.tensor([0, 1, 0])
    # logits = log(probs): softmax gives back the probs; true-class probs chosen by hand
    pa = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])  # s^a = 0.9, 0.6, 0.3 -> 1.8
    pv = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])  # s^v = 0.2, 0.4, 0.3 -> 0.9
    sums = score_sums({"a": pa.log(), "v": pv.log()}, labels)
    assert torch.allclose(sums, torch.tensor([1.8, 0.9], dtype=torch.float64))
    rho = discrepancy({"a": sums[0], "v": sums[1]})
    assert rho["a"] == pytest.approx(2.0) and rho["v"] == pytest.approx(0.5)
    lams = bmm_lambdas(rho, alpha=0.1)
    assert lams == {"v": pytest.approx(math.tanh(0.2))}  # only the weak modality is mixed
    assert bmm_lambdas({"a": 1.0, "v": 1.0}, 0.1) == {}  # balanced: no mixing
    # M = 3 extension: every modality weaker than the strongest, with the strongest's lambda
    rho3 = discrepancy({"a": 3.0, "v": 1.5, "f": 1.0})
    assert rho3 == {"a": pytest.approx(2.0), "v": pytest.approx(0.5), "f": pytest.approx(1 / 3)}
    assert bmm_lambdas(rho3, 0.3) == {"v": pytest.approx(math.tanh(0.6)), "f": pytest.approx(math.tanh(0.6))}


# ----------------------------------------------------------------------------- methods
def _trainer(name, m=2, extra=(), out=None):
    torch.manual_seed(0)
    cfg = tiny_config(name, ["train.epochs=2"] + list(extra))
    return Trainer(cfg, out, quiet=True, bundle=tiny_bundle(m))


def _fixed_perm(monkeypatch, perm):
    monkeypatch.setattr(mixup_mod, "random_permutation", lambda n, device="cpu", generator=None: perm.clone())


def _capture_fuse(model):
    seen = []
    orig = model.fuse

    def fuse(features):
        seen.append({m: z.detach().clone() for m, z in features.items()})
        return orig(features)

    model.fuse = fuse
    return seen


def test_mm_mixes_all_modalities_with_fixed_perm(monkeypatch):
    tr = _trainer("mm")
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=8)
    perm = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    _fixed_perm(monkeypatch, perm)
    seen = _capture_fuse(model)
    res = method.compute_loss(model, batch, ctx)
    with torch.no_grad():
        feats = model.encode(batch.inputs)
    for m in model.modalities:
        assert torch.allclose(seen[0][m], 0.3 * feats[m] + 0.7 * feats[m][perm], atol=1e-6)
    expected = 0.3 * F.cross_entropy(res.output.logits, batch.labels) + 0.7 * F.cross_entropy(res.output.logits, batch.labels[perm])
    assert res.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert res.logs["lambda"] == 0.3
    assert MM.presets["kinetics_sounds"]["method"]["lam"] == 0.1


def test_bmm_mixes_only_weak_modality_after_warmup(monkeypatch):
    tr = _trainer("bmm", extra=["method.warmup_epochs=1", "method.alpha=0.3"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=8)
    perm = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    _fixed_perm(monkeypatch, perm)
    method.rho = {"m1": 2.0, "m2": 0.5}  # m1 strong
    lam = math.tanh(0.3 * 2.0)
    seen = _capture_fuse(model)
    with torch.no_grad():
        feats = model.encode(batch.inputs)
    # warm-up epoch: no mixing at all, plain CE
    ctx.epoch = 0
    res = method.compute_loss(model, batch, ctx)
    for m in model.modalities:
        assert torch.equal(seen[-1][m], feats[m])
    assert res.loss.item() == pytest.approx(F.cross_entropy(res.output.logits, batch.labels).item(), abs=1e-6)
    # after warm-up: strong untouched, weak mixed with lam = tanh(alpha * rho_strong)
    ctx.epoch = 1
    res = method.compute_loss(model, batch, ctx)
    assert torch.equal(seen[-1]["m1"], feats["m1"])
    assert torch.allclose(seen[-1]["m2"], lam * feats["m2"] + (1 - lam) * feats["m2"][perm], atol=1e-6)
    expected = lam * F.cross_entropy(res.output.logits, batch.labels) + (1 - lam) * F.cross_entropy(res.output.logits, batch.labels[perm])
    assert res.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert res.logs["lambda"] == pytest.approx(lam)
    # no rho yet (e.g. warmup_epochs=0, first epoch): plain training
    method.rho = None
    method.compute_loss(model, batch, ctx)
    for m in model.modalities:
        assert torch.equal(seen[-1][m], feats[m])
    assert BMM.presets["kinetics_sounds"]["method"] == {"alpha": 0.3, "warmup_epochs": 5}


@pytest.mark.parametrize("name", ["mm", "bmm"])
def test_eval_does_not_mix(name):
    tr = _trainer(name, extra=["method.warmup_epochs=0"] if name == "bmm" else [])
    if name == "bmm":
        tr.method.rho = {"m1": 3.0, "m2": 1 / 3}
    batch = batch_of(tr.bundle, "val", n=8)
    tr.model.eval()
    with torch.no_grad():
        out = tr.method.predict(tr.model, batch)
        ref = tr.model.fuse(tr.model.encode(batch.inputs))
    assert torch.equal(out.logits, ref)


def test_bmm_online_rho_equals_eval_pass_on_same_model():
    """Online sums on the un-mixed features (no step in between) equal the eval pass."""
    tr = _trainer("bmm", extra=["method.warmup_epochs=0"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    method.rho = {"m1": 2.0, "m2": 0.5}  # mixing active: sums must still use un-mixed features
    batches = list(tr._train_eval_batches())
    method.on_epoch_start(model, ctx)
    for b in batches:
        method.compute_loss(model, b, ctx)
    online = method.on_epoch_end(model, ctx)
    # by hand from the full split
    ys = torch.cat([b.labels for b in batches])
    with torch.no_grad():
        fe = [model.encode(b.inputs) for b in batches]
        s = {m: sum(float(model.modality_logits(f)[m].softmax(1).gather(1, b.labels.view(-1, 1)).sum())
                    for f, b in zip(fe, batches)) for m in model.modalities}
    assert online["rho_m1"] == pytest.approx(s["m1"] / s["m2"], rel=1e-5)
    assert online["rho_m2"] == pytest.approx(s["m2"] / s["m1"], rel=1e-5)
    assert bmm_rho_eval_pass(model, batches)["m1"] == pytest.approx(s["m1"] / s["m2"], rel=1e-5)
    assert method.rho["m1"] == pytest.approx(online["rho_m1"])
    assert len(ys) == len(tr.bundle.train)


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("name", ["mm", "bmm"])
def test_two_steps_finite(name, m):
    tr = _trainer(name, m, extra=["method.warmup_epochs=0"] if name == "bmm" else ["method.lambda_mode=beta"])
    if name == "bmm":
        tr.method.rho = {"m1": 2.0, **{f"m{k}": 0.5 for k in range(2, m + 1)}}
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = two_steps(tr)
    assert all(math.isfinite(float(r.loss.detach())) for r in res)
    assert all(r.logs["lambda"] < 1 for r in res)  # mixing was active
    for mod in tr.model.modalities:
        assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items()
                   if k.startswith(f"encoders.{mod}."))


@pytest.mark.parametrize("source", ["online", "eval_pass"])
def test_bmm_fit_and_state_round_trip(source, tmp_path):
    tr = _trainer("bmm", 3, extra=["method.warmup_epochs=1", f"method.rho_source={source}"], out=tmp_path / "run")
    result = tr.fit()
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    rows = [__import__("json").loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lambda"] == 1.0 and rows[1]["lambda"] < 1.0  # warm-up epoch 0 unmixed, epoch 1 mixed
    assert {"rho_m1", "rho_m2", "rho_m3"} <= set(rows[0])
    state = tr.method.state_dict()
    torch.save(state, tmp_path / "s.pt")
    fresh = _trainer("bmm", 3).method
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    assert fresh.rho == state["rho"] and fresh.rho is not None


def test_options_validation():
    with pytest.raises(ConfigError, match="rho_source"):
        tiny_config("bmm", ["method.rho_source=batch"])
    with pytest.raises(ConfigError, match="lambda_mode"):
        tiny_config("mm", ["method.lambda_mode=uniform"])


# ----------------------------------------------------------------------------- 2 processes
def _rho_worker(rank, world, init_file, q):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = _trainer("bmm")
        batches = list(tr._batches(tr.bundle.train, list(range(len(tr.bundle.train)))[rank::world], 8))
        q.put((rank, bmm_rho_eval_pass(tr.model, batches)))
    finally:
        dist.destroy_process_group()


def test_bmm_rho_eval_pass_two_processes(tmp_path):
    import torch.multiprocessing as mp
    tr = _trainer("bmm")
    full = bmm_rho_eval_pass(tr.model, list(tr._batches(tr.bundle.train, range(len(tr.bundle.train)), 8)))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rho_worker, args=(r, 2, str(tmp_path / "init"), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for r in range(2):  # each process saw half the data but reports the whole-split rho
        for m in full:
            assert got[r][m] == pytest.approx(full[m], rel=1e-5)


def test_mm_warmup_option_does_no_mixing():
    tr = _trainer("mm", extra=["method.warmup_epochs=1"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    batch = batch_of(tr.bundle, n=8)
    seen = _capture_fuse(model)
    with torch.no_grad():
        feats = model.encode(batch.inputs)
    ctx.epoch = 0
    method.compute_loss(model, batch, ctx)
    assert all(torch.equal(seen[-1][m], feats[m]) for m in model.modalities)
    ctx.epoch = 1
    res = method.compute_loss(model, batch, ctx)
    assert not torch.equal(seen[-1]["m1"], feats["m1"]) and res.logs["lambda"] == 0.3


@pytest.mark.parametrize("name,expect", [("mm", {"lam": 0.1}), ("bmm", {"alpha": 0.3, "warmup_epochs": 5}),
                                         ("midas", {"lam": 5.0})])
def test_kinetics_sounds_presets_resolve(name, expect):
    from mmbalance.config import resolve_config
    from mmbalance.errors import MMBalanceError
    try:
        cfg = resolve_config("kinetics_sounds", name, None, [])
    except MMBalanceError as exc:
        pytest.skip(f"kinetics_sounds not registered here: {exc}")
    for k, v in expect.items():
        assert getattr(cfg.method_options, k) == v
    default = resolve_config("synthetic", name, None, []).method_options
    assert all(getattr(default, k) != v for k, v in expect.items())

"""Diagnostics (issue 10, point 1): Shapley axioms, probe vs sklearn, CUR, gap/GMM, and
`mmbalance diagnose` on real tiny runs."""
from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from mmbalance.cli import main
from mmbalance.data.base import DataBundle, TensorMultimodalDataset
from mmbalance.diagnostics import diagnose, diagnose_run
from mmbalance.diagnostics import probes as P
from mmbalance.errors import MMBalanceError
from mmbalance.functional.common import all_subsets
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.training.build import make_method

from utils import tiny_bundle, tiny_config


# ------------------------------------------------------------------------------- Shapley math
def test_shapley_spec_example():
    """spec baselines §4.26 D2: made-up v for M=3 -> phi = (0.3, 0.2, 0.1)."""
    f = frozenset
    v = {f(): .2, f("a"): .5, f("v"): .4, f("t"): .3, f("av"): .7, f("at"): .6, f("tv"): .5, f("avt"): .8}
    phi = P.shapley_exact(v, ["a", "v", "t"])
    assert phi == pytest.approx({"a": 0.3, "v": 0.2, "t": 0.1})
    assert sum(phi.values()) == pytest.approx(v[f("avt")] - v[f()])


def _brute_force(v, players):
    """Average of marginal contributions over all M! orders."""
    out = {m: 0.0 for m in players}
    perms = list(itertools.permutations(players))
    for order in perms:
        s = frozenset()
        for m in order:
            out[m] += v[s | {m}] - v[s]
            s = s | {m}
    return {m: x / len(perms) for m, x in out.items()}


def test_shapley_efficiency_and_brute_force():
    rng = random.Random(0)
    players = ["a", "b", "c", "d"]
    v = {s: rng.random() for s in all_subsets(players)}
    phi = P.shapley_exact(v, players)
    assert sum(phi.values()) == pytest.approx(v[frozenset(players)] - v[frozenset()])
    assert phi == pytest.approx(_brute_force(v, players))


def test_shapley_monte_carlo_additive_and_efficient():
    players = [f"m{i}" for i in range(10)]
    w = {m: 0.01 * (i + 1) for i, m in enumerate(players)}
    phi, se = P.shapley_monte_carlo(lambda s: sum(w[m] for m in s), players, n_permutations=20)
    assert phi == pytest.approx(w) and all(x == pytest.approx(0.0, abs=1e-12) for x in se.values())
    # a non-additive game: the estimate keeps efficiency and lands near the exact value
    rng = random.Random(1)
    small = ["a", "b", "c", "d"]
    v = {s: rng.random() for s in all_subsets(small)}
    est, se = P.shapley_monte_carlo(v.__getitem__, small, n_permutations=400, seed=3)
    assert sum(est.values()) == pytest.approx(v[frozenset(small)] - v[frozenset()])
    exact = P.shapley_exact(v, small)
    assert all(abs(est[m] - exact[m]) <= 5 * se[m] + 1e-9 for m in small)
    exact_flag, subsets = P.shapley_subsets(players, 20)
    assert not exact_flag and frozenset() in subsets and frozenset(players) in subsets


# ---------------------------------------------------------------- planted model: axioms in vivo
def _planted(n: int = 90, k: int = 3, seed: int = 0):
    """m1 and m2 carry the same inputs and identical fusion weights (symmetric players); the
    fusion ignores m3 (null player)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    splits = {}
    for s in ("train", "val", "test"):
        x = torch.randn(n, 4, generator=g)
        x[:, 0] += 2.0 * y.float()
        splits[s] = TensorMultimodalDataset({"m1": x.clone(), "m2": x.clone(), "m3": torch.randn(n, 4, generator=g)},
                                            y.numpy(), k)
    data = DataBundle("planted", ("m1", "m2", "m3"), k, splits)
    model = MultimodalModel.from_encoders({m: nn.Identity() for m in data.modalities}, k, "concat",
                                          dims={m: 4 for m in data.modalities})
    with torch.no_grad():
        w = torch.randn(k, 4, generator=g)
        w[:, 0] = torch.tensor([-2.0, 0.0, 2.0])
        model.fusion.fc.weight.copy_(torch.cat([w, w, torch.zeros(k, 4)], dim=1))
        model.fusion.fc.bias.zero_()
    method = make_method("joint", data.modalities, k)
    return model, method, data


@pytest.mark.parametrize("level", ["feature", "input"])
def test_planted_null_player_and_symmetry(level):
    model, method, data = _planted()
    res = diagnose(model, method, data, level=level)
    sh = res["shapley"]
    for key in ("accuracy", "true_class_prob"):
        phi = sh[key]
        assert phi["m3"] == pytest.approx(0.0, abs=1e-9)
        assert phi["m1"] == pytest.approx(phi["m2"], abs=1e-9)
        assert sum(phi.values()) == pytest.approx(sh["v_all"][key] - sh["v_none"][key], abs=1e-9)
    assert sh["exact"] is True and sh["level"] == level
    assert res["per_modality"]["m3"]["removal_drop"] == pytest.approx(0.0, abs=1e-12)
    assert res["verdicts"]["m3"].startswith("m3: not used")
    assert res["verdicts"]["m1"].startswith("m1: ")
    assert res["cur"]["defined"] is False and "two modalities" in res["cur"]["why"]
    # W-split of concat: m3's per-modality logits are the bias share only (uniform softmax)
    gap = res["gap"]["pairs"]["m1-m2"]
    assert gap["mean"] == pytest.approx(0.0, abs=1e-6) and gap["std"] == pytest.approx(0.0, abs=1e-6)
    assert res["ensemble_gap"]["source"] == "none"


# ----------------------------------------------------------------------------- probe
def test_probe_equals_sklearn_directly():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(0)
    ytr, yte = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
    xtr = rng.normal(size=(200, 7)) + ytr[:, None] * 0.7
    xte = rng.normal(size=(80, 7)) + yte[:, None] * 0.7
    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(sc.transform(xtr), ytr)
    want = float(np.mean(clf.predict(sc.transform(xte)) == yte))
    got = P.linear_probe_accuracy(torch.tensor(xtr, dtype=torch.float64), torch.tensor(ytr), xte, yte, seed=0)
    assert got == pytest.approx(want) and 0.4 < got <= 1.0


# ------------------------------------------------------------------------------ CUR, gap
def test_cur_arithmetic():
    assert P.conditional_utilisation_rate(0.8, 0.4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        P.conditional_utilisation_rate(0.0, 0.0)


def test_gap_summary_planted_mixture():
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.normal(0.0, 0.05, 700), rng.normal(0.6, 0.05, 300)])
    s = P.gap_summary(g)
    assert s["mean"] == pytest.approx(g.mean()) and s["std"] == pytest.approx(g.std())
    h = s["histogram"]
    assert len(h["edges"]) == 21 and h["edges"][0] == -1.0 and h["edges"][-1] == 1.0
    assert sum(h["counts"]) == 1000
    gm = s["gmm"]
    assert gm["means"][0] == pytest.approx(0.0, abs=0.02) and gm["means"][1] == pytest.approx(0.6, abs=0.02)
    assert gm["balanced_share"] == pytest.approx(0.7, abs=0.02) and gm["balanced_share"] == gm["weights"][0]


def test_verdict_sentence():
    s = P.verdict("x2", 0.123, zero_out=0.5, probe=0.6, reference=0.66)
    assert s.startswith("x2: used; removing it costs 12.3 points") and "0.91 of its standalone" in s
    assert P.verdict("x1", 0.005).startswith("x1: not used")


# ------------------------------------------------------------------------- real tiny runs
SMALL = ["epochs=2", "--quiet", "data.n_train=150", "data.n_val=50", "data.n_test=60"]
THREE = ["data.num_modalities=3", "data.shared=0.5", "data.unique=[0.2,0.1,0.1]", "data.noise=[0.6,1.0,0.8]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    out = {}
    for name, method, extra in (("joint", "joint", []), ("multiloss", "multiloss", []), ("mla", "mla", []),
                                ("multiloss3", "multiloss", THREE),
                                ("uni_x2", "unimodal", ["method.modality=x2"]),
                                ("uni_x1", "unimodal", ["method.modality=x1"])):
        d = root / name
        assert main(["train", "--dataset", "synthetic", "--method", method, "--out", str(d), *SMALL, *extra]) == 0
        out[name] = d
    return out


def _check_schema(res, mods, heads):
    assert res["split"] == "test" and res["modalities"] == mods and res["num_samples"] == 60
    assert 0 <= res["fused_accuracy"] <= 1
    for m in mods:
        e = res["per_modality"][m]
        assert 0 <= e["zero_out_accuracy"] <= 1 and 0 <= e["probe_accuracy"] <= 1
        assert ("head_accuracy" in e) == heads
        assert isinstance(res["verdicts"][m], str) and res["verdicts"][m].startswith(m + ":")
    sh = res["shapley"]
    assert set(sh) >= {"level", "exact", "accuracy", "true_class_prob", "v_all", "v_none"}
    for key in ("accuracy", "true_class_prob"):
        assert set(sh[key]) == set(mods)
        assert sum(sh[key].values()) == pytest.approx(sh["v_all"][key] - sh["v_none"][key], abs=1e-9)
    pairs = list(itertools.combinations(mods, 2))
    assert set(res["gap"]["pairs"]) == {f"{a}-{b}" for a, b in pairs}
    for p in res["gap"]["pairs"].values():
        assert -1 <= p["mean"] <= 1 and p["std"] >= 0 and sum(p["histogram"]["counts"]) == 60
        assert 0 <= p["gmm"]["balanced_share"] <= 1 and len(p["gmm"]["means"]) == 2
    eg = res["ensemble_gap"]
    assert eg["source"] == ("heads" if heads else "none")
    if heads:
        assert eg["gap"] == pytest.approx(res["fused_accuracy"] - eg["ensemble_accuracy"])
    assert res["cur"]["defined"] in (True, False)
    if len(mods) == 2 and res["cur"]["defined"]:
        c = res["cur"]
        a, b = mods
        assert c["rate"][b] == pytest.approx((c["accuracy_all"] - c["accuracy_alone"][a]) / c["accuracy_all"])


@pytest.mark.parametrize("name,mods,heads", [("joint", ["x1", "x2"], False), ("multiloss", ["x1", "x2"], True),
                                             ("mla", ["x1", "x2"], False),
                                             ("multiloss3", ["x1", "x2", "x3"], True)])
def test_diagnose_cli_on_runs(runs, name, mods, heads, capsys):
    d = runs[name]
    assert main(["diagnose", str(d)]) == 0
    assert "diagnostics.json" in capsys.readouterr().out
    res = json.loads((d / "diagnostics.json").read_text())
    _check_schema(res, mods, heads)
    if len(mods) == 2:
        assert res["cur"]["defined"] is True
    if name == "mla":
        assert res["gap"]["logits"] == "method"  # MLA's shared head per modality


def test_diagnose_reference_and_input_level(runs):
    res = diagnose_run(runs["joint"], references=[runs["uni_x2"]], level="input", write=False)
    want = json.loads((runs["uni_x2"] / "result.json").read_text())["test"]["accuracy"]
    assert res["per_modality"]["x2"]["reference_accuracy"] == pytest.approx(want)
    assert "reference_accuracy" not in res["per_modality"]["x1"]
    assert "standalone" in res["verdicts"]["x2"] and res["shapley"]["level"] == "input"
    with pytest.raises(MMBalanceError, match="unimodal"):
        diagnose_run(runs["joint"], references=[runs["multiloss"]], write=False)


def test_ensemble_gap_from_reference_runs(runs):
    """The ensemble of the two unimodal reference runs: each run's probabilities must reproduce its
    own result.json test accuracy (computed by the trainer), and their average is scored here."""
    from mmbalance.diagnostics.diagnose import reference_probabilities
    res = diagnose_run(runs["multiloss"], references=[runs["uni_x1"], runs["uni_x2"]], write=False)
    y = None
    probs = []
    for name in ("uni_x1", "uni_x2"):
        from mmbalance.training.build import build_run
        from mmbalance.training.trainer import load_run_config
        y = torch.as_tensor(build_run(load_run_config(runs[name])).data.splits["test"].labels)
        p = reference_probabilities(runs[name], "test", y)
        assert torch.allclose(p.sum(1), torch.ones(len(y)))
        own = json.loads((runs[name] / "result.json").read_text())["test"]["accuracy"]
        assert float(p.argmax(1).eq(y).double().mean()) == pytest.approx(own)
        probs.append(p)
    want = float(((probs[0] + probs[1]) / 2).argmax(1).eq(y).double().mean())
    eg = res["ensemble_gap"]
    assert eg["source"] == "references"
    assert eg["ensemble_accuracy"] == pytest.approx(want, abs=1e-12)
    assert eg["gap"] == pytest.approx(res["fused_accuracy"] - want)
    assert eg["heads"]["source"] == "heads"  # multiloss has heads: their ensemble is kept beside
    # one reference only: not an ensemble of unimodal runs; the heads are used
    one = diagnose_run(runs["multiloss"], references=[runs["uni_x2"]], write=False)
    assert one["ensemble_gap"]["source"] == "heads"
    # a reference trained on other data is refused, naming the folder
    other = runs["uni_x1"].parent / "uni_x1_other"
    assert main(["train", "--dataset", "synthetic", "--method", "unimodal", "--out", str(other), *SMALL,
                 "method.modality=x1", "data.n_test=40"]) == 0
    with pytest.raises(MMBalanceError, match="uni_x1_other.*another 'test' split"):
        diagnose_run(runs["joint"], references=[other, runs["uni_x2"]], write=False)


def test_diagnose_val_split_cli(runs):
    assert main(["diagnose", str(runs["joint"]), "--split", "val", "--level", "feature"]) == 0
    res = json.loads((runs["joint"] / "diagnostics.json").read_text())
    assert res["split"] == "val" and res["num_samples"] == 50


def test_custom_data_run_is_refused_with_advice(tmp_path, capsys):
    from mmbalance.training.trainer import Trainer
    bundle = tiny_bundle(2)
    tr = Trainer(tiny_config("joint", ["train.epochs=1"]), tmp_path / "r", quiet=True, bundle=bundle)
    tr.fit()
    with pytest.raises(MMBalanceError, match=r"diagnose\(model, method, data\)"):
        diagnose_run(tmp_path / "r")
    assert main(["diagnose", str(tmp_path / "r")]) == 2
    res = diagnose(tr.model, tr.method, bundle)  # the Python route works on the same parts
    assert res["num_samples"] == 48 and res["modalities"] == ["m1", "m2"] and 0 <= res["fused_accuracy"] <= 1
    assert math.isclose(sum(res["shapley"]["accuracy"].values()),
                        res["shapley"]["v_all"]["accuracy"] - res["shapley"]["v_none"]["accuracy"], abs_tol=1e-9)


def test_train_diagnose_true_writes_diagnostics_at_the_end(tmp_path):
    import json as _json

    from mmbalance.cli import main as _main
    assert _main(["train", "--dataset", "synthetic", "--method", "multiloss", "--out", str(tmp_path), "--quiet",
                  "epochs=1", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1",
                  "train.diagnose=true"]) == 0
    diag = _json.loads((tmp_path / "diagnostics.json").read_text())
    res = _json.loads((tmp_path / "result.json").read_text())
    assert set(diag["per_modality"]) == {"x1", "x2"} and res["verdicts"] == diag["verdicts"]
    assert diag["fused_accuracy"] == pytest.approx(res["test"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("m_count", [2, 3])
@pytest.mark.parametrize("name", __import__("mmbalance.methods", fromlist=["METHODS"]).METHODS.names())
def test_diagnose_runs_on_every_method(name, m_count):
    from mmbalance.diagnostics import diagnose
    from mmbalance.methods import METHODS
    from mmbalance.training.trainer import Trainer
    from utils import tiny_bundle, tiny_config
    hi = METHODS.get(name).modality_range[1]
    if hi is not None and hi < m_count:
        pytest.skip(f"{name} supports at most {hi} modalities")
    bundle = tiny_bundle(m_count, n=30)
    tr = Trainer(tiny_config(name, ["train.epochs=1", "train.threads=1"]), None, quiet=True, bundle=bundle)
    tr.fit()
    d = diagnose(tr.model, tr.method, bundle)
    mods = [f"m{i + 1}" for i in range(m_count)]
    assert d["modalities"] == mods and set(d["verdicts"]) == set(mods)
    assert all(0.0 <= d["per_modality"][m]["zero_out_accuracy"] <= 1.0 for m in mods)
    total = sum(d["shapley"]["accuracy"][m] for m in mods)
    assert total == pytest.approx(d["shapley"]["v_all"]["accuracy"] - d["shapley"]["v_none"]["accuracy"], abs=1e-6)


def test_result_json_probe_matches_sklearn_on_the_best_checkpoint(runs):
    """train.probe (on by default) writes each modality's probe accuracy into result.json: equal to
    a logistic regression fitted here with sklearn on the best checkpoint's features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mmbalance.training.build import build_run
    from mmbalance.training.checkpoint import load_checkpoint
    from mmbalance.training.trainer import load_run_config
    d = runs["joint"]
    res = json.loads((d / "result.json").read_text())
    parts = build_run(load_run_config(d))
    parts.model.load_state_dict(load_checkpoint(d / "checkpoints" / "best.pt")["model"])
    parts.model.eval()

    def feats(ds):
        with torch.no_grad():
            f = parts.model.encode({m: torch.stack([ds[i]["inputs"][m] for i in range(len(ds))])
                                    for m in parts.data.modalities})
        return {m: v.numpy() for m, v in f.items()}, np.asarray(ds.labels)
    (tr, ytr), (te, yte) = feats(parts.data.train_eval), feats(parts.data.splits["test"])
    for m in ("x1", "x2"):
        sc = StandardScaler().fit(tr[m])
        clf = LogisticRegression(max_iter=1000).fit(sc.transform(tr[m]), ytr)
        want = float((clf.predict(sc.transform(te[m])) == yte).mean())
        assert res["test"]["modalities"][m]["probe_accuracy"] == pytest.approx(want, abs=0.021), m


def test_diagnose_run_leaves_the_methods_holdout_out_like_the_trainer(tmp_path):
    """A run with a method holdout (G-Blending's V): mmbalance diagnose rebuilds the same carved
    train split as the trainer, so its probe equals result.json's (which the trainer computed)."""
    d = tmp_path / "gb"
    assert main(["train", "--dataset", "synthetic", "--method", "gblend", "--out", str(d), *SMALL,
                 "method.holdout=0.2"]) == 0
    res = json.loads((d / "result.json").read_text())
    assert res["holdout_size"] > 0
    diag = diagnose_run(d, write=False)
    for m in ("x1", "x2"):
        assert diag["per_modality"][m]["probe_accuracy"] == pytest.approx(
            res["test"]["modalities"][m]["probe_accuracy"], abs=1e-12)

"""Checks that run over every registered method (DESIGN.md §8)."""
import copy
import math

import pytest
import torch

from mmbalance.errors import MethodSetupError
from mmbalance.methods import METHODS, build_method
from mmbalance.training.trainer import Trainer
from utils import tiny_bundle, tiny_config, two_steps

ALL = METHODS.names()


def _trainer(name, bundle, tmp_path=None, extra=()):
    cfg = tiny_config(name, ["train.epochs=1"] + list(extra))
    return Trainer(cfg, tmp_path, quiet=True, bundle=bundle)


@pytest.mark.parametrize("name", ALL)
def test_two_steps_two_modalities(name):
    torch.manual_seed(0)
    tr = _trainer(name, tiny_bundle(2))
    before = copy.deepcopy(tr.model.state_dict())
    losses = [float(r.loss.detach()) for r in two_steps(tr)]
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses), losses
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{name}: no parameter changed after two steps"
    for m in tr.model.modalities:  # every encoder learns (unimodal trains only its own modality)
        if name == "unimodal" and m != tr.method.modality:
            continue
        if name == "reconboost" and m != tr.model.modalities[0]:
            continue  # epoch 0 is stage 0's boosting phase: only the first modality's learner trains
                      # (tests/methods/test_reconboost.py checks every encoder across the stages)
        assert any(k.startswith(f"encoders.{m}.") for k in changed), f"{name}: encoder {m} did not learn"


@pytest.mark.parametrize("name", ALL)
def test_three_modalities_run_or_refuse(name):
    bundle = tiny_bundle(3)
    try:
        tr = _trainer(name, bundle)
    except MethodSetupError as exc:
        assert "modalit" in str(exc)
        return
    losses = [float(r.loss.detach()) for r in two_steps(tr)]
    assert all(math.isfinite(l) for l in losses)


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip(name, tmp_path):
    bundle = tiny_bundle(2)
    tr = _trainer(name, bundle)
    two_steps(tr)
    state = tr.method.state_dict()
    path = tmp_path / "m.pt"
    torch.save(state, path)
    fresh = _trainer(name, bundle).method
    fresh.load_state_dict(torch.load(path, weights_only=True))
    a, b = state, fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
        else:
            assert repr(va) == repr(vb), k


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name, tmp_path):
    bundle = tiny_bundle(2)
    r1 = _trainer(name, bundle, tmp_path / "a", ["train.epochs=2"]).fit()
    r2 = _trainer(name, bundle, tmp_path / "b", ["train.epochs=2"]).fit()
    assert r1["test"] == r2["test"]


def test_registry_metadata_and_suggestions():
    for name, entry in METHODS:
        for key in ("paper", "kind", "description", "modalities"):
            assert entry.meta.get(key), f"{name} lacks metadata {key}"
    with pytest.raises(KeyError, match="Did you mean 'ogm_ge'"):
        build_method("ogm-ge", None, ["a", "b"], 3)


@pytest.fixture(scope="module")
def three_modality_npz(tmp_path_factory):
    import numpy as np
    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 3
    path = tmp_path_factory.mktemp("npz") / "three.npz"
    np.savez(path, y=y, split=np.array(["train"] * 80 + ["val"] * 20 + ["test"] * 20),
             x_a=rng.normal(size=(n, 5)) + y[:, None], x_b=rng.normal(size=(n, 4, 3)) + 0.5 * y[:, None, None],
             x_c=rng.normal(size=(n, 6)), class_names=np.array(["p", "q", "r"]))
    return path


@pytest.mark.parametrize("name", ALL)
def test_cli_end_to_end_synthetic_and_three_modality_npz(name, tmp_path, three_modality_npz, capsys):
    from mmbalance.cli import main
    small = ["epochs=1", "model.feature_dim=8", "model.hidden_dim=16", "train.progress=off", "train.threads=1"]
    assert main(["train", "--dataset", "synthetic", "--method", name, "--out", str(tmp_path / "syn"), "--quiet",
                 "data.n_train=120", "data.n_val=40", "data.n_test=40", *small]) == 0
    rc = main(["train", "--dataset", str(three_modality_npz), "--method", name, "--out", str(tmp_path / "npz"),
               "--quiet", *small])
    hi = METHODS.get(name).modality_range[1]
    if hi is not None and hi < 3:
        assert rc == 2 and "modalities" in capsys.readouterr().err
    else:
        assert rc == 0
        import json
        res = json.loads((tmp_path / "npz" / "result.json").read_text())
        assert res["modalities"] == ["a", "b", "c"] and res["class_names"] == ["p", "q", "r"]


def test_readme_method_table_lists_every_method():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [n for n in ALL if f"| `{n}` |" not in readme]
    assert not missing, f"README's method table lacks {missing}"

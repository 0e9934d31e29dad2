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
    fresh.load_state_dict(torch.load(path, weights_only=False))
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

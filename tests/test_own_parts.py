"""Your own encoders, data and loop: the public surface of issue "Your own model, data and loop"."""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import mmbalance
from mmbalance.data import from_arrays, from_datasets
from mmbalance.errors import ConfigError, DataError, MMBalanceError, ModelSetupError
from mmbalance.methods import METHODS
from mmbalance.training.trainer import load_run_config, run_from_dir

FAST = ["data.batch_size=16", "train.progress=off", "train.threads=1"]


class Pairs(torch.utils.data.Dataset):
    """A user Dataset: ({modality: tensor}, label) items, or (tuple, label) with ``as_tuple``."""

    def __init__(self, n: int, seed: int, as_tuple: bool = False, k: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % k
        self.a = torch.randn(n, 6, generator=g) + self.y[:, None].float()
        self.b = torch.randn(n, 1, 6, 6, generator=g) + 0.5 * self.y[:, None, None, None].float()
        self.as_tuple = as_tuple

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = (self.a[i], self.b[i]) if self.as_tuple else {"a": self.a[i], "b": self.b[i]}
        return x, int(self.y[i])


def own_data(as_tuple=False, n=60):
    return from_datasets(train=Pairs(n, 0, as_tuple), test=Pairs(30, 1, as_tuple), val=Pairs(30, 2, as_tuple),
                         modalities=["a", "b"], num_classes=3, class_names=["x", "y", "z"], name="pairs")


def own_encoders():
    torch.manual_seed(0)
    return {"a": nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
            "b": nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())}


def own_model(data):
    return mmbalance.MultimodalModel.from_encoders(own_encoders(), num_classes=3, input_shapes=data.input_shapes)


# ------------------------------------------------------------------------------------ model
def test_feature_dims_declared_attribute_or_dry_forward():
    enc = own_encoders()
    m = mmbalance.MultimodalModel.from_encoders(enc, 3, dims={"a": 8, "b": 5})
    assert m.feature_dims == {"a": 8, "b": 5}  # declared (not checked until the first forward)
    m = mmbalance.MultimodalModel.from_encoders(enc, 3, input_shapes={"a": (6,), "b": (1, 6, 6)})
    assert m.feature_dims == {"a": 8, "b": 8}
    assert m.fusion.fc.weight.shape == (3, 16)  # concat fusion over 8 + 8 features
    enc["a"].out_dim = 7
    m = mmbalance.MultimodalModel.from_encoders(enc, 3, dims={"b": 4})
    assert m.feature_dims == {"a": 7, "b": 4}


def test_bad_encoders_are_clear_errors():
    with pytest.raises(ModelSetupError, match="cannot tell the feature size of encoder 'a'"):
        mmbalance.MultimodalModel.from_encoders({"a": nn.Linear(6, 8)}, 3)
    with pytest.raises(ModelSetupError, match=r"encoder 'a' must return a \[B, d\] tensor.*\[2, 4, 8\]"):
        mmbalance.MultimodalModel.from_encoders({"a": nn.Linear(6, 8)}, 3, input_shapes={"a": (4, 6)})
    with pytest.raises(ModelSetupError, match="encoder 'a' failed on a dry forward"):
        mmbalance.MultimodalModel.from_encoders({"a": nn.Linear(6, 8)}, 3, input_shapes={"a": (5,)})
    with pytest.raises(ModelSetupError, match="not torch.nn.Module"):
        mmbalance.MultimodalModel.from_encoders({"a": lambda x: x}, 3, dims={"a": 6})


def test_model_must_match_the_data():
    data = own_data()
    model = mmbalance.MultimodalModel.from_encoders({"a": own_encoders()["a"]}, 3, dims={"a": 8})
    with pytest.raises(ConfigError, match=r"model's modalities \['a'\] differ from the data's \['a', 'b'\]"):
        mmbalance.Trainer(mmbalance.make_config("joint", FAST), None, model=model, data=data, quiet=True)
    model = mmbalance.MultimodalModel.from_encoders(own_encoders(), 5, dims={"a": 8, "b": 8})
    with pytest.raises(ConfigError, match="predicts 5 classes but the data has 3"):
        mmbalance.Trainer(mmbalance.make_config("joint", FAST), None, model=model, data=data, quiet=True)


@pytest.mark.parametrize("method", ["ogm_ge", "multiloss", "mcr", "mla"])
def test_own_encoders_train_with_methods(tmp_path, method):
    """Own encoders + own Dataset; methods needing heads (multiloss, mcr) or their own fusion
    (mla) get them on the user's model."""
    data = own_data()
    model = own_model(data)
    cfg = mmbalance.make_config(method, FAST + ["epochs=2"])
    res = mmbalance.Trainer(cfg, tmp_path, model=model, data=data, quiet=True).fit()
    assert 0 <= res["test"]["accuracy"] <= 1 and res["class_names"] == ["x", "y", "z"]
    assert model.encoders["a"] is not None and set(res["test"]["modalities"]) == {"a", "b"}
    if method in ("multiloss", "mcr"):
        assert model.heads is not None and "head_accuracy" in res["test"]["modalities"]["a"]
    if method == "mla":
        assert type(model.fusion).__name__ == "SharedHeadFusion"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["name"] == "custom:pairs"
    assert saved["model"]["custom"].startswith("MultimodalModel(encoders: a=Sequential, b=Sequential")
    assert res["samples_seen"] == 2 * 60 or method == "mla"


def test_own_model_learns(tmp_path):
    data = own_data(n=240)
    res = mmbalance.Trainer(mmbalance.make_config("joint", FAST + ["epochs=6"]), None, model=own_model(data),
                            data=data, quiet=True).fit()
    assert res["test"]["accuracy"] > 0.6  # 3 classes, chance 0.33


# ------------------------------------------------------------------------------------ data
def test_dataset_items_dict_or_tuple_give_the_same_batches():
    d1, d2 = own_data(False), own_data(True)
    s1, s2 = d1.train[3], d2.train[3]
    assert s1["label"] == s2["label"] and all(torch.equal(s1["inputs"][m], s2["inputs"][m]) for m in "ab")
    assert d1.input_shapes == {"a": (6,), "b": (1, 6, 6)} and d1.origin == "python"


def test_without_val_a_stratified_share_of_train_is_held_out():
    data = from_datasets(train=Pairs(60, 0), test=Pairs(30, 1), modalities=["a", "b"], num_classes=3)
    assert len(data.val) == 6 and len(data.train) == 54
    assert sorted(np.bincount(data.val.labels)) == [2, 2, 2]


class Bad(torch.utils.data.Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.item


@pytest.mark.parametrize("item, msg", [
    (({"a": torch.zeros(6)}, 0), r"sample 0: inputs have keys \['a'\], expected the declared modalities \['a', 'b'\]"),
    (((torch.zeros(6),), 0), r"sample 0: inputs hold 1 tensors, expected 2"),
    (({"a": torch.zeros(6), "b": torch.zeros(2)}, 7), r"sample 0: label 7 is outside 0..2"),
    (({"a": torch.zeros(6), "b": torch.zeros(2)}, "cat"), r"sample 0: label must be an integer class index"),
    (torch.zeros(3), r"sample 0: expected an item \(inputs, label\)"),
    (({"a": "x", "b": torch.zeros(2)}, 1), r"sample 0, modality 'a': expected a tensor"),
])
def test_bad_dataset_items_name_the_sample(item, msg):
    with pytest.raises(DataError, match=msg):
        from_datasets(train=Bad(item), test=Bad(item), val=Bad(item), modalities=["a", "b"], num_classes=3)


def test_declaration_errors():
    with pytest.raises(DataError, match="declare the modality names"):
        from_datasets(train=Pairs(9, 0), test=Pairs(9, 1), modalities=[], num_classes=3)
    with pytest.raises(DataError, match="class_names has 2 names but num_classes is 3"):
        from_datasets(train=Pairs(9, 0), test=Pairs(9, 1), modalities=["a", "b"], num_classes=3, class_names=["p", "q"])
    with pytest.raises(DataError, match="at least a 'train' and a 'test' split"):
        from_datasets(train=Pairs(9, 0), test=None, modalities=["a", "b"], num_classes=3)


def test_from_arrays_and_its_errors():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    split = lambda: ({"u": rng.normal(size=(40, 3)), "v": rng.normal(size=(40, 2, 5))}, y)
    data = from_arrays(train=split(), test=split())
    assert data.num_classes == 4 and data.modalities == ("u", "v") and data.input_shapes["v"] == (2, 5)
    assert data.train[0]["inputs"]["u"].dtype == torch.float32
    with pytest.raises(DataError, match=r"split 'test', modality 'u': 39 rows but 40 labels"):
        from_arrays(train=split(), test=({"u": np.zeros((39, 3)), "v": np.zeros((40, 2, 5))}, y))
    bad = np.zeros((40, 3))
    bad[5, 1] = np.nan
    with pytest.raises(DataError, match="NaN or inf at sample 5"):
        from_arrays(train=({"u": bad, "v": np.zeros((40, 2, 5))}, y), test=split())
    with pytest.raises(DataError, match=r"labels must hold integers"):
        from_arrays(train=({"u": bad, "v": np.zeros((40, 2, 5))}, y + 0.5), test=split())


# ------------------------------------------------------------------------------------ resume
def test_own_data_run_refuses_cli_resume_and_resumes_exactly_from_python(tmp_path):
    data = own_data()
    over = FAST + ["epochs=4", "optim.name=adam", "optim.lr=0.01"]
    full = mmbalance.Trainer(mmbalance.make_config("multiloss", over), tmp_path / "full", model=own_model(data),
                             data=data, quiet=True).fit()
    part = tmp_path / "part"
    tr = mmbalance.Trainer(mmbalance.make_config("multiloss", over), part, model=own_model(data), data=data, quiet=True)
    tr.cfg.train.epochs = 2  # stopped after epoch 1
    tr.fit()
    with pytest.raises(MMBalanceError, match=r"trained from Python with its data \(custom:pairs\) and its model"):
        run_from_dir(part)
    cfg = load_run_config(part)
    cfg.train.epochs = 4
    resumed = mmbalance.Trainer(cfg, part, model=own_model(data), data=data, quiet=True).fit(resume=True)
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    # other data under the same run folder is refused, naming the key
    other = from_datasets(train=Pairs(60, 0), test=Pairs(30, 1), val=Pairs(30, 2), modalities=["a", "b"],
                          num_classes=3, name="others")
    with pytest.raises(MMBalanceError, match=r"data.name: checkpoint 'custom:pairs', now 'custom:others'"):
        mmbalance.Trainer(cfg, part, model=own_model(other), data=other, quiet=True).fit(resume=True)


# ------------------------------------------------------------------------------------ own loop
def _loop_options(name):
    opts = {f.name for f in fields(METHODS.get(name).Options)}
    return {"warmup_epochs": 1} if "warmup_epochs" in opts else {}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_in_a_user_loop(name):
    torch.manual_seed(0)
    data = own_data()
    method = mmbalance.make_method(name, data.modalities, data.num_classes, **_loop_options(name))
    try:
        model = mmbalance.prepare_model(method, own_model(data))
    except ModelSetupError as exc:  # mid-level fusion (greedy) needs encoders with stages(); ours have none
        assert "does not expose them" in str(exc), exc
        from mmbalance.models.encoders import MLPEncoder, SmallCNN
        torch.manual_seed(0)
        model = mmbalance.prepare_model(method, mmbalance.MultimodalModel.from_encoders(
            {"a": MLPEncoder(6, 8, 8), "b": SmallCNN(1, 8)}, num_classes=3))
    opt = torch.optim.SGD(mmbalance.optimizer_groups(method, model, lr=0.05), lr=0.05, momentum=0.9)
    # method=: its holdout (G-Blending's V) and its setup() hook, as the trainer gives them
    ctx = mmbalance.make_context(model, opt, data=data, num_epochs=2, method=method)
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(2):
        method.on_epoch_start(model, ctx.begin_epoch(epoch))
        model.train()
        for batch in ctx.batches(method, batch_size=16):
            res = method.training_step(model, batch, ctx)
            assert torch.isfinite(res.loss)
        method.on_epoch_end(model, ctx)
    assert ctx.global_step >= 2 * 4 and ctx.num_batches >= 4
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_reset_optimizer_in_a_user_loop_clears_state_in_place():
    data = own_data()
    model = own_model(data)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = mmbalance.make_context(model, opt, data=data)
    method = mmbalance.make_method("joint", data.modalities, data.num_classes)
    method.training_step(model, next(iter(ctx.batches(method, 16))), ctx)
    assert len(opt.state) > 0
    ctx.reset_optimizer()
    assert ctx.optimizer is opt and len(opt.state) == 0


# ------------------------------------------------------------------------------------ README
def _readme_blocks():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = {}
    for title in ("Your own model and data", "Inside your own loop"):
        sec = text.split(f"## {title}", 1)[1]
        blocks[title] = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    return blocks


def test_readme_blocks_run_as_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = _readme_blocks()
    own = blocks["Your own model and data"]
    assert len([l for l in own.splitlines() if l.strip() and not l.strip().startswith("#")]) < 30
    scope: dict = {}
    exec(compile(own, "README:own", "exec"), scope)
    assert (tmp_path / "runs" / "own" / "result.json").is_file()
    exec(compile(blocks["Inside your own loop"], "README:loop", "exec"), scope)
    assert "zero-out" in capsys.readouterr().out

"""MOSI / MOSEI from MulT/MultiBench-layout pickles written here."""
import json
import pickle

import numpy as np
import pytest
import torch

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.data import build_dataset
from mmbalance.errors import ConfigError, DataError

DIMS = {"text": 300, "audio": 5, "vision": 20}
SIZES = {"train": 24, "valid": 8, "test": 10}


def make_data(dims=DIMS, seed=0, t=50):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in SIZES.items():
        y = rng.uniform(-3, 3, size=n)
        y[:2] = [0.0, -0.0]
        d = {m: rng.normal(size=(n, t, k)).astype(np.float32) for m, k in dims.items()}
        d["labels"] = y.reshape(n, 1, 1).astype(np.float32)
        d["id"] = np.array([[f"vid{j}", str(j % 3)] for j in range(n)])
        data[split] = d
    data["train"]["text"][:, :, 0] += 2.0 * np.sign(data["train"]["labels"].reshape(-1, 1))
    data["train"]["audio"][0, 0, 0] = -np.inf
    data["train"]["audio"][1, 3, 2] = np.nan
    return data


def dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def build(name, root, on_error="raise", **opts):
    cfg = resolve_config(name, "joint", None, [f"data.root={root}", f"data.on_error={on_error}"] +
                         [f"data.{k}={v}" for k, v in opts.items()])
    return build_dataset(name, cfg.data_options, cfg.data)


@pytest.fixture
def mosi_root(tmp_path):
    dump(make_data(), tmp_path / "mosi_data.pkl")
    return tmp_path


def test_mosi_shapes_splits_binary(mosi_root):
    b = build("mosi", mosi_root)
    assert b.modalities == ("text", "audio", "vision") and b.num_classes == 2
    assert [len(b.splits[s]) for s in ("train", "val", "test")] == [24, 8, 10]
    assert b.input_shapes == {"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}
    s = b.train[0]
    assert s["inputs"]["audio"].dtype == torch.float32 and s["inputs"]["text"].shape == (50, 300)
    raw = make_data()["train"]["labels"].reshape(-1)
    assert b.train.labels.tolist() == [int(v >= 0) for v in raw]
    assert b.train.labels[0] == 1 and b.train.labels[1] == 1  # zero counts as positive (C-BB)
    assert b.nonfinite_replaced["train"] == {"audio": 2}
    assert torch.isfinite(b.train.inputs["audio"]).all() and b.train.inputs["audio"][0, 0, 0] == 0
    assert b.skipped == []


def test_targets_nonzero_and_7class(mosi_root):
    b = build("mosi", mosi_root, target="binary_nonzero")
    assert len(b.train) == 22 and len(b.val) == 6 and len(b.test) == 8
    dropped = [(d["split"], d["index"], d["id"]) for d in b.skipped]
    assert dropped == [("train", 0, "vid0_0"), ("train", 1, "vid1_1"), ("val", 0, "vid0_0"), ("val", 1, "vid1_1"),
                       ("test", 0, "vid0_0"), ("test", 1, "vid1_1")]
    assert all("binary_nonzero" in d["reason"] for d in b.skipped)
    b7 = build("mosi", mosi_root, target="7class")
    raw = make_data()["test"]["labels"].reshape(-1)
    assert b7.num_classes == 7 and b7.test.labels.tolist() == (np.round(raw) + 3).astype(int).tolist()
    assert b7.class_names == ["-3", "-2", "-1", "0", "1", "2", "3"]


def test_modality_subset_and_mosei(tmp_path):
    dump(make_data({"text": 300, "audio": 74, "vision": 35}), tmp_path / "mosei_senti_data.pkl")
    b = build("mosei", tmp_path, modalities="[text,vision]")
    assert b.modalities == ("text", "vision") and b.input_shapes["vision"] == (50, 35)
    assert set(b.train[0]["inputs"]) == {"text", "vision"}
    b2 = build("mosei", tmp_path / "mosei_senti_data.pkl")  # root may be the file itself
    assert b2.input_shapes["audio"] == (50, 74)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no pickle"):
        build("mosi", tmp_path)
    (tmp_path / "mosi_data.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        build("mosi", tmp_path)
    dump([1, 2], tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match="dict of splits"):
        build("mosi", tmp_path)
    d = make_data()
    del d["valid"]
    dump(d, tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match="no split 'valid'"):
        build("mosi", tmp_path)
    d = make_data()
    del d["test"]["vision"]
    dump(d, tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match=r"split 'test' lacks key\(s\) \['vision'\]"):
        build("mosi", tmp_path)
    build("mosi", tmp_path, modalities="[text,audio]")  # the missing modality is not asked for
    d = make_data()
    d["valid"]["audio"] = d["valid"]["audio"][:, :, :4]
    dump(d, tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match="field 'audio' has per-sample shape"):
        build("mosi", tmp_path)
    d = make_data()
    d["train"]["text"] = d["train"]["text"][:5]
    dump(d, tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match=r"field 'text' must have shape \(N=24"):
        build("mosi", tmp_path)
    d = make_data()
    d["test"]["labels"] = np.zeros((10, 2))
    dump(d, tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match="'labels' must have one value per sample"):
        build("mosi", tmp_path)
    d = make_data()
    d["test"]["vision"][3, 1, 1] = np.nan
    dump(d, tmp_path / "mosi_data.pkl")
    with pytest.raises(DataError, match="sample 3 .id vid3_0. field 'vision' has NaN"):
        build("mosi", tmp_path)
    b = build("mosi", tmp_path, on_error="skip")
    assert len(b.test) == 9 and b.skipped == [{"split": "test", "index": 3, "id": "vid3_0", "field": "vision",
                                               "reason": "NaN/inf values"}]
    with pytest.raises(ConfigError, match="data.target"):
        build("mosi", tmp_path, target="regression")
    with pytest.raises(ConfigError, match="data.modalities"):
        build("mosi", tmp_path, modalities="[text,video]")


def test_train_end_to_end(tmp_path, mosi_root):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        rc = main(["train", "--dataset", "mosi", "--data-root", str(mosi_root), "--method", "joint", "--out", str(out),
                   "--quiet", "epochs=2", "model.feature_dim=8", "model.hidden_dim=16", "data.batch_size=8",
                   "train.progress=off", "train.threads=1", "data.modalities=[text,vision]"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["dataset"] == "mosi" and res["modalities"] == ["text", "vision"]
    assert 0.0 <= res["test"]["accuracy"] <= 1.0

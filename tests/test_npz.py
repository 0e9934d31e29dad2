import json

import numpy as np
import pytest

from mmbalance.cli import main
from mmbalance.data.datasets.npz import load_npz
from mmbalance.errors import DataError


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


def good(n=30, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    split = np.array(["train"] * (n * 3 // 5) + ["val"] * (n // 5) + ["test"] * (n - n * 3 // 5 - n // 5))
    return dict(y=y, split=split, x_audio=rng.normal(size=(n, 4, 5)).astype(np.float32),
                x_video=rng.normal(size=(n, 7)).astype(np.float32), x_text=rng.normal(size=(n, 3)))


def test_loads_any_number_of_modalities(tmp_path):
    b = load_npz(write(tmp_path / "d.npz", **good()))
    assert b.modalities == ("audio", "video", "text")
    assert b.num_classes == 3
    assert [len(b.splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert b.input_shapes == {"audio": (4, 5), "video": (7,), "text": (3,)}


def test_val_holdout_when_missing(tmp_path):
    d = good()
    d["split"] = np.array(["train"] * 24 + ["test"] * 6)
    b = load_npz(write(tmp_path / "d.npz", **d))
    assert len(b.val) > 0 and len(b.train) + len(b.val) == 24 and len(b.test) == 6


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("y"), "missing array 'y'"),
    (lambda d: d.pop("split"), "missing array 'split'"),
    (lambda d: [d.pop(k) for k in ("x_audio", "x_video", "x_text")], "no modality arrays"),
    (lambda d: d.update(x_video=d["x_video"][:-1]), "'x_video' has 29 rows but 'y' has 30"),
    (lambda d: d.update(y=np.where(np.arange(30) == 7, -1, d["y"])), "label -1 at index 7"),
    (lambda d: d.update(split=np.where(np.arange(30) == 4, "dev", d["split"])), "unknown value 'dev' at index 4"),
    (lambda d: d["x_audio"].__setitem__((11, 0, 0), np.nan), "'x_audio' has NaN or inf values at index 11"),
    (lambda d: d["x_video"].__setitem__((12, 3), np.inf), "'x_video' has NaN or inf values at index 12"),
    (lambda d: d.update(y=d["y"] + 0.5), "must hold integers; index 0"),
    (lambda d: d.update(split=np.array(["train"] * 24 + ["val"] * 6)), "no rows with split 'test'"),
    (lambda d: d.update(extra=np.zeros(30)), "unexpected arrays"),
])
def test_bad_files_give_clear_errors(tmp_path, mutate, match):
    d = good()
    mutate(d)
    with pytest.raises(DataError, match=match):
        load_npz(write(tmp_path / "bad.npz", **d))


def test_labels_out_of_declared_range(tmp_path):
    from mmbalance.data.datasets.npz import NpzOptions
    with pytest.raises(DataError, match="label 2 at index 2; labels must be in 0..1"):
        load_npz(write(tmp_path / "d.npz", **good()), NpzOptions(num_classes=2))


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_npz("/nonexistent/file.npz")


def test_train_from_cli(tmp_path, capsys):
    path = write(tmp_path / "mine.npz", **good(60))
    out = tmp_path / "run"
    rc = main(["train", "--dataset", str(path), "--method", "joint", "--out", str(out), "--quiet", "epochs=2",
               "model.feature_dim=8", "model.hidden_dim=16"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert set(res["test"]["modalities"]) == {"audio", "video", "text"}
    assert res["dataset"] == "mine.npz"

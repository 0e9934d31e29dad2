import json

import numpy as np
import pytest
import torch

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.data.datasets.npz import NpzOptions, load_npz
from mmbalance.errors import ConfigError, DataError


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
    (lambda d: d.update(x_video=np.zeros((30, 0))), "modality 'video' is zero-width"),
    (lambda d: d.update(y=np.zeros(30, dtype=int)), "num_classes is 1; classification needs at least 2"),
    (lambda d: d.update(y=np.where(np.arange(30) < 18, 0, d["y"])), r"train split has rows of 1 class\(es\) \(present: 0\)"),
    (lambda d: d.update(split=np.arange(30)), "array 'split' must hold strings .*index 0 is"),
    (lambda d: d.update(split=np.array([b"train"] * 29 + [b"\xff"])), r"'split' index 29 holds b'.xff', which is not UTF-8"),
    (lambda d: d.update(split=d["split"].astype(object)), "'split' is an object array.*np.array\\(list_of_str\\)"),
    (lambda d: d.update(class_names=np.array(["a", "b", "c"], dtype=object)), "'class_names' is an object array"),
    (lambda d: d.update(class_names=np.array(["a", "b"])), "label 2 at index 2; labels must be in 0..1"),
])
def test_bad_files_give_clear_errors(tmp_path, mutate, match):
    d = good()
    mutate(d)
    with pytest.raises(DataError, match=match):
        load_npz(write(tmp_path / "bad.npz", **d))


def test_labels_out_of_declared_range(tmp_path):
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


# ------------------------------------------------------------------- strings, class names, extras
@pytest.mark.parametrize("split", [
    np.array([" Train"] * 18 + ["VAL "] * 6 + ["test"] * 6),  # unicode; case and whitespace ignored
    np.array([b"train"] * 18 + [b"val"] * 6 + [b"test"] * 6),  # bytes (e.g. from h5py / Python 2)
    np.array(["train"] * 18 + ["val"] * 6 + ["test"] * 6).astype("S"),
])
def test_split_strings_unicode_or_bytes(tmp_path, split):
    d = good()
    d["split"] = split
    b = load_npz(write(tmp_path / "d.npz", **d))
    assert [len(b.splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]


@pytest.mark.parametrize("names", [np.array(["cat", "dog", "bird"]), np.array([b"cat", b"dog", b"bird"])])
def test_class_names(tmp_path, names):
    b = load_npz(write(tmp_path / "d.npz", **good(), class_names=names))
    assert b.class_names == ["cat", "dog", "bird"] and b.num_classes == 3
    assert load_npz(tmp_path / "d.npz", NpzOptions(num_classes=3)).class_names == ["cat", "dog", "bird"]


def test_class_names_fix_num_classes_and_gaps_warn(tmp_path):
    names = np.array(["cat", "dog", "bird", "fish", "ant"])
    with pytest.warns(UserWarning, match=r"label gap: class\(es\) 3 \('fish'\), 4 \('ant'\)"):
        b = load_npz(write(tmp_path / "d.npz", **good(), class_names=names))
    assert b.num_classes == 5 and b.class_names[4] == "ant"


def test_class_names_disagree_with_num_classes(tmp_path):
    path = write(tmp_path / "d.npz", **good(), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"'class_names' has 3 names but data.num_classes=4"):
        load_npz(path, NpzOptions(num_classes=4))


def test_extra_arrays_ignored_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"d\.npz': ignoring array 'meta'"):
        b = load_npz(write(tmp_path / "d.npz", **good(), meta=np.zeros(3)))
    assert b.modalities == ("audio", "video", "text")


# --------------------------------------------------------------------------------- standardize
def tiny_file(tmp_path, x_val=(0.0, 0.0), x_test=(0.0, 0.0), name="t.npz"):
    """Train rows x=[[1, 10], [3, 10]]: mean [2, 10], std [1, 0 -> 1]; val/test rows are set by the caller."""
    x = np.array([[1, 10], [3, 10], x_val, x_test], dtype=np.float32)
    return write(tmp_path / name, y=np.array([0, 1, 0, 1]), split=np.array(["train", "train", "val", "test"]),
                 x_a=x)


def test_standardize_hand_computed(tmp_path):
    with pytest.warns(UserWarning, match=r"modality 'a' has 1 of 2 feature\(s\) constant"):
        b = load_npz(tiny_file(tmp_path, x_val=(5, 0), x_test=(100, -50)))
    st = b.transform_state["standardize"]["a"]
    assert torch.equal(st["mean"], torch.tensor([2.0, 10.0])) and torch.equal(st["std"], torch.tensor([1.0, 1.0]))
    assert torch.equal(b.train.inputs["a"], torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(b.val.inputs["a"], torch.tensor([[3.0, -10.0]]))
    assert torch.equal(b.test.inputs["a"], torch.tensor([[98.0, -60.0]]))


def test_standardize_ignores_val_and_test_rows(tmp_path):
    with pytest.warns(UserWarning):
        a = load_npz(tiny_file(tmp_path, x_val=(0, 0), x_test=(0, 0), name="a.npz")).transform_state
        b = load_npz(tiny_file(tmp_path, x_val=(1e6, -1e6), x_test=(-1e6, 1e6))).transform_state
    assert all(torch.equal(a["standardize"]["a"][k], b["standardize"]["a"][k]) for k in ("mean", "std"))


def test_standardize_fits_after_val_holdout(tmp_path):
    d = good(60)
    d["split"] = np.array(["train"] * 48 + ["test"] * 12)
    path = write(tmp_path / "d.npz", **d)
    raw = load_npz(path, NpzOptions(standardize="none", val_fraction=0.25))
    b = load_npz(path, NpzOptions(val_fraction=0.25))
    assert len(b.val) == 12 and set(b.transform_state["standardize"]) == {"audio", "video", "text"}
    x = raw.train.inputs["video"].double()
    st = b.transform_state["standardize"]["video"]
    torch.testing.assert_close(st["mean"].double(), x.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st["std"].double(), x.std(0, unbiased=False), rtol=1e-6, atol=1e-6)
    # the held-out val rows are not part of the fit
    x_all = torch.cat([x, raw.val.inputs["video"].double()])
    assert not torch.allclose(st["mean"].double(), x_all.mean(0), rtol=0, atol=1e-4)
    tr = b.train.inputs["video"].double()
    torch.testing.assert_close(tr.mean(0), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(tr.std(0, unbiased=False), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-5)


def test_standardize_sequence_pools_rows_and_time(tmp_path):
    rng = np.random.default_rng(1)
    d = good()
    d["x_audio"] = (rng.normal(size=(30, 4, 5)) * [1, 10, 100, 1000, 1e4] + [0, -5, 50, 1e3, 3e3]).astype(np.float32)
    b = load_npz(write(tmp_path / "d.npz", **d))
    st = b.transform_state["standardize"]["audio"]
    assert st["mean"].shape == (5,) and st["std"].shape == (5,)
    flat = d["x_audio"][:18].reshape(-1, 5).astype(np.float64)  # the 18 train rows, all 4 time steps
    np.testing.assert_allclose(st["mean"].numpy(), flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st["std"].numpy(), flat.std(0), rtol=1e-6)
    np.testing.assert_allclose(b.test.inputs["audio"].numpy(), (d["x_audio"][24:] - st["mean"].numpy()) / st["std"].numpy(),
                               rtol=1e-5, atol=1e-5)


def test_standardize_images_auto_leaves_train_per_channel(tmp_path):
    rng = np.random.default_rng(2)
    d = good()
    d["x_image"] = (rng.uniform(size=(30, 3, 4, 4)) * np.array([1, 50, 255]).reshape(3, 1, 1)).astype(np.float32)
    path = write(tmp_path / "d.npz", **d)
    auto = load_npz(path)
    assert "image" not in auto.transform_state["standardize"] and "video" in auto.transform_state["standardize"]
    assert torch.equal(auto.test.inputs["image"], torch.from_numpy(d["x_image"][24:]))
    tr = load_npz(path, NpzOptions(standardize="train"))
    st = tr.transform_state["standardize"]["image"]
    assert st["mean"].shape == (3, 1, 1)
    x = tr.train.inputs["image"].double()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)


def test_standardize_none_and_determinism(tmp_path):
    d = good()
    path = write(tmp_path / "d.npz", **d)
    b = load_npz(path, NpzOptions(standardize="none"))
    assert b.transform_state == {"standardize": {}}
    assert torch.equal(b.train.inputs["video"], torch.from_numpy(d["x_video"][:18]))
    s1, s2 = load_npz(path).transform_state, load_npz(path).transform_state
    for m in ("audio", "video", "text"):
        assert all(torch.equal(s1["standardize"][m][k], s2["standardize"][m][k]) for k in ("mean", "std"))


def test_standardize_option_on_the_command_line(tmp_path):
    path = str(write(tmp_path / "d.npz", **good()))
    assert resolve_config(path, "joint", overrides=["data.standardize=none"]).data_options.standardize == "none"
    with pytest.raises(ConfigError, match="standardize must be one of auto, none, train, got 'zscore'"):
        resolve_config(path, "joint", overrides=["data.standardize=zscore"])


# -------------------------------------------------------------------------------- acceptance
def raw_and_standardised(n_train=600, n_val=100, n_test=300, k=10, dims=(16, 8), noise=2.0, seed=0):
    """Features in the thousands with offsets ~1e3 and scales 1..1e3; the copy is standardised with
    the train rows' statistics (what a careful user would do by hand)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    y = rng.integers(0, k, n)
    common = dict(y=y, split=np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test),
                  class_names=np.array([f"class{c}" for c in range(k)]))
    raw, std = dict(common), dict(common)
    for j, d in enumerate(dims):
        z = rng.normal(size=(k, d))[y] + noise * rng.normal(size=(n, d))
        x = (rng.uniform(500, 3000, size=d) + 10 ** rng.uniform(0, 3, size=d) * z).astype(np.float32)
        tr = x[:n_train].astype(np.float64)
        raw[f"x_m{j}"], std[f"x_m{j}"] = x, ((x - tr.mean(0)) / tr.std(0)).astype(np.float32)
    return raw, std


def test_raw_thousands_with_auto_match_standardised_copy(tmp_path):
    from mmbalance.training.trainer import Trainer
    raw, std = raw_and_standardised()
    assert np.abs(raw["x_m0"]).mean() > 500
    write(tmp_path / "raw.npz", **raw)
    write(tmp_path / "std.npz", **std)
    base = ["train.epochs=8", "train.threads=1", "train.progress=off"]

    def acc(name, mode):
        cfg = resolve_config(str(tmp_path / name), "joint", overrides=base + [f"data.standardize={mode}"])
        return Trainer(cfg, tmp_path / f"run-{name}-{mode}", quiet=True).fit()["test"]["accuracy"]

    auto, reference, none = acc("raw.npz", "auto"), acc("std.npz", "none"), acc("raw.npz", "none")
    print(f"test accuracy: raw+auto {auto:.4f}, standardised copy {reference:.4f}, raw+none {none:.4f}")
    assert reference > 0.4  # well above chance (0.1): the task is learnable
    assert abs(auto - reference) <= 0.01
    assert none != auto

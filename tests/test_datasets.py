import numpy as np
import pytest
import torch

from mmbalance.data.base import stratified_holdout
from mmbalance.data.datasets.avdigits import AVDigitsOptions, build_avdigits
from mmbalance.data.media import log_spectrogram
from mmbalance.data.datasets.synthetic import SyntheticOptions, build_synthetic, generate
from mmbalance.config import DataConfig


def test_synthetic_is_deterministic_and_shaped():
    o = SyntheticOptions(n_train=50, n_val=20, n_test=30)
    a, b = build_synthetic(o), build_synthetic(o)
    assert a.modalities == ("x1", "x2") and a.num_classes == 5
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [50, 20, 30]
    assert torch.equal(a.train.inputs["x1"], b.train.inputs["x1"])
    c = build_synthetic(SyntheticOptions(n_train=50, n_val=20, n_test=30, data_seed=1))
    assert not torch.equal(a.train.inputs["x1"], c.train.inputs["x1"])


def test_synthetic_patterns_follow_fractions():
    o = SyntheticOptions(n_train=20000, n_val=1, n_test=1, num_modalities=3, shared=0.2, unique=[0.5, 0.2, 0.1],
                         noise=[0.5, 0.5, 0.5])
    _, _, pattern = generate(o)
    frac = np.bincount(pattern, minlength=5) / len(pattern)
    assert frac == pytest.approx([0.2, 0.5, 0.2, 0.1, 0.0], abs=0.015)


def test_synthetic_information_pattern_is_real():
    """A modality carries the label only where the pattern says so: per-class means of the
    uninformative rows do not separate the classes."""
    o = SyntheticOptions(n_train=6000, n_val=1, n_test=1, noise=[0.3, 0.3])
    x, y, pattern = generate(o)
    unique2 = pattern == 2  # only x2 informative
    for m, informative in (("x1", False), ("x2", True)):
        rows = x[m][unique2]
        means = np.stack([rows[y[unique2] == c].mean(0) for c in range(5)])
        spread = np.linalg.norm(means - means.mean(0), axis=1).mean()
        assert (spread > 2.0) == informative, (m, spread)


def test_stratified_holdout():
    y = np.array([0] * 10 + [1] * 20 + [2])
    keep, held = stratified_holdout(y, 0.2, seed=0)
    assert set(keep) | set(held) == set(range(31)) and not set(keep) & set(held)
    assert np.bincount(y[held], minlength=3).tolist() == [2, 4, 0]
    again = stratified_holdout(y, 0.2, seed=0)
    assert np.array_equal(held, again[1])


def test_log_spectrogram_matches_numpy():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    s = log_spectrogram(x, 128, 64).numpy()
    xp = np.pad(x.numpy(), 64, mode="reflect")
    win = np.hanning(129)[:-1]  # periodic Hann
    frames = np.stack([xp[i * 64:i * 64 + 128] * win for i in range(1 + 1000 // 64)], 1)
    ref = np.log(np.abs(np.fft.rfft(frames, axis=0)) + 1e-7)
    assert s.shape == ref.shape == (65, 16)
    assert np.allclose(s, ref, atol=1e-3)


@pytest.mark.realdata
def test_avdigits_real_data(shared_data):
    b = build_avdigits(AVDigitsOptions(), DataConfig(root=str(shared_data)))
    assert b.modalities == ("audio", "image") and b.num_classes == 10
    assert len(b.test) == 300 and len(b.train) + len(b.val) == 2700
    assert b.input_shapes == {"audio": (1, 65, 126), "image": (1, 28, 28)}
    assert np.bincount(b.test.labels).tolist() == [30] * 10
    s = b.test[0]
    assert s["inputs"]["image"].max() <= 1.0 and torch.isfinite(s["inputs"]["audio"]).all()
    noisy = build_avdigits(AVDigitsOptions(image_noise=0.5), DataConfig(root=str(shared_data)))
    d = (noisy.test[0]["inputs"]["image"] - s["inputs"]["image"]).std()
    assert 0.4 < float(d) < 0.6


def test_avdigits_missing_root_is_clear(tmp_path):
    from mmbalance.errors import DataError
    with pytest.raises(DataError, match="must hold fsdd/recordings"):
        build_avdigits(AVDigitsOptions(), DataConfig(root=str(tmp_path)))


@pytest.mark.realdata
@pytest.mark.slow
def test_avdigits_trains_end_to_end(shared_data, tmp_path):
    """Real WAV + PNG files through the whole pipeline. With the default small CNNs the image
    modality is learned first and dominates: the audio head lags far behind the image head."""
    import json
    from mmbalance.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "avdigits", "--data-root", str(shared_data), "--method", "multiloss",
               "--out", str(out), "--quiet", "epochs=2", "model.feature_dim=32"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())["test"]
    assert res["accuracy"] > 0.5
    heads = {m: res["modalities"][m]["head_accuracy"] for m in ("audio", "image")}
    assert heads["image"] > 0.4 and heads["audio"] < heads["image"] - 0.2


@pytest.mark.slow
def test_synthetic_default_shows_modality_imbalance(tmp_path):
    """The README's main job teaches the problem (issue 10): under joint training the weak modality
    x2's zero-out accuracy stays clearly below what x2 reaches when trained alone, the averaged
    unimodal models beat the jointly trained one, and a balancing method (MLA) brings x2 back."""
    from mmbalance.config import resolve_config
    from mmbalance.data.batch import collate
    from mmbalance.training.trainer import Trainer
    res, probs = {}, {}
    for name, method, over in (("joint", "joint", []), ("mla", "mla", []),
                               ("uni_x2", "unimodal", ["method.modality=x2"]),
                               ("uni_x1", "unimodal", ["method.modality=x1"])):
        tr = Trainer(resolve_config("synthetic", method, None, over + ["train.progress=off"]), tmp_path / name,
                     quiet=True)
        res[name] = tr.fit()["test"]
        if method == "unimodal":
            ds = tr.data.splits["test"]
            batch = collate([ds[i] for i in range(len(ds))])
            with torch.no_grad():
                probs[name] = tr.method.predict(tr.model.eval(), batch).logits.softmax(1)
            labels = batch.labels
    joint_x2 = res["joint"]["modalities"]["x2"]["zero_out_accuracy"]
    assert joint_x2 < res["uni_x2"]["accuracy"] - 0.05
    ensemble = float(((probs["uni_x1"] + probs["uni_x2"]) / 2).argmax(1).eq(labels).double().mean())
    assert ensemble > res["joint"]["accuracy"]
    assert res["mla"]["modalities"]["x2"]["zero_out_accuracy"] > joint_x2 + 0.04

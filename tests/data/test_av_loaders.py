"""Audio-visual loaders on tiny fixtures written in each dataset's community layout."""
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmbalance.data import build_dataset
from mmbalance.data.datasets.av import (AVEOptions, CremaDOptions, KineticsSoundsOptions, UCF101Options,
                                        VGGSoundOptions)
from mmbalance.errors import DataError

EMOS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def cfg(root, **kw):
    return SimpleNamespace(root=str(root), on_error=kw.pop("on_error", "raise"), cache=kw.pop("cache", None))


def write_jpg(path: Path, value: int, size=(20, 28), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[0], size[1], 3) if mode == "RGB" else size
    arr = np.clip(value * 7 % 200 + rng.integers(0, 50, shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode).save(path, quality=90)


def write_wav(path: Path, seconds=0.5, sr=16000, freq=300.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")


def make_cremad(root: Path, layout="ogm", n_train=3, n_test=1, n_frames=3, bom=True):
    """C-OGM layout (train.csv/test.csv, AudioWAV/*.wav, Image-01-FPS/<clip>/NNNNN.jpg) or GeWu
    (visual/<clip>/frame_NNNNN.jpg, audio/<clip>.npy fbank)."""
    rows = {"train": [], "test": []}
    k = 0
    for e, emo in enumerate(EMOS):
        for j in range(n_train + n_test):
            clip = f"10{k:02d}_DFA_{emo}_XX"
            k += 1
            rows["train" if j < n_train else "test"].append(f"{clip},{emo}")
            if layout == "ogm":
                write_wav(root / "AudioWAV" / f"{clip}.wav", 0.4, 16000, 200 + 50 * e)
                for f in range(n_frames):
                    write_jpg(root / "Image-01-FPS" / clip / f"{f * 30:05d}.jpg", k + f)
            else:
                (root / "audio").mkdir(parents=True, exist_ok=True)
                np.save(root / "audio" / f"{clip}.npy", np.full((16, 8), float(e), np.float32))
                for f in range(n_frames):
                    write_jpg(root / "visual" / clip / f"frame_{f + 1:05d}.jpg", k + f)
    for s, r in rows.items():
        (root / f"{s}.csv").write_text(("\ufeff" if bom else "") + "\n".join(r) + "\n", encoding="utf-8")
    return rows


def small(cls, **kw):
    return cls(image_size=16, **kw)


def test_cremad_ogm_layout(tmp_path):
    make_cremad(tmp_path)
    b = build_dataset("cremad", small(CremaDOptions), cfg(tmp_path), 0)
    assert b.modalities == ("audio", "visual") and b.num_classes == 6
    assert len(b.train) + len(b.val) == 18 and len(b.test) == 6 and len(b.val) == 6
    assert b.input_shapes == {"audio": (1, 257, 188), "visual": (2, 3, 16, 16)}
    assert b.encoder_hints == {"audio": "resnet18", "visual": "resnet18"}
    s = b.test[0]
    assert s["inputs"]["audio"].shape == (1, 257, 188) and s["inputs"]["visual"].shape == (2, 3, 16, 16)
    assert b.class_names == EMOS
    names = [b.test.clip_name(i) for i in range(len(b.test))]
    assert [EMOS[y] for y in b.test.labels] == [n.split("_")[2] for n in names]
    # eval is deterministic; train is random
    assert torch.equal(b.test[1]["inputs"]["visual"], b.test[1]["inputs"]["visual"])
    assert torch.equal(b.train_eval[0]["inputs"]["visual"], b.train_eval[0]["inputs"]["visual"])
    b2 = build_dataset("cremad", small(CremaDOptions, class_order="sorted"), cfg(tmp_path), 0)
    assert b2.class_names == sorted(EMOS)
    assert [sorted(EMOS)[y] for y in b2.test.labels] == [EMOS[y] for y in b.test.labels]


def test_cremad_gewu_layout_and_val_list(tmp_path):
    rows = make_cremad(tmp_path, layout="gewu", bom=False)
    (tmp_path / "val.csv").write_text("\n".join(rows["train"][:6]))
    b = build_dataset("cremad", small(CremaDOptions, val_list="val.csv"), cfg(tmp_path), 0)
    assert len(b.val) == 6 and len(b.train) == 18
    x = b.val[0]["inputs"]
    assert x["audio"].shape == (1, 16, 8) and x["visual"].shape == (2, 3, 16, 16)


def test_kinetics_sounds_ogm_lists(tmp_path):
    clips = [f"clip{i:02d}_000010_000020" for i in range(8)]
    (tmp_path / "my_train.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips[:6])))
    (tmp_path / "my_test.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips[6:])))
    for i, c in enumerate(clips):
        (tmp_path / "audio").mkdir(exist_ok=True)
        np.save(tmp_path / "audio" / f"{c}.npy", np.zeros((32, 128), np.float32) + i)
        for f in range(4):
            write_jpg(tmp_path / "visual" / "train_imgs" / c / f"frame_{f:05d}.jpg", i + f)
    b = build_dataset("kinetics_sounds", small(KineticsSoundsOptions), cfg(tmp_path), 0)
    assert b.num_classes == 31 and len(b.test) == 2 and len(b.train) + len(b.val) == 6
    assert b.input_shapes == {"audio": (1, 32, 128), "visual": (3, 3, 16, 16)}
    assert b.train[0]["inputs"]["visual"].shape == (3, 3, 16, 16)


def test_kinetics_sounds_gewu_lists_and_wav_fbank(tmp_path):
    clips = [f"v{i}" for i in range(6)]
    for s, cs in (("train", clips[:4]), ("val", clips[4:5]), ("test", clips[5:])):
        (tmp_path / f"{s}_1fps_path.txt").write_text("".join(f"/x/{s}/{c} 10 {i % 2}\n" for i, c in enumerate(cs)))
    for i, c in enumerate(clips):
        write_wav(tmp_path / "audio" / f"{c}.wav", 0.3)
        for f in range(3):
            write_jpg(tmp_path / "visual" / c / f"frame_{f + 1:05d}.jpg", i)
    b = build_dataset("kinetics_sounds", small(KineticsSoundsOptions), cfg(tmp_path), 0)
    assert (len(b.train), len(b.val), len(b.test)) == (4, 1, 1)
    assert b.input_shapes["audio"] == (1, 1024, 128)


def test_ave_official_split(tmp_path):
    from mmbalance.data.datasets.av import AVE_MCR_ORDER
    cats = AVE_MCR_ORDER[:2]
    splits = {"trainSet.txt": 4, "valSet.txt": 2, "testSet.txt": 2}
    k = 0
    for fn, n in splits.items():
        lines = []
        for j in range(n):
            vid = f"vid{k}"
            lines.append(f"{cats[j % 2]}&{vid}&good&{j}&{j + 5}")
            (tmp_path / "Audio-1004-SE").mkdir(exist_ok=True)
            with open(tmp_path / "Audio-1004-SE" / f"{vid}.pkl", "wb") as fh:
                pickle.dump(np.full((257, 20), k, np.float32), fh)
            for f in range(5):
                write_jpg(tmp_path / "Image-01-FPS-SE" / vid / f"{f:05d}.jpg", k)
            k += 1
        if fn == "trainSet.txt":
            lines.append(lines[0])  # a repeated video id is de-duplicated
        (tmp_path / fn).write_text("\n".join(lines))
    b = build_dataset("ave", small(AVEOptions), cfg(tmp_path), 0)
    assert (len(b.train), len(b.val), len(b.test)) == (4, 2, 2) and b.num_classes == 28
    assert b.input_shapes == {"audio": (1, 257, 20), "visual": (4, 3, 16, 16)}
    assert list(b.test.labels) == [0, 1]


def test_ave_wav_event_segment(tmp_path):
    for fn, vid in (("trainSet.txt", "a"), ("testSet.txt", "b")):
        (tmp_path / fn).write_text(f"Bark&{vid}&good&1&3\n")
        write_wav(tmp_path / "audio" / f"{vid}.wav", 4.0)
        for f in range(4):
            write_jpg(tmp_path / "visual" / vid / f"{f:05d}.jpg", f)
    b = build_dataset("ave", small(AVEOptions), cfg(tmp_path), 0)
    assert b.input_shapes["audio"] == (1, 257, 1004)


def make_ucf(root: Path, n_rgb=6, n_flow=6):
    classes = ["ApplyEyeMakeup", "Archery"]
    (root / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    tr, te = [], []
    for ci, c in enumerate(classes):
        for g in range(3):
            v = f"v_{c}_g{g:02d}_c01"
            (tr if g < 2 else te).append(f"{c}/{v}.avi" + (f" {ci + 1}" if g < 2 else ""))
            for f in range(n_rgb):
                write_jpg(root / "rgb" / v / f"frame_{f + 1:05d}.jpg", g + f)
            for f in range(n_flow):
                for d in "uv":
                    write_jpg(root / "tvl1_flow" / d / v / f"frame{f + 1:06d}.jpg", f, mode="L")
    (root / "trainlist01.txt").write_text("\n".join(tr))
    (root / "testlist01.txt").write_text("\n".join(te))


def test_ucf101_rgb_flow(tmp_path):
    make_ucf(tmp_path)
    b = build_dataset("ucf101", small(UCF101Options), cfg(tmp_path), 0)
    assert b.modalities == ("visual", "flow") and b.num_classes == 2
    assert b.input_shapes == {"visual": (3, 3, 16, 16), "flow": (3, 2, 16, 16)}
    assert (len(b.train), len(b.val), len(b.test)) == (2, 2, 2)
    x = b.train[0]["inputs"]
    assert x["flow"].shape == (3, 2, 16, 16) and x["flow"].min() >= 0 and x["flow"].max() <= 1
    assert list(b.test.labels) == [0, 1]


def test_vggsound_csv(tmp_path):
    rows = []
    for i in range(6):
        yt, st = f"yt{i}", i * 10
        rows.append(f"{yt},{st},{'dog barking' if i % 2 else 'cat purring'},{'test' if i >= 4 else 'train'}")
        write_wav(tmp_path / "audio" / f"{yt}_{st:06d}.wav", 0.2)
        for f in range(3):
            write_jpg(tmp_path / "visual" / f"{yt}_{st:06d}" / f"frame_{f:05d}.jpg", f)
    (tmp_path / "vggsound.csv").write_text("\n".join(rows))
    b = build_dataset("vggsound", small(VGGSoundOptions), cfg(tmp_path), 0)
    assert b.class_names == ["cat purring", "dog barking"] and len(b.test) == 2
    assert b.input_shapes == {"audio": (1, 257, 454), "visual": (3, 3, 16, 16)}


# ----------------------------------------------------------------------------------------- bad input

def _broken_cremad(root):
    rows = make_cremad(root, n_train=3, n_test=1)
    clips = [r.split(",")[0] for r in rows["train"]]
    import shutil
    shutil.rmtree(root / "Image-01-FPS" / clips[0])  # missing frame folder
    for p in list((root / "Image-01-FPS" / clips[1]).iterdir())[1:]:
        p.unlink()  # 1 frame < T=2
    wav = root / "AudioWAV" / f"{clips[2]}.wav"
    wav.write_bytes(wav.read_bytes()[:2000])  # truncated
    with open(root / "train.csv", "a") as f:
        f.write("9999_XXX_ANG_XX,ANG\n")  # names a missing clip
        f.write(f"{clips[3]},BORED\n")  # label outside the class list
    return clips


def test_bad_inputs_raise(tmp_path):
    clips = _broken_cremad(tmp_path)
    with pytest.raises(DataError) as ei:
        build_dataset("cremad", small(CremaDOptions), cfg(tmp_path), 0)
    msg = str(ei.value)
    assert "5 bad sample" in msg
    for c in clips[:4] + ["9999_XXX_ANG_XX"]:
        assert c in msg
    assert "does not" in msg or "no visual" in msg
    assert "fewer than the 2" in msg and "truncated" in msg and "BORED" in msg and "no audio file" in msg


def test_bad_inputs_skip(tmp_path):
    clips = _broken_cremad(tmp_path)
    b = build_dataset("cremad", small(CremaDOptions), cfg(tmp_path, on_error="skip"), 0)
    assert len(b.skipped) == 5
    assert {s["clip"] for s in b.skipped} == set(clips[:4]) | {"9999_XXX_ANG_XX"}
    assert len(b.train) + len(b.val) == 18 - 3  # clips[3]'s valid row stays
    for s in b.skipped:
        assert s["split"] == "train" and s["reason"]


def test_corrupt_jpeg_runtime_and_verify(tmp_path):
    rows = make_cremad(tmp_path)
    clip = rows["test"][0].split(",")[0]
    for p in (tmp_path / "Image-01-FPS" / clip).iterdir():
        p.write_bytes(b"\xff\xd8\xffnot a jpeg")
    b = build_dataset("cremad", small(CremaDOptions), cfg(tmp_path), 0)
    i = [b.test.clip_name(k) for k in range(len(b.test))].index(clip)
    with pytest.raises(DataError, match=clip):
        b.test[i]
    b = build_dataset("cremad", small(CremaDOptions, verify="full"), cfg(tmp_path, on_error="skip"), 0)
    assert [s["clip"] for s in b.skipped] == [clip] and len(b.test) == 5


def test_missing_split_file_and_root(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        build_dataset("cremad", small(CremaDOptions), cfg(tmp_path / "nope"), 0)
    with pytest.raises(DataError, match="train.csv"):
        build_dataset("cremad", small(CremaDOptions), cfg(tmp_path), 0)


@pytest.mark.slow
def test_cremad_trains_from_the_cli_with_the_cache(tmp_path):
    """`mmbalance train --dataset cremad --data-root DIR --method bmm` on the GeWu layout (small .npy
    audio features keep the ResNet-18 cheap); the second run reads the filled input cache and gives
    the same result."""
    import json
    from mmbalance.cli import main
    make_cremad(tmp_path / "data", layout="gewu")
    args = ["train", "--dataset", "cremad", "--data-root", str(tmp_path / "data"), "--method", "bmm", "--quiet",
            "epochs=2", "method.warmup_epochs=1", "data.image_size=16", "model.small_input=true",
            "data.batch_size=6", f"data.cache={tmp_path / 'cache'}"]
    assert main(args + ["--out", str(tmp_path / "r1")]) == 0
    assert main(args + ["--out", str(tmp_path / "r2")]) == 0
    r1, r2 = (json.loads((tmp_path / r / "result.json").read_text()) for r in ("r1", "r2"))
    assert r1["test"] == r2["test"]
    assert set(r1["test"]["modalities"]) == {"audio", "visual"}
    assert any((tmp_path / "cache").rglob("*"))

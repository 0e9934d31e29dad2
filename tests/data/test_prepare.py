"""`mmbalance prepare`: real mp4 files encoded here with PyAV -> frames + WAV + split files."""
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from mmbalance.cli import main
from mmbalance.data.prepare import PrepareOptions, prepare
from mmbalance.errors import MMBalanceError


def write_video(path: Path, seconds: float = 3.0, fps: int = 10, audio_rate: int = 22050, audio: bool = True,
                colour=(200, 30, 30)):
    """A tiny real video: solid-colour frames (mpeg4) and, optionally, a 440 Hz tone (aac)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "matroska" if path.suffix in (".mkv", ".flv") else None
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 32, 24, "yuv420p"
        a_s = None
        if audio:
            a_s = c.add_stream("aac", rate=audio_rate)
            a_s.layout = "mono"
        n = int(seconds * fps)
        for i in range(n):
            img = np.zeros((24, 32, 3), dtype=np.uint8)
            img[:] = colour
            img[:, : (i % 32)] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for pkt in vs.encode(frame):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if a_s is not None:
            t = np.arange(int(seconds * audio_rate)) / audio_rate
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            step, pts = 1024, 0
            for s in range(0, len(wave), step):
                chunk = wave[s:s + step][None, :]
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = audio_rate, pts, Fraction(1, audio_rate)
                pts += chunk.shape[1]
                for pkt in a_s.encode(af):
                    c.mux(pkt)
            for pkt in a_s.encode():
                c.mux(pkt)


@pytest.fixture(scope="module")
def cremad_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("cremad_raw")
    clips = ["1001_DFA_ANG_XX", "1002_DFA_ANG_XX", "1001_IEO_HAP_LO", "1002_IEO_HAP_LO", "1003_IEO_NEU_XX",
             "1004_IEO_NEU_XX"]
    for i, c in enumerate(clips):
        write_video(root / "VideoFlash" / f"{c}.mp4", seconds=3.0 if i else 2.5, colour=(40 * i, 100, 50))
    (root / "VideoFlash" / "1005_DFA_SAD_XX.flv").write_bytes(b"this is not a video" * 100)  # corrupt
    return root


def test_cremad_frames_audio_splits_resume_and_corrupt(cremad_raw, tmp_path):
    dst = tmp_path / "cremad"
    rep = prepare(PrepareOptions("cremad", str(cremad_raw), str(dst), workers=2, progress=False))
    assert rep["clips"] == 7 and rep["done"] == 6
    assert [f["clip"] for f in rep["failed"]] == ["1005_DFA_SAD_XX"]
    assert "1005_DFA_SAD_XX" in (dst / "failed.txt").read_text()
    # frames: 1 fps, named by original frame index (10 fps video -> 00000, 00010, 00020)
    frames = sorted(p.name for p in (dst / "Image-01-FPS" / "1002_DFA_ANG_XX").iterdir())
    assert frames == ["00000.jpg", "00010.jpg", "00020.jpg"]
    assert len(list((dst / "Image-01-FPS" / "1001_DFA_ANG_XX").iterdir())) == 3  # 2.5 s -> t = 0, 1, 2
    from PIL import Image
    with Image.open(dst / "Image-01-FPS" / "1002_DFA_ANG_XX" / "00010.jpg") as im:
        assert im.size == (32, 24) and im.format == "JPEG"
    # audio: mono 16 kHz WAV of about the clip's duration
    info = sf.info(str(dst / "AudioWAV" / "1002_DFA_ANG_XX.wav"))
    assert info.samplerate == 16000 and info.channels == 1
    assert abs(info.duration - 3.0) < 0.2
    x, _ = sf.read(str(dst / "AudioWAV" / "1002_DFA_ANG_XX.wav"))
    assert np.abs(x).max() > 0.1  # the tone survived
    # splits: clip,EMO, every done clip exactly once, labels from the 3rd field
    rows = [l.split(",") for s in ("train", "test") for l in (dst / f"{s}.csv").read_text().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(["1001_DFA_ANG_XX", "1002_DFA_ANG_XX", "1001_IEO_HAP_LO",
                                                 "1002_IEO_HAP_LO", "1003_IEO_NEU_XX", "1004_IEO_NEU_XX"])
    assert all(r[1] == r[0].split("_")[2] for r in rows)
    assert rep["splits"] == {"train": 3, "test": 3}  # one test clip per class (2 each)
    assert (dst / "stat.csv").read_text().split() == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    report = json.loads((dst / "report.json").read_text())
    assert report["done"] == 6 and len(report["failed"]) == 1

    # resumable: the second run processes only the (still) failing clip
    mtime = (dst / "AudioWAV" / "1002_DFA_ANG_XX.wav").stat().st_mtime_ns
    train_rows = (dst / "train.csv").read_text()
    rep2 = prepare(PrepareOptions("cremad", str(cremad_raw), str(dst), workers=1, progress=False))
    assert rep2["skipped_already_done"] == 6 and rep2["processed"] == 1 and rep2["done"] == 6
    assert (dst / "AudioWAV" / "1002_DFA_ANG_XX.wav").stat().st_mtime_ns == mtime
    assert (dst / "train.csv").read_text() == train_rows  # same seeded split


def test_cremad_uses_shipped_wav_and_given_split(tmp_path):
    raw = tmp_path / "raw"
    write_video(raw / "VideoFlash" / "1001_DFA_ANG_XX.flv", seconds=2.0, audio=False)
    write_video(raw / "VideoFlash" / "1001_DFA_HAP_XX.flv", seconds=2.0, audio=False)
    (raw / "AudioWAV").mkdir()
    t = np.arange(44100) / 44100.0
    sf.write(str(raw / "AudioWAV" / "1001_DFA_ANG_XX.wav"), 0.5 * np.sin(2 * np.pi * 300 * t), 44100)
    splits = tmp_path / "lists"
    splits.mkdir()
    (splits / "train.csv").write_text("\ufeff1001_DFA_HAP_XX,HAP\n")
    (splits / "test.csv").write_text("1001_DFA_ANG_XX,ANG\n")
    dst = tmp_path / "out"
    rep = prepare(PrepareOptions("cremad", str(raw), str(dst), splits=str(splits), progress=False))
    assert rep["done"] == 2 and rep["no_audio"] == ["1001_DFA_HAP_XX"]
    info = sf.info(str(dst / "AudioWAV" / "1001_DFA_ANG_XX.wav"))
    assert info.samplerate == 16000 and abs(info.duration - 1.0) < 0.01
    assert (dst / "train.csv").read_text() == "1001_DFA_HAP_XX,HAP\n"
    assert (dst / "test.csv").read_text() == "1001_DFA_ANG_XX,ANG\n"


def test_generic_layout_from_folders_and_labels_csv(tmp_path):
    raw = tmp_path / "raw"
    for cls in ("playing drums", "dog"):
        for k in range(2):
            write_video(raw / cls / f"{cls[:3]}_{k}.mp4", seconds=2.0, audio=(cls == "dog"))
    dst = tmp_path / "ks"
    rc = main(["prepare", "kinetics_sounds", "--src", str(raw), "--dst", str(dst), "--workers", "1", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in (dst / "visual" / "dog_0").iterdir()) == ["frame_00001.jpg", "frame_00002.jpg"]
    assert sf.info(str(dst / "audio" / "dog_0.wav")).samplerate == 16000
    assert not (dst / "audio" / "pla_0.wav").exists()  # no audio stream: reported, not failed
    rep = json.loads((dst / "report.json").read_text())
    assert rep["failed"] == [] and rep["no_audio"] == ["pla_0", "pla_1"]
    rows = [l.split(" ", 1) for s in ("train", "test") for l in (dst / f"{s}.txt").read_text().splitlines()]
    assert sorted(rows) == [["dog_0", "0"], ["dog_1", "0"], ["pla_0", "1"], ["pla_1", "1"]]
    assert (dst / "classes.txt").read_text().splitlines() == ["dog", "playing drums"]

    # labels csv with explicit splits; a clip without a label is reported
    labels = tmp_path / "labels.csv"
    labels.write_text("clip,label,split\ndog_0,barking,train\ndog_1,barking,test\npla_0,drums,train\n")
    dst2 = tmp_path / "gen"
    rep2 = prepare(PrepareOptions("generic", str(raw), str(dst2), labels=str(labels), audio=False, progress=False))
    assert rep2["done"] == 3 and [f["clip"] for f in rep2["failed"]] == ["pla_1"]
    assert (dst2 / "train.txt").read_text() == "dog_0 0\npla_0 1\n"
    assert (dst2 / "test.txt").read_text() == "dog_1 0\n"
    assert (dst2 / "classes.txt").read_text() == "barking\ndrums\n"
    assert not (dst2 / "audio").exists()


def test_prepare_bad_arguments(tmp_path):
    with pytest.raises(MMBalanceError, match="unknown dataset 'cremd'"):
        prepare(PrepareOptions("cremd", str(tmp_path), str(tmp_path / "o")))
    with pytest.raises(MMBalanceError, match="no videos"):
        prepare(PrepareOptions("generic", str(tmp_path), str(tmp_path / "o")))
    with pytest.raises(MMBalanceError, match="is not a folder"):
        prepare(PrepareOptions("generic", str(tmp_path / "missing"), str(tmp_path / "o")))
    assert main(["prepare", "generic", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "o")]) == 2

"""Media transforms and audio features against independent numpy/scipy references."""
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from scipy.signal import get_window

from mmbalance.data import media
from mmbalance.data.frames import frame_number, list_frames, segment_indices
from mmbalance.errors import DataError


def test_image_ops(tmp_path):
    arr = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = media.load_image(tmp_path / "a.png")
    assert x.shape == (3, 30, 40) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert media.resize(x, 16).shape == (3, 16, 16)
    assert media.resize(x, (10, 12)).shape == (3, 10, 12)
    assert media.resize_short_side(x, 15).shape == (3, 15, 20)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = media.random_resized_crop(x, 8, g1), media.random_resized_crop(x, 8, g2)
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    assert torch.equal(media.hflip(x)[..., 0], x[..., -1])
    n = media.normalize_imagenet(torch.ones(3, 2, 2))
    assert torch.allclose(n[:, 0, 0], (1 - torch.tensor(media.IMAGENET_MEAN)) / torch.tensor(media.IMAGENET_STD))
    u8 = media.load_image_uint8(tmp_path / "a.png", 12)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 12, 12)
    assert media.load_image_uint8(tmp_path / "a.png", 12, "L").shape == (1, 12, 12)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="bad.jpg"):
        media.load_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="does not exist"):
        media.load_image(tmp_path / "nope.jpg")


def _np_librosa_stft_log(x, n_fft, hop):
    pad = n_fft // 2
    xp = np.pad(x, pad, mode="reflect")
    n = 1 + (len(xp) - n_fft) // hop
    win = get_window("hann", n_fft, fftbins=True)
    frames = np.stack([xp[i * hop:i * hop + n_fft] * win for i in range(n)], axis=1)
    return np.log(np.abs(np.fft.rfft(frames, axis=0)) + 1e-7)


def test_cremad_spectrogram_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(30000) * 0.3).astype(np.float32)
    s = media.cremad_spectrogram(torch.from_numpy(x))
    assert s.shape == (257, 188)
    ref = _np_librosa_stft_log(np.clip(np.tile(x, 3)[:66150], -1, 1).astype(np.float64), 512, 353)
    assert ref.shape == (257, 188)
    assert np.abs(s.numpy() - ref).max() < 1e-3


def _np_kaldi_fbank(x, sr=16000, bins=128):
    """Independent numpy Kaldi fbank (htk_compat, no energy, hanning, dither 0, snip edges)."""
    win, shift, nfft = 400, 160, 512
    n = 1 + (len(x) - win) // shift
    hz2mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    lo, hi = hz2mel(20.0), hz2mel(sr / 2)
    centers = lo + (hi - lo) * np.arange(bins + 2) / (bins + 1)
    fft_mel = hz2mel(np.arange(nfft // 2 + 1) * sr / nfft)
    fb = np.zeros((bins, nfft // 2 + 1))
    for m in range(bins):
        l, c, r = centers[m], centers[m + 1], centers[m + 2]
        for k in range(nfft // 2):  # Nyquist bin excluded as in Kaldi
            v = fft_mel[k]
            if l < v < r:
                fb[m, k] = (v - l) / (c - l) if v <= c else (r - v) / (r - c)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    out = np.zeros((n, bins))
    for i in range(n):
        f = x[i * shift:i * shift + win].astype(np.float64)
        f = f - f.mean()
        f = np.concatenate([[f[0] - 0.97 * f[0]], f[1:] - 0.97 * f[:-1]])
        p = np.abs(np.fft.rfft(f * window, nfft)) ** 2
        out[i] = np.log(np.maximum(fb @ p, np.finfo(np.float32).eps))
    return out


def test_kaldi_fbank_matches_numpy_reference():
    rng = np.random.default_rng(2)
    t = np.arange(8000) / 16000
    x = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(8000)).astype(np.float32)
    got = media.kaldi_fbank(torch.from_numpy(x)).numpy()
    ref = _np_kaldi_fbank(x)
    assert got.shape == ref.shape == (48, 128)
    assert np.abs(got - ref).max() < 2e-3
    full = media.audioset_fbank(torch.from_numpy(x))
    assert full.shape == (1024, 128)
    assert torch.allclose(full[48:], torch.full((976, 128), -media.FBANK_MEAN / (2 * media.FBANK_STD)))  # zero padding, normalised


def test_read_audio_resample_and_errors(tmp_path):
    sr = 16000
    t = np.arange(sr) / sr
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, sr, subtype="PCM_16")
    w, r = media.read_audio(tmp_path / "a.wav")
    assert r == sr and w.shape == (sr,) and abs(float(w.abs().max()) - 0.5) < 1e-3
    w2, r2 = media.read_audio(tmp_path / "a.wav", 22050)
    assert r2 == 22050 and abs(w2.numel() - 22050) <= 1
    spec = np.abs(np.fft.rfft(w2.numpy()))
    assert abs(np.argmax(spec) * 22050 / w2.numel() - 1000) < 5
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="t.wav.*truncated"):
        media.read_audio(tmp_path / "t.wav")
    (tmp_path / "n.wav").write_bytes(b"hello world, not audio")
    with pytest.raises(DataError, match="n.wav"):
        media.read_audio(tmp_path / "n.wav")


def test_frames_listing_and_segments(tmp_path):
    for scheme in ["{:05d}.jpg", "frame_{:05d}.jpg", "frame{:06d}.jpg"]:
        d = tmp_path / str(len(scheme)) / "c"; d.parent.mkdir()
        d.mkdir()
        for k in [10, 2, 1, 0, 9]:
            (d / scheme.format(k)).write_bytes(b"x")
        assert [frame_number(p.name) for p in list_frames(d)] == [0, 1, 2, 9, 10]
    with pytest.raises(DataError, match="does not exist"):
        list_frames(tmp_path / "missing")
    assert segment_indices(10, 3, train=False) == [1, 4, 7]
    assert segment_indices(10, 3, train=False) == segment_indices(10, 3, train=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = segment_indices(10, 3, train=True, generator=g)
        assert 0 <= idx[0] < 3 <= idx[1] < 6 <= idx[2] < 10
    with pytest.raises(DataError, match="2 frame"):
        segment_indices(2, 3, train=False)
    assert segment_indices(2, 3, train=False, pad=True) == [0, 0, 1]

"""Media decoding and transforms in plain torch/numpy (no torchvision/torchaudio).

Images are float tensors ``[C, H, W]`` in ``[0, 1]`` (or ``[..., C, H, W]`` batches where noted);
waveforms are 1-D float32 tensors in ``[-1, 1]``. Every decode failure raises :class:`DataError`
naming the file and what was wrong.

Image transforms (torchvision semantics):
  * :func:`load_image` -- JPEG/PNG -> ``[3, H, W]`` float in [0, 1] (grey/RGBA converted to RGB).
  * :func:`load_image_uint8` -- decode and (optionally) resize with PIL bilinear -> ``[3, S, S]`` uint8
    (what ``Resize((S, S))`` on a PIL image gives; also what the input cache stores).
  * :func:`resize` -- ``Resize((h, w))`` (an int means a square ``size x size``), bilinear, antialiased.
  * :func:`resize_short_side` -- ``Resize(int)``: short side to ``size``, aspect kept.
  * :func:`random_resized_crop` -- ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``.
  * :func:`hflip`, :func:`normalize_imagenet` (mean 0.485/0.456/0.406, std 0.229/0.224/0.225).

Audio:
  * :func:`read_audio` -- wav/flac/ogg (soundfile, scipy fallback) or any container PyAV reads ->
    mono ``(wave, sr)``; resampled to ``sr`` if given.
  * :func:`resample` -- polyphase resampling (``scipy.signal.resample_poly``).
  * :func:`log_spectrogram` -- ``log(|STFT| + 1e-7)`` as librosa.stft (centred, Hann) computes it;
    :func:`cremad_spectrogram` the C-OGM/MCR CREMA-D recipe (22,050 Hz, tiled to 3 s, n_fft 512,
    hop 353 -> [257, 188]).
  * :func:`scipy_log_spectrogram` -- PMR/MCR ``scipy.signal.spectrogram`` recipe (AVE/CREMA-D pickles).
  * :func:`kaldi_fbank` -- Kaldi/torchaudio ``compliance.kaldi.fbank`` re-implemented with torch.stft-free
    framing + ``torch.fft.rfft``; :func:`audioset_fbank` the C-OGM Kinetics-Sounds recipe (mean removed,
    128 mel bins, 10 ms shift, 25 ms Hanning window, 1024 frames pad/cut, ``(x + 4.503877) / (2 * 5.141276)``).
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

Size = Union[int, Tuple[int, int], Sequence[int]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FBANK_MEAN = -4.503877
FBANK_STD = 5.141276


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# ----------------------------------------------------------------------------------------------- images

def _open_rgb(path: Union[str, Path], mode: str = "RGB"):
    from PIL import Image
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise DataError(f"image file '{path}' does not exist") from None
    except Exception as exc:
        raise DataError(f"image file '{path}' could not be decoded ({type(exc).__name__}: {exc}); "
                        "truncated or not an image?") from None
    if im.mode != mode:
        im = im.convert(mode)
    return im


def load_image(path: Union[str, Path]) -> torch.Tensor:
    """Decode a JPEG/PNG (any mode) to a float tensor ``[3, H, W]`` in ``[0, 1]``."""
    im = _open_rgb(path)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image_uint8(path: Union[str, Path], size: Optional[Size] = None, mode: str = "RGB") -> torch.Tensor:
    """Decode to ``[C, H, W]`` uint8 (``mode`` RGB -> C=3, L -> C=1), resized to ``size`` (int = square) with PIL bilinear if given.

    This is torchvision's ``Resize((h, w))`` applied to a PIL image (the usual pipeline of the
    community loaders), and the representation the input cache stores.
    """
    from PIL import Image
    im = _open_rgb(path, mode)
    if size is not None:
        h, w = _hw(size)
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]; float passes through."""
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img


def resize(img: torch.Tensor, size: Size, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of ``[..., C, H, W]`` to ``size`` (int -> square ``size x size``)."""
    h, w = _hw(size)
    if img.shape[-2:] == (h, w):
        return img
    dtype = img.dtype
    x = to_float(img) if dtype == torch.uint8 else img
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
    y = y.reshape(*lead, *y.shape[-3:])
    if dtype == torch.uint8:
        return y.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return y


def resize_short_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``, aspect ratio kept."""
    h, w = img.shape[-2:]
    if h <= w:
        return resize(img, (size, max(1, int(size * w / h))))
    return resize(img, (max(1, int(size * h / w)), size))


def _uniform(generator: Optional[torch.Generator], lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=generator))


def _randint(generator: Optional[torch.Generator], lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def random_resized_crop_params(height: int, width: int, generator: Optional[torch.Generator] = None,
                               scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: torch.Tensor, size: Size, generator: Optional[torch.Generator] = None,
                        scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)) -> torch.Tensor:
    """``RandomResizedCrop(size)`` of ``[C, H, W]`` (uint8 or float; the dtype is kept)."""
    top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], generator, scale, ratio)
    return resize(img[..., top:top + h, left:left + w], size)


def hflip(img: torch.Tensor) -> torch.Tensor:
    return img.flip(-1)


def normalize_imagenet(img: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of ``[..., 3, H, W]`` (uint8 is first scaled to [0, 1])."""
    x = to_float(img)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------ audio

def _mono(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        x = x.mean(axis=1)
    return x


def _read_with_av(path: Path) -> Tuple[np.ndarray, int]:
    import av  # PyAV: audio tracks of video containers, mp3, m4a, ...
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise DataError(f"media file '{path}' has no audio stream")
        chunks, sr = [], int(streams[0].rate or 0)
        for frame in container.decode(streams[0]):
            a = frame.to_ndarray()
            if a.dtype.kind in "iu":
                a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
            a = a.astype(np.float32)
            if frame.format.is_planar:
                a = a.mean(axis=0)
            else:
                a = a.reshape(-1, len(frame.layout.channels)).mean(axis=1)
            chunks.append(a)
            sr = int(frame.sample_rate)
    if not chunks:
        raise DataError(f"audio in '{path}' holds no samples")
    return np.concatenate(chunks), sr


def check_wav_header(path: Union[str, Path]) -> Optional[str]:
    """Cheap integrity check of a RIFF/WAVE file (reads the header only).

    Returns ``None`` if fine, else what is wrong (not RIFF, no data chunk, data chunk longer than
    the file, i.e. truncated).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return "not a RIFF/WAVE file"
            if head[:4] == b"RF64":
                return None
            pos = 12
            while True:
                f.seek(pos)
                ch = f.read(8)
                if len(ch) < 8:
                    return "no 'data' chunk (truncated header)"
                n = int.from_bytes(ch[4:8], "little")
                if ch[:4] == b"data":
                    if n == 0:
                        return "empty 'data' chunk (no samples)"
                    if pos + 8 + n > size:
                        return f"truncated: header announces {n} data bytes, file holds {size - pos - 8}"
                    return None
                pos += 8 + n + (n & 1)
    except OSError as exc:
        return f"unreadable ({exc})"


def read_audio(path: Union[str, Path], sr: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Decode an audio file to a mono float32 waveform (1-D tensor) in [-1, 1] and its sample rate.

    ``sr``: resample to this rate (polyphase) if the file's rate differs. WAV files are checked for
    truncation (a data chunk announcing more bytes than the file holds).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"audio file '{path}' does not exist")
    if path.suffix.lower() == ".wav":
        problem = check_wav_header(path)
        if problem:
            raise DataError(f"audio file '{path}': {problem}")
    x: Optional[np.ndarray] = None
    rate = 0
    try:
        import soundfile as sf
        x, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception:
        x = None
    if x is None and path.suffix.lower() == ".wav":
        try:
            from scipy.io import wavfile
            rate, x = wavfile.read(str(path))
            if np.issubdtype(x.dtype, np.integer):
                x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
        except Exception as exc:
            raise DataError(f"audio file '{path}' could not be decoded ({exc}); truncated or not a WAV?") from None
    if x is None:
        try:
            x, rate = _read_with_av(path)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"audio file '{path}' could not be decoded ({type(exc).__name__}: {exc})") from None
    x = _mono(np.asarray(x, dtype=np.float32))
    if x.size == 0:
        raise DataError(f"audio file '{path}' holds no samples")
    if not np.all(np.isfinite(x)):
        raise DataError(f"audio file '{path}' holds NaN/inf samples")
    wave = torch.from_numpy(np.ascontiguousarray(x))
    rate = int(rate)
    if sr is not None and int(sr) != rate:
        wave = resample(wave, rate, int(sr))
        rate = int(sr)
    return wave, rate


def resample(wave: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    """Polyphase resampling (``scipy.signal.resample_poly``, Kaiser window) of a 1-D or [C, N] wave."""
    if int(sr_in) == int(sr_out):
        return wave
    from scipy.signal import resample_poly
    frac = Fraction(int(sr_out), int(sr_in))
    x = np.asarray(wave.detach().cpu().numpy(), dtype=np.float64)
    y = resample_poly(x, frac.numerator, frac.denominator, axis=-1)
    return torch.from_numpy(y.astype(np.float32))


def tile_to(wave: torch.Tensor, n: int) -> torch.Tensor:
    """``np.tile(x, k)[:n]``: repeat the clip until it has ``n`` samples, then cut."""
    if wave.numel() == 0:
        raise DataError("cannot tile an empty waveform")
    reps = -(-n // wave.numel())
    return wave.repeat(reps)[:n] if reps > 1 else wave[:n]


def fix_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    """Cut or zero-pad to ``n`` samples."""
    return wave[:n] if wave.numel() >= n else F.pad(wave, (0, n - wave.numel()))


def log_spectrogram(wave: torch.Tensor, n_fft: int, hop: int, win_length: Optional[int] = None,
                    center: bool = True, pad_mode: str = "reflect", eps: float = 1e-7) -> torch.Tensor:
    """``log(|STFT| + eps)`` with a periodic Hann window (librosa.stft semantics): ``[n_fft//2+1, frames]``.

    ``pad_mode`` is the centre padding: ``reflect`` (librosa < 0.10, the C-OGM era) or ``constant``.
    """
    win_length = win_length or n_fft
    spec = torch.stft(wave.float(), n_fft=n_fft, hop_length=hop, win_length=win_length,
                      window=torch.hann_window(win_length), center=center, pad_mode=pad_mode,
                      return_complex=True)
    return torch.log(spec.abs() + eps)


def cremad_spectrogram(wave: torch.Tensor, sr: int = 22050, seconds: float = 3.0, n_fft: int = 512,
                       hop: int = 353) -> torch.Tensor:
    """C-OGM/MCR CREMA-D audio: tile to ``seconds`` at ``sr``, clip to [-1, 1], log-STFT -> [257, 188]."""
    x = tile_to(wave, int(sr * seconds)).clamp(-1.0, 1.0)
    return log_spectrogram(x, n_fft, hop)


def scipy_log_spectrogram(wave: torch.Tensor, n_samples: int = 160000, nperseg: int = 512, noverlap: int = 353,
                          zscore: bool = True) -> torch.Tensor:
    """PMR/MCR recipe: tile to ``n_samples``, clip, ``scipy.signal.spectrogram`` (Tukey(0.25), PSD),
    ``log(S + 1e-7)``, per-sample z-score -> [nperseg//2+1, frames] ((257, 1004) by default)."""
    from scipy import signal
    x = tile_to(wave, n_samples).clamp(-1.0, 1.0).numpy().astype(np.float64)
    _, _, s = signal.spectrogram(x, nperseg=nperseg, noverlap=noverlap)
    s = np.log(s + 1e-7)
    if zscore:
        s = (s - s.mean()) / (s.std() + 1e-9)
    return torch.from_numpy(s.astype(np.float32))


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel filters (weights computed in the mel domain): ``[num_bins, padded_window//2 + 1]``."""
    num_fft_bins = padded_window // 2
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(fft_bin_width * np.arange(num_fft_bins, dtype=np.float64))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    banks = np.pad(banks, ((0, 0), (0, 1)))  # Nyquist bin gets weight 0
    return torch.from_numpy(banks.astype(np.float32))


def kaldi_fbank(wave: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, preemphasis: float = 0.97, remove_dc_offset: bool = True,
                low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Log mel filter bank as ``torchaudio.compliance.kaldi.fbank`` computes it with ``htk_compat=True,
    use_energy=False, window_type='hanning', dither=0, snip_edges=True`` -> ``[frames, num_mel_bins]``.

    Pipeline: frames of ``frame_length_ms`` every ``frame_shift_ms`` (only whole frames), per-frame DC
    removal, pre-emphasis 0.97, symmetric Hanning window, zero-pad to a power of two, power spectrum,
    mel filters (1127 ln(1 + f/700), 20 Hz to Nyquist), ``log(max(E, eps))``.
    """
    x = wave.to(torch.float64).flatten()
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if x.numel() < win:
        raise DataError(f"waveform of {x.numel()} samples is shorter than one fbank window ({win})")
    n_frames = 1 + (x.numel() - win) // shift
    frames = x.as_strided((n_frames, win), (shift, 1)).clone()
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis != 0.0:
        prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis * prev
    frames = frames * torch.hann_window(win, periodic=False, dtype=torch.float64)
    padded = 1 << (win - 1).bit_length()
    spec = torch.fft.rfft(frames, n=padded).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq).to(torch.float64)
    mel = spec @ banks.T
    eps = torch.finfo(torch.float32).eps
    return torch.log(mel.clamp_min(eps)).to(torch.float32)


def pad_or_cut_frames(feat: torch.Tensor, target: int) -> torch.Tensor:
    """Zero-pad or cut ``[frames, bins]`` to ``target`` frames."""
    n = feat.shape[0]
    if n < target:
        return F.pad(feat, (0, 0, 0, target - n))
    return feat[:target]


def audioset_fbank(wave: torch.Tensor, sample_rate: int = 16000, target_frames: int = 1024, num_mel_bins: int = 128,
                   normalize: bool = True) -> torch.Tensor:
    """C-OGM ``process_audio.py`` (AST recipe): mean-removed wave -> Kaldi fbank -> pad/cut to
    ``target_frames`` -> ``(x + 4.503877) / (2 * 5.141276)`` -> ``[target_frames, num_mel_bins]``."""
    w = wave.float() - wave.float().mean()
    feat = pad_or_cut_frames(kaldi_fbank(w, sample_rate, num_mel_bins), target_frames)
    if normalize:
        feat = (feat - FBANK_MEAN) / (2.0 * FBANK_STD)
    return feat


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "load_image", "load_image_uint8", "to_float", "resize", "resize_short_side",
    "random_resized_crop", "random_resized_crop_params", "hflip", "normalize_imagenet", "read_audio", "resample",
    "check_wav_header", "tile_to", "fix_length", "log_spectrogram", "cremad_spectrogram", "scipy_log_spectrogram",
    "kaldi_mel_banks", "kaldi_fbank", "pad_or_cut_frames", "audioset_fbank",
]

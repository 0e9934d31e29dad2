"""Real audio-visual datasets laid out as the community prepares them (spec §5.1-5.4).

Registered names: ``cremad``, ``kinetics_sounds``, ``ave``, ``ucf101``, ``vggsound``. Every
builder takes ``data.root`` and optional explicit paths (``data.train_list``, ``data.audio_dir``,
``data.visual_dir``, ...; relative paths are relative to the root). Left empty, the known layouts
are detected (see each builder's docstring).

Inputs per sample:
  * ``audio``: ``[1, F, T]`` float32. From ``.wav`` (and other audio files) the spectrogram is computed
    on the fly with the dataset's recipe (``data.audio_feature``: ``stft`` = librosa-style
    ``log(|STFT|+1e-7)``, ``scipy_stft`` = PMR/MCR ``scipy.signal.spectrogram`` + z-score, ``fbank``
    = Kaldi 128-bin log-mel, 1024 frames, AudioSet normalisation); ``.npy``/``.pkl``/``.pt`` are
    loaded as stored (a 2-D array gets a leading channel dim).
  * frames (``visual``; UCF-101 ``visual`` + ``flow``): ``[T, C, H, W]``; T frames per clip by segment
    sampling (``data.frame_sampling=segment``: random frame of each of T equal segments in training,
    the middle one in evaluation; ``first``: the first T, as MCR/PMR). Each frame is decoded and
    resized to ``base_size`` (default ``image_size``) square with PIL bilinear (uint8); training then
    applies ``RandomResizedCrop(image_size)`` (``train_crop=rrc``; ``resize`` for UCF-101 as C-BB) and a
    random horizontal flip, independently per frame; evaluation resizes to ``image_size``. RGB is
    ImageNet-normalised; flow (u, v stacked as 2 channels) is not (``flow_normalize=mnist`` for
    ``Normalize([0.1307], [0.3081])``).

Splits: the official validation list when there is one, else a seeded stratified hold-out
(``val_fraction``, ``val_seed``) of train; test is never touched.

Bad input (``data.on_error``): missing audio / frame folder, fewer frames than T, truncated or
unreadable WAV headers, split rows naming missing clips and labels outside the class list are found
when the dataset is built: ``raise`` stops with a :class:`DataError` listing them, ``skip`` drops
them and lists them in ``bundle.skipped``. ``data.verify=full`` also decodes every clip at build time
(slow; catches corrupt JPEGs and audio bodies). A clip that fails to decode later raises a
``DataError`` naming the clip and file.

Input cache (``data.cache=DIR``): see :mod:`mmbalance.data.cache`; frames are cached at
``base_size`` (uint8), audio features as float32, so evaluation inputs are identical with and
without the cache, and training crops/flips are applied on top of the cached frames.
"""
from __future__ import annotations

import csv
import logging
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...errors import DataError
from .. import media
from ..base import DataBundle, MultimodalDataset, register_dataset, stratified_holdout
from ..cache import FieldSpec, InputCache
from ..frames import list_frames, segment_indices

log = logging.getLogger(__name__)

AUDIO_FILE_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".m4a")
FEATURE_EXTS = (".npy", ".pt", ".pkl")

CREMAD_OGM_ORDER = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
AVE_MCR_ORDER = [
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane", "Race car, auto racing",
    "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute", "Ukulele", "Frying (food)", "Truck",
    "Shofar", "Motorcycle", "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus",
    "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
]


# ------------------------------------------------------------------------------------------- options

@dataclass
class AVOptions:
    """Options shared by the audio-visual datasets (``data.<name>=...``)."""

    train_list: str = ""  # split files; empty = detect the community layout
    val_list: str = ""
    test_list: str = ""
    audio_dir: str = ""  # empty = detect
    visual_dir: str = ""
    audio_format: str = "auto"  # auto (prefer .wav, then .npy, .pt, .pkl) | wav | npy | pt | pkl
    audio_feature: str = "stft"  # recipe for audio files: stft | scipy_stft | fbank
    audio_sr: int = 22050
    audio_seconds: float = 3.0
    n_fft: int = 512
    hop: int = 353
    fbank_frames: int = 1024
    frames: int = 2  # T frames per clip
    frame_sampling: str = "segment"  # segment | first
    pad_frames: bool = False  # clips with fewer than T frames repeat frames instead of being an error
    image_size: int = 224
    base_size: int = 0  # decode/cached frame size (0 = image_size)
    train_crop: str = "rrc"  # rrc (RandomResizedCrop) | resize
    hflip: bool = True
    val_fraction: float = 0.1
    val_seed: int = 0
    verify: str = "quick"  # quick (existence, counts, headers) | full (decode everything at build time)


@dataclass
class CremaDOptions(AVOptions):
    class_order: str = "ogm"  # ogm: NEU,HAP,SAD,FEA,DIS,ANG (C-OGM/MCR) | sorted: ANG,DIS,FEA,HAP,NEU,SAD


@dataclass
class KineticsSoundsOptions(AVOptions):
    audio_feature: str = "fbank"
    audio_sr: int = 16000
    audio_seconds: float = 10.0
    frames: int = 3
    num_classes: int = 31
    class_names_file: str = ""  # optional: one class name per line, in label-index order


@dataclass
class AVEOptions(AVOptions):
    audio_feature: str = "scipy_stft"
    audio_sr: int = 16000
    audio_seconds: float = 10.0
    n_fft: int = 512
    hop: int = 159  # nperseg 512, noverlap 353
    frames: int = 4
    class_order: str = "mcr"  # mcr (Church bell=0 ... Mandolin=27) | sorted
    dedup: bool = True  # drop repeated video ids within a split (as C-OGM's AVDataset)


@dataclass
class UCF101Options(AVOptions):
    flow_u_dir: str = ""
    flow_v_dir: str = ""
    class_index: str = ""  # classInd.txt (empty = detect)
    split: int = 1  # trainlist0{split}.txt / testlist0{split}.txt
    frames: int = 3
    train_crop: str = "resize"
    flow_normalize: str = "none"  # none | mnist


@dataclass
class VGGSoundOptions(AVOptions):
    audio_sr: int = 16000
    audio_seconds: float = 10.0
    frames: int = 3
    csv_file: str = ""  # vggsound.csv: ytid,start,label,split (empty = detect)


# ------------------------------------------------------------------------------------------- records

@dataclass
class Clip:
    clip: str
    label: int
    split: str
    audio: Optional[Path] = None
    frames: Dict[str, List[Path]] = field(default_factory=dict)  # stream -> sorted frame files
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FrameSpec:
    name: str  # modality
    streams: Tuple[str, ...]  # ("visual",) or ("flow_u", "flow_v")
    mode: str  # PIL mode per stream: RGB | L
    t: int
    image_size: int
    base_size: int
    train_crop: str
    flip: bool
    normalize: str  # imagenet | none | mnist
    sampling: str
    pad: bool

    @property
    def channels(self) -> int:
        return (3 if self.mode == "RGB" else 1) * len(self.streams)


@dataclass
class AudioSpec:
    name: str
    feature: str
    sr: int
    seconds: float
    n_fft: int
    hop: int
    fbank_frames: int
    shape: Tuple[int, ...] = ()


def _resolve(root: Path, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else root / q


def _find(root: Path, explicit: str, candidates: Sequence[str], what: str, required: bool = True,
          want_dir: bool = True) -> Optional[Path]:
    if explicit:
        p = _resolve(root, explicit)
        if not (p.is_dir() if want_dir else p.is_file()):
            raise DataError(f"{what} '{p}' does not exist")
        return p
    for c in candidates:
        p = root / c
        if (p.is_dir() if want_dir else p.is_file()):
            return p
    if required:
        raise DataError(f"no {what} under '{root}' (looked for {', '.join(candidates)}); set it explicitly")
    return None


def _read_lines(path: Path) -> List[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [ln.strip() for ln in f if ln.strip()]
    except OSError as exc:
        raise DataError(f"split file '{path}' could not be read ({exc})") from None


def _audio_index(folder: Optional[Path], fmt: str) -> Dict[str, Path]:
    """stem -> audio/feature file (recursive), preferring .wav, .npy, .pt, .pkl unless ``fmt`` fixes one."""
    if folder is None:
        return {}
    order = list(AUDIO_FILE_EXTS) + list(FEATURE_EXTS) if fmt == "auto" else [f".{fmt}"]
    rank = {e: k for k, e in enumerate(order)}
    out: Dict[str, Path] = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            stem, ext = os.path.splitext(n)
            ext = ext.lower()
            if ext in rank and (stem not in out or rank[ext] < rank[out[stem].suffix.lower()]):
                out[stem] = Path(dirpath) / n
    return out


class _FrameDirs:
    """Find ``<dir>/<clip>`` or ``<dir>/<subfolder>/<clip>`` (split sub-folders)."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder
        self.top = set(os.listdir(folder)) if folder is not None else set()
        self.subs: List[Path] = []

    def find(self, clip: str) -> Optional[Path]:
        if self.folder is None:
            return None
        if clip in self.top:
            return self.folder / clip
        if not self.subs:
            self.subs = [self.folder / s for s in sorted(self.top) if (self.folder / s).is_dir()
                         and not any(n.lower().endswith((".jpg", ".jpeg", ".png")) for n in os.listdir(self.folder / s)[:50])]
        for s in self.subs:
            p = s / clip
            if p.is_dir():
                return p
        return None


# ------------------------------------------------------------------------------------------ decoding

def _tensor_from_file(path: Path) -> torch.Tensor:
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            x = np.load(path, allow_pickle=False)
        elif ext == ".pkl":
            with open(path, "rb") as f:
                x = pickle.load(f)
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"feature file '{path}' could not be loaded ({type(exc).__name__}: {exc})") from None
    if isinstance(x, dict):
        arrays = [v for v in x.values() if isinstance(v, (np.ndarray, torch.Tensor))]
        if len(arrays) != 1:
            raise DataError(f"feature file '{path}' holds a dict without a single array")
        x = arrays[0]
    try:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    except Exception:
        raise DataError(f"feature file '{path}' does not hold a numeric array (got {type(x).__name__})") from None
    return t


def compute_audio(path: Path, spec: AudioSpec, meta: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """Audio input ``[1, F, T]`` of one clip (spectrogram computed for audio files, features loaded)."""
    ext = path.suffix.lower()
    if ext in FEATURE_EXTS:
        x = _tensor_from_file(path)
    else:
        if spec.feature == "fbank":
            wave, sr = media.read_audio(path, 16000)
            x = media.audioset_fbank(wave, 16000, spec.fbank_frames)
        else:
            wave, sr = media.read_audio(path, spec.sr)
            meta = meta or {}
            if "start" in meta and "end" in meta:  # AVE event segment
                seg = wave[int(sr * meta["start"]):int(sr * meta["end"])]
                wave = seg if seg.numel() > 0 else wave
            n = int(round(spec.sr * spec.seconds))
            if spec.feature == "scipy_stft":
                x = media.scipy_log_spectrogram(wave, n, nperseg=spec.n_fft, noverlap=spec.n_fft - spec.hop)
            elif spec.feature == "stft":
                x = media.log_spectrogram(media.tile_to(wave, n).clamp(-1.0, 1.0), spec.n_fft, spec.hop)
            else:
                raise DataError(f"unknown audio_feature '{spec.feature}' (stft | scipy_stft | fbank)")
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] != 1:
        raise DataError(f"audio features in '{path}' have shape {list(x.shape)}; expected [F, T] or [1, F, T]")
    if not torch.isfinite(x).all():
        raise DataError(f"audio features in '{path}' hold NaN/inf values")
    return x.contiguous()


def decode_frames(paths: Sequence[Path], size: int, mode: str) -> torch.Tensor:
    """``[n, C, size, size]`` uint8."""
    return torch.stack([media.load_image_uint8(p, size, mode) for p in paths])


def transform_frames(x: torch.Tensor, spec: FrameSpec, train: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[T, C, S, S]`` uint8 base frames -> ``[T, C, H, W]`` float, normalised."""
    out = []
    for f in x:
        if train:
            if spec.train_crop == "rrc":
                f = media.random_resized_crop(f, spec.image_size, generator)
            else:
                f = media.resize(f, spec.image_size)
            if spec.flip and float(torch.rand(1, generator=generator)) < 0.5:
                f = media.hflip(f)
        else:
            f = media.resize(f, spec.image_size)
        out.append(f)
    y = media.to_float(torch.stack(out))
    if spec.normalize == "imagenet":
        y = media.normalize_imagenet(y)
    elif spec.normalize == "mnist":
        y = (y - 0.1307) / 0.3081
    return y.contiguous()


# ------------------------------------------------------------------------------------------- dataset

class _Core:
    """What the train/val/test views share: the clip table, input specs and the cache."""

    def __init__(self, name: str, clips: List[Clip], num_classes: int, modalities: Tuple[str, ...],
                 audio: Optional[AudioSpec], frames: List[FrameSpec], cache: Optional[InputCache]):
        self.name, self.clips, self.num_classes, self.modalities = name, clips, num_classes, modalities
        self.audio, self.frame_specs, self.cache = audio, frames, cache
        self.labels = np.array([c.label for c in clips], dtype=np.int64)

    def _fail(self, ci: int, exc: Exception) -> DataError:
        c = self.clips[ci]
        return DataError(f"{self.name}: clip '{c.clip}' ({c.split}): {exc}")

    def audio_input(self, ci: int) -> torch.Tensor:
        spec, c = self.audio, self.clips[ci]
        if self.cache is not None and self.cache.has(spec.name, ci):
            return torch.from_numpy(np.array(self.cache.get(spec.name, ci)))
        try:
            x = compute_audio(c.audio, spec, c.meta)
        except DataError as exc:
            raise self._fail(ci, exc) from None
        if spec.shape and tuple(x.shape) != tuple(spec.shape):
            raise self._fail(ci, DataError(f"audio input '{c.audio}' has shape {list(x.shape)}, other clips "
                                           f"{list(spec.shape)}"))
        if self.cache is not None:
            self.cache.put(spec.name, ci, x.numpy())
        return x

    def frame_input(self, spec: FrameSpec, ci: int, train: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
        c = self.clips[ci]
        n = min(len(c.frames[s]) for s in spec.streams)
        try:
            if spec.sampling == "first":
                idx = list(range(min(n, spec.t)))
                if len(idx) < spec.t:
                    idx = segment_indices(n, spec.t, False, None, pad=spec.pad)
            else:
                idx = segment_indices(n, spec.t, train, generator, pad=spec.pad)
            parts = []
            for s in spec.streams:
                key = f"{spec.name}.{s}"
                files = c.frames[s]
                if self.cache is not None:
                    if not self.cache.has(key, ci):
                        self.cache.put(key, ci, decode_frames(files, spec.base_size, spec.mode).numpy())
                    rows = self.cache.get(key, ci)
                    parts.append(torch.from_numpy(np.ascontiguousarray(rows[idx])))
                else:
                    parts.append(decode_frames([files[k] for k in idx], spec.base_size, spec.mode))
        except DataError as exc:
            raise self._fail(ci, exc) from None
        return transform_frames(torch.cat(parts, dim=1), spec, train, generator)

    def inputs(self, ci: int, train: bool, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        fs = {f.name: f for f in self.frame_specs}
        for m in self.modalities:
            out[m] = self.audio_input(ci) if (self.audio is not None and m == self.audio.name) else \
                self.frame_input(fs[m], ci, train, generator)
        return out


class AVClipDataset(MultimodalDataset):
    """A split of an audio-visual dataset: rows ``indices`` of the shared clip table."""

    def __init__(self, core: _Core, indices: Sequence[int], train: bool):
        self.core = core
        self.indices = np.asarray(indices, dtype=np.int64)
        self.train = bool(train)
        self.modalities = core.modalities
        self.num_classes = core.num_classes
        #: generator for the training randomness (None = torch's global RNG, seeded per DataLoader worker)
        self.generator: Optional[torch.Generator] = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.core.labels[self.indices]

    def clip_name(self, i: int) -> str:
        return self.core.clips[int(self.indices[i])].clip

    def get_inputs(self, i: int) -> Dict[str, torch.Tensor]:
        return self.core.inputs(int(self.indices[i]), self.train, self.generator)


# -------------------------------------------------------------------------------------------- build

def _validate(clips: List[Clip], audio: Optional[AudioSpec], frames: List[FrameSpec]) -> List[Tuple[Clip, str]]:
    bad = []
    for c in clips:
        problem = c.meta.pop("problem", None)
        if problem is None and audio is not None:
            if c.audio is None:
                problem = "no audio file found"
            elif c.audio.suffix.lower() == ".wav":
                why = media.check_wav_header(c.audio)
                if why:
                    problem = f"audio file '{c.audio}': {why}"
            elif c.audio.stat().st_size == 0:
                problem = f"audio file '{c.audio}' is empty"
        if problem is None:
            for spec in frames:
                for s in spec.streams:
                    if s not in c.frames:
                        problem = c.meta.get(f"problem_{s}", f"no {s} frame folder found")
                        break
                    if len(c.frames[s]) < spec.t and not spec.pad:
                        problem = (f"{s} frame folder '{c.frames[s][0].parent}' has {len(c.frames[s])} frame(s), "
                                   f"fewer than the {spec.t} sampled per clip (data.frames / data.pad_frames)")
                        break
                if problem:
                    break
        if problem:
            bad.append((c, problem))
    return bad


def _attach_frames(c: Clip, stream: str, dirs: "_FrameDirs", name: Optional[str] = None) -> None:
    folder = dirs.find(name or c.clip)
    if folder is None:
        c.meta[f"problem_{stream}"] = (f"no {stream} frame folder for clip '{c.clip}' in '{dirs.folder}'")
        return
    try:
        c.frames[stream] = list_frames(folder, f"{stream} frame folder")
    except DataError as exc:
        c.meta[f"problem_{stream}"] = str(exc)


def build_av_bundle(name: str, o: AVOptions, data_cfg, clips: List[Clip], class_names: Optional[List[str]],
                    num_classes: int, audio: Optional[AudioSpec], frames: List[FrameSpec],
                    modalities: Tuple[str, ...], hints: Dict[str, str]) -> DataBundle:
    on_error = getattr(data_cfg, "on_error", "raise") if data_cfg is not None else "raise"
    skipped: List[Dict[str, Any]] = []

    def drop(bad: List[Tuple[Clip, str]], when: str) -> None:
        if not bad:
            return
        if on_error != "skip":
            lines = "\n".join(f"  - {c.split} clip '{c.clip}': {why}" for c, why in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(f"{name}: {len(bad)} bad sample(s) found {when}:\n{lines}{more}\n"
                            "(set data.on_error=skip to leave them out and list them in skipped.json)")
        ids = {id(c) for c, _ in bad}
        skipped.extend({"split": c.split, "clip": c.clip, "reason": why} for c, why in bad)
        clips[:] = [c for c in clips if id(c) not in ids]
        log.warning("%s: skipped %d bad sample(s) (see skipped.json)", name, len(bad))

    drop(_validate(clips, audio, frames), "while building the dataset")
    if o.verify not in ("quick", "full"):
        raise DataError(f"{name}: verify must be 'quick' or 'full', got '{o.verify}'")

    def make_core(cache=None):
        return _Core(name, clips, num_classes, modalities, audio, frames, cache)

    if audio is not None and clips:
        core = make_core()
        bad = []
        for ci, c in enumerate(clips):  # the first readable clip fixes the expected shape
            try:
                audio.shape = tuple(core.audio_input(ci).shape)
                break
            except DataError as exc:
                bad.append((c, str(exc)))
        drop(bad, "while reading the first audio inputs")
    if o.verify == "full":
        core, bad = make_core(), []
        for ci, c in enumerate(clips):
            try:
                core.inputs(ci, False)
            except DataError as exc:
                bad.append((c, str(exc)))
        drop(bad, "while decoding every clip (data.verify=full)")
    for s in ("train", "test"):
        if not any(c.split == s for c in clips):
            raise DataError(f"{name}: the {s} split is empty (after leaving out bad samples)")

    cache = None
    cache_dir = getattr(data_cfg, "cache", None) if data_cfg is not None else None
    if cache_dir:
        fields: Dict[str, FieldSpec] = {}
        params: Dict[str, Any] = {}
        if audio is not None:
            fields[audio.name] = FieldSpec("fixed", tuple(audio.shape), "float32")
            params["audio"] = asdict(audio)
        for spec in frames:
            for s in spec.streams:
                ch = 3 if spec.mode == "RGB" else 1
                fields[f"{spec.name}.{s}"] = FieldSpec("ragged", (ch, spec.base_size, spec.base_size), "uint8",
                                                       [len(c.frames[s]) for c in clips])
            params[spec.name] = {"base_size": spec.base_size, "mode": spec.mode, "streams": spec.streams}
        files = []
        for c in clips:
            files.append(f"{c.clip}|{c.split}|{c.audio}|{sorted(c.meta.items())}")
            for s in sorted(c.frames):
                files.extend(str(p) for p in c.frames[s])
        cache = InputCache(cache_dir, name, params, files, fields, len(clips))

    core = make_core(cache)
    split_of = np.array([c.split for c in clips])
    train_idx = np.flatnonzero(split_of == "train")
    test_idx = np.flatnonzero(split_of == "test")
    val_idx = np.flatnonzero(split_of == "val")
    if len(val_idx) == 0:
        keep, held = stratified_holdout(core.labels[train_idx], o.val_fraction, o.val_seed)
        train_idx, val_idx = train_idx[keep], train_idx[held]
    splits = {"train": AVClipDataset(core, train_idx, True), "val": AVClipDataset(core, val_idx, False),
              "test": AVClipDataset(core, test_idx, False)}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for m in modalities:
        if audio is not None and m == audio.name:
            shapes[m] = tuple(audio.shape)
        else:
            f = next(f for f in frames if f.name == m)
            shapes[m] = (f.t, f.channels, f.image_size, f.image_size)
    return DataBundle(name, modalities, num_classes, splits, class_names=class_names, input_shapes=shapes,
                      encoder_hints=dict(hints), train_eval=AVClipDataset(core, train_idx, False), skipped=skipped)


def _audio_spec(o: AVOptions) -> AudioSpec:
    if o.audio_feature not in ("stft", "scipy_stft", "fbank"):
        raise DataError(f"audio_feature must be stft, scipy_stft or fbank, got '{o.audio_feature}'")
    return AudioSpec("audio", o.audio_feature, o.audio_sr, o.audio_seconds, o.n_fft, o.hop, o.fbank_frames)


def _rgb_spec(o: AVOptions, name: str = "visual") -> FrameSpec:
    if o.frame_sampling not in ("segment", "first"):
        raise DataError(f"frame_sampling must be 'segment' or 'first', got '{o.frame_sampling}'")
    if o.train_crop not in ("rrc", "resize"):
        raise DataError(f"train_crop must be 'rrc' or 'resize', got '{o.train_crop}'")
    return FrameSpec(name, ("visual",), "RGB", o.frames, o.image_size, o.base_size or o.image_size, o.train_crop,
                     o.hflip, "imagenet", o.frame_sampling, o.pad_frames)


def _root(data_cfg, name: str) -> Path:
    root = getattr(data_cfg, "root", None) if data_cfg is not None else None
    if not root:
        raise DataError(f"{name}: set data.root (--data-root DIR) to the dataset folder")
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise DataError(f"{name}: data.root '{root}' is not a directory")
    return root


def _attach_audio(clips: List[Clip], index: Dict[str, Path], names: Optional[Callable[[Clip], List[str]]] = None):
    for c in clips:
        for n in (names(c) if names else [c.clip]):
            if n in index:
                c.audio = index[n]
                break


_SPLIT_DIRS = ["", "data", "annotations", "splits", "lists"]



def _audio_visual_bundle(name: str, o: AVOptions, data_cfg, root: Path, clips: List[Clip], class_names: List[str],
                         num_classes: int, audio_dirs: Sequence[str], visual_dirs: Sequence[str]) -> DataBundle:
    """Attach each clip's audio file and frame folder (found under the first existing candidate
    folder, or the explicit ``audio_dir`` / ``visual_dir``) and build the audio + visual bundle."""
    audio_dir = _find(root, o.audio_dir, list(audio_dirs), "audio folder")
    visual_dir = _find(root, o.visual_dir, list(visual_dirs), "frame folder")
    _attach_audio(clips, _audio_index(audio_dir, o.audio_format))
    dirs = _FrameDirs(visual_dir)
    for c in clips:
        _attach_frames(c, "visual", dirs)
    return build_av_bundle(name, o, data_cfg, clips, class_names, num_classes, _audio_spec(o), [_rgb_spec(o)],
                           ("audio", "visual"), {"audio": "resnet18", "visual": "resnet18"})

def _find_list(root: Path, explicit: str, names: Sequence[str], what: str, required: bool) -> Optional[Path]:
    cands = [str(Path(d) / n) if d else n for n in names for d in _SPLIT_DIRS]
    return _find(root, explicit, cands, what, required=required, want_dir=False)


# ------------------------------------------------------------------------------------------ CREMA-D

#: the OGM-GE recipe (C-OGM, spec §2.3): SGD 1e-3, momentum 0.9, wd 1e-4, bs 64, 100 epochs, StepLR(70, 0.1)
_PRESET_AV = {"train": {"epochs": 100}, "optim": {"name": "sgd", "lr": 1e-3, "weight_decay": 1e-4},
              "schedule": {"name": "step", "step_size": 70, "gamma": 0.1}, "data": {"batch_size": 64}}


@register_dataset("cremad", options=CremaDOptions, modalities=("audio", "visual"), needs_root=True,
                  presets=_PRESET_AV,
                  description="CREMA-D (6 emotions; audio spectrogram + 1 fps frames); OGM-GE/GeWu layouts")
def build_cremad(options: Optional[CremaDOptions], data_cfg=None, seed: int = 0) -> DataBundle:
    """CREMA-D. Split files ``train.csv``/``test.csv`` (rows ``clip,EMO``, optional BOM/header; C-DR's
    ``my_train.csv`` + ``val.csv`` when present, or ``data.val_list``); audio ``AudioWAV/<clip>.wav``
    (C-OGM, spectrogram 22,050 Hz x 3 s tiled, n_fft 512, hop 353 -> [1, 257, 188]) or ``audio/<clip>``
    ``.pt``/``.npy`` (GeWu fbank), ``Audio-299/<clip>.pkl`` (PMR); frames ``Image-01-FPS/<clip>/NNNNN.jpg``
    or ``visual/<clip>/frame_NNNNN.jpg``. ``class_order``: ogm (default) or sorted. T=2 frames."""
    o = options or CremaDOptions()
    root = _root(data_cfg, "cremad")
    order = {"ogm": CREMAD_OGM_ORDER, "sorted": sorted(CREMAD_OGM_ORDER)}.get(o.class_order)
    if order is None:
        raise DataError(f"cremad: class_order must be 'ogm' or 'sorted', got '{o.class_order}'")
    cidx = {n: k for k, n in enumerate(order)}
    val_default = _find_list(root, "", ["val.csv"], "", False) if not o.val_list else None
    my_train = _find_list(root, "", ["my_train.csv"], "", False)
    if o.train_list:
        train_list = _find_list(root, o.train_list, [], "train split file", True)
        val_list = _find_list(root, o.val_list, [], "val split file", True) if o.val_list else None
    elif my_train is not None and val_default is not None:
        train_list, val_list = my_train, val_default
    else:
        train_list = _find_list(root, "", ["train.csv"], "train split file (train.csv)", True)
        val_list = _find_list(root, o.val_list, [], "val split file", True) if o.val_list else None
    test_list = _find_list(root, o.test_list, ["test.csv"], "test split file (test.csv)", True)
    clips: List[Clip] = []
    for split, path in (("train", train_list), ("val", val_list), ("test", test_list)):
        if path is None:
            continue
        for k, line in enumerate(_read_lines(path)):
            row = next(csv.reader([line]))
            if len(row) < 2:
                clip, emo = row[0].strip(), row[0].split("_")[2] if row[0].count("_") >= 2 else ""
            else:
                clip, emo = row[0].strip(), row[1].strip()
            if k == 0 and emo not in cidx and emo.lower() in ("label", "emotion", "emo", "class"):
                continue  # header
            c = Clip(clip, cidx.get(emo, -1), split)
            if emo not in cidx:
                c.meta["problem"] = f"label '{emo}' in '{path.name}' is not one of {', '.join(order)}"
            clips.append(c)
    return _audio_visual_bundle("cremad", o, data_cfg, root, clips, list(order), 6,
                                ["AudioWAV", "audio", "Audio-299", "Audio"],
                                ["Image-01-FPS", "visual", "Image-01-FPS-SE", "frames"])


# ---------------------------------------------------------------------------------- Kinetics-Sounds

def _parse_id_label(line: str) -> Tuple[str, str]:
    """``clipid,10,label`` (C-OGM), ``path ... label`` (GeWu), ``clipid label`` (ARM) -> (clip, label)."""
    parts = [p.strip() for p in (line.split(",") if "," in line else line.split())]
    clip = os.path.basename(parts[0].rstrip("/"))
    clip = os.path.splitext(clip)[0] if clip.lower().endswith((".mp4", ".avi", ".wav", ".npy", ".pkl")) else clip
    return clip, parts[-1] if len(parts) > 1 else ""


@register_dataset("kinetics_sounds", options=KineticsSoundsOptions, modalities=("audio", "visual"), needs_root=True,
                  presets=_PRESET_AV,
                  description="Kinetics-Sounds (31 classes; fbank audio + 1 fps frames); C-OGM/GeWu/ARM lists")
def build_kinetics_sounds(options: Optional[KineticsSoundsOptions], data_cfg=None, seed: int = 0) -> DataBundle:
    """Kinetics-Sounds. Lists: ``my_train.txt``/``my_test.txt`` (``clipid,10,label``), GeWu
    ``{train,val,test}_1fps_path.txt`` (space separated, basename of the first field = clip, last =
    label) or ARM ``train_list.txt``/``val_list.txt`` (``clipid label``; ARM's val list is the test
    split here). Audio ``audio/<clip>.npy`` (fbank [1024, 128]) or ``.wav`` (fbank on the fly, 16 kHz);
    frames ``visual/<clip>/frame_00001.jpg`` (any split sub-folder). T=3."""
    o = options or KineticsSoundsOptions()
    root = _root(data_cfg, "kinetics_sounds")
    if o.train_list:
        lists = {"train": _find_list(root, o.train_list, [], "train list", True),
                 "val": _find_list(root, o.val_list, [], "val list", True) if o.val_list else None,
                 "test": _find_list(root, o.test_list, [], "test list", True) if o.test_list else None}
    else:
        gewu = _find_list(root, "", ["train_1fps_path.txt"], "", False)
        ogm = _find_list(root, "", ["my_train.txt"], "", False)
        arm = _find_list(root, "", ["train_list.txt"], "", False)
        if gewu is not None:
            lists = {"train": gewu, "val": _find_list(root, "", ["val_1fps_path.txt"], "", False),
                     "test": _find_list(root, "", ["test_1fps_path.txt"], "GeWu test list", True)}
        elif ogm is not None:
            lists = {"train": ogm, "val": None, "test": _find_list(root, "", ["my_test.txt"], "my_test.txt", True)}
        elif arm is not None:
            lists = {"train": arm, "val": None, "test": _find_list(root, "", ["val_list.txt"], "val_list.txt", True)}
        else:
            raise DataError(f"kinetics_sounds: no split lists under '{root}' (my_train.txt/my_test.txt, "
                            "train_1fps_path.txt/..., train_list.txt/val_list.txt); set data.train_list/test_list")
        if o.test_list:
            lists["test"] = _find_list(root, o.test_list, [], "test list", True)
        if o.val_list:
            lists["val"] = _find_list(root, o.val_list, [], "val list", True)
    if lists.get("test") is None:
        raise DataError("kinetics_sounds: a test list is required (data.test_list)")
    names = None
    if o.class_names_file:
        names = _read_lines(_find(root, o.class_names_file, [], "class names file", want_dir=False))
    k = len(names) if names else int(o.num_classes)
    clips: List[Clip] = []
    for split, path in lists.items():
        if path is None:
            continue
        for line in _read_lines(path):
            clip, lab = _parse_id_label(line)
            c = Clip(clip, -1, split)
            try:
                c.label = int(lab)
            except ValueError:
                if names and lab in names:
                    c.label = names.index(lab)
            if not 0 <= c.label < k:
                c.meta["problem"] = f"label '{lab}' in '{path.name}' is outside the {k} classes"
                c.label = -1
            clips.append(c)
    return _audio_visual_bundle("kinetics_sounds", o, data_cfg, root, clips, names, k,
                                ["audio", "audio_npy", "Audio", "AudioWAV", "audio_spec"],
                                ["visual", "frames", "Image-01-FPS", "video"])


# ----------------------------------------------------------------------------------------------- AVE

@register_dataset("ave", options=AVEOptions, modalities=("audio", "visual"), needs_root=True, presets=_PRESET_AV,
                  description="AVE (28 events; official train/val/test; event-segment spectrogram + frames)")
def build_ave(options: Optional[AVEOptions], data_cfg=None, seed: int = 0) -> DataBundle:
    """AVE. Lists ``trainSet.txt``/``valSet.txt``/``testSet.txt`` (``Category&VideoID&Quality&Start&End``,
    official split); audio ``Audio-1004-SE/<vid>.pkl`` ([257, 1004]) or ``.wav`` (16 kHz, the
    [Start, End] event segment tiled to 10 s, scipy spectrogram nperseg 512 / noverlap 353, z-score);
    frames ``Image-01-FPS-SE/<vid>/NNNNN.jpg``. ``class_order``: mcr (default) or sorted. T=4."""
    o = options or AVEOptions()
    root = _root(data_cfg, "ave")
    order = {"mcr": AVE_MCR_ORDER, "sorted": sorted(AVE_MCR_ORDER)}.get(o.class_order)
    if order is None:
        raise DataError(f"ave: class_order must be 'mcr' or 'sorted', got '{o.class_order}'")
    cidx = {n.lower(): k for k, n in enumerate(order)}
    lists = {"train": _find_list(root, o.train_list, ["trainSet.txt"], "trainSet.txt", True),
             "val": _find_list(root, o.val_list, ["valSet.txt"], "valSet.txt", False),
             "test": _find_list(root, o.test_list, ["testSet.txt"], "testSet.txt", True)}
    clips: List[Clip] = []
    for split, path in lists.items():
        if path is None:
            continue
        seen = set()
        for line in _read_lines(path):
            parts = line.split("&")
            if len(parts) < 5:
                raise DataError(f"ave: row '{line}' of '{path}' is not Category&VideoID&Quality&Start&End")
            try:
                start, end = float(parts[3]), float(parts[4])
            except ValueError:
                continue  # header row
            vid = parts[1].strip()
            if o.dedup and vid in seen:
                continue
            seen.add(vid)
            cat = parts[0].strip()
            c = Clip(vid, cidx.get(cat.lower(), -1), split, meta={"start": start, "end": end})
            if c.label < 0:
                c.meta["problem"] = f"category '{cat}' in '{path.name}' is not one of the 28 AVE classes"
            clips.append(c)
    return _audio_visual_bundle("ave", o, data_cfg, root, clips, list(order), 28,
                                ["Audio-1004-SE", "audio", "AudioWAV", "Audio"],
                                ["Image-01-FPS-SE", "visual", "Image-01-FPS", "frames"])


# ------------------------------------------------------------------------------------------- UCF-101

@register_dataset("ucf101", options=UCF101Options, modalities=("visual", "flow"), needs_root=True,
                  presets={"train": {"epochs": 70}, "optim": {"name": "sgd", "lr": 1e-2, "weight_decay": 1e-4},
                           "data": {"batch_size": 64}},
                  description="UCF-101 (101 actions; RGB frames + TV-L1 flow u/v as 2 channels), official splits")
def build_ucf101(options: Optional[UCF101Options], data_cfg=None, seed: int = 0) -> DataBundle:
    """UCF-101 (C-BB layout). ``classInd.txt`` + ``trainlist0{split}.txt``/``testlist0{split}.txt``
    (``Class/v_Class_gXX_cYY.avi [label]``); RGB ``<visual_dir>/<v_name>/frame_NNNNN.jpg`` (``rgb``,
    ``visual``, ``frames``, ``jpegs_256``), flow ``tvl1_flow/{u,v}/<v_name>/frame000001.jpg`` (or
    ``flow/{u,v}``, ``flow_u``/``flow_v``). RGB [T, 3, H, W] ImageNet-normalised, flow [T, 2, H, W]
    (u, v); training: Resize + random flip (C-BB). T=3."""
    o = options or UCF101Options()
    root = _root(data_cfg, "ucf101")
    ci_path = _find_list(root, o.class_index, ["classInd.txt", "ucfTrainTestlist/classInd.txt"], "classInd.txt", True)
    names: List[str] = []
    for line in _read_lines(ci_path):
        parts = line.split()
        names.append(parts[-1])
    cidx = {n: k for k, n in enumerate(names)}
    sfx = f"0{int(o.split)}"
    lists = {"train": _find_list(root, o.train_list, [f"trainlist{sfx}.txt", f"ucfTrainTestlist/trainlist{sfx}.txt"],
                                 f"trainlist{sfx}.txt", True),
             "val": _find_list(root, o.val_list, [], "val list", True) if o.val_list else None,
             "test": _find_list(root, o.test_list, [f"testlist{sfx}.txt", f"ucfTrainTestlist/testlist{sfx}.txt"],
                                f"testlist{sfx}.txt", True)}
    clips: List[Clip] = []
    for split, path in lists.items():
        if path is None:
            continue
        for line in _read_lines(path):
            rel = line.split()[0]
            cls = rel.split("/")[0] if "/" in rel else rel.split("_")[1]
            vname = os.path.splitext(os.path.basename(rel))[0]
            c = Clip(vname, cidx.get(cls, -1), split)
            if c.label < 0:
                c.meta["problem"] = f"class '{cls}' in '{path.name}' is not in '{ci_path.name}'"
            clips.append(c)
    rgb_dir = _find(root, o.visual_dir, ["rgb", "visual", "frames", "jpegs_256", "jpegs"], "RGB frame folder")
    u_dir = _find(root, o.flow_u_dir, ["tvl1_flow/u", "flow/u", "flow_u", "flow_path_u"], "flow u folder")
    v_dir = _find(root, o.flow_v_dir, ["tvl1_flow/v", "flow/v", "flow_v", "flow_path_v"], "flow v folder")
    dirs = {"visual": _FrameDirs(rgb_dir), "flow_u": _FrameDirs(u_dir), "flow_v": _FrameDirs(v_dir)}
    for c in clips:
        for s, d in dirs.items():
            _attach_frames(c, s, d)
    rgb = _rgb_spec(o)
    if o.flow_normalize not in ("none", "mnist"):
        raise DataError(f"ucf101: flow_normalize must be 'none' or 'mnist', got '{o.flow_normalize}'")
    flow = FrameSpec("flow", ("flow_u", "flow_v"), "L", o.frames, o.image_size, o.base_size or o.image_size,
                     o.train_crop, o.hflip, o.flow_normalize, o.frame_sampling, o.pad_frames)
    return build_av_bundle("ucf101", o, data_cfg, clips, names, len(names), None, [rgb, flow], ("visual", "flow"),
                           {"visual": "resnet18", "flow": "resnet18"})


# ------------------------------------------------------------------------------------------ VGGSound

@register_dataset("vggsound", options=VGGSoundOptions, modalities=("audio", "visual"), needs_root=True,
                  presets=_PRESET_AV,
                  description="VGGSound (309 classes; vggsound.csv ytid,start,label,split; audio + 1 fps frames)")
def build_vggsound(options: Optional[VGGSoundOptions], data_cfg=None, seed: int = 0) -> DataBundle:
    """VGGSound. ``vggsound.csv`` rows ``ytid,start,label,split`` (split train|test), clip name
    ``<ytid>_<start:06d>`` (or ``<ytid>_<start>``); or explicit ``train_list``/``test_list`` with
    ``clip,label`` rows. Classes: sorted label names. Audio ``audio/<clip>.wav`` (16 kHz, 10 s tiled,
    log-STFT n_fft 512 / hop 353 -> [1, 257, 454]) or features; frames ``visual/<clip>/...``. T=3."""
    o = options or VGGSoundOptions()
    root = _root(data_cfg, "vggsound")
    rows: List[Tuple[List[str], str, str]] = []  # (candidate names, label, split)
    if o.train_list:
        for split, p in (("train", o.train_list), ("val", o.val_list), ("test", o.test_list)):
            if not p:
                continue
            for line in _read_lines(_find(root, p, [], f"{split} list", want_dir=False)):
                row = next(csv.reader([line]))
                rows.append(([row[0].strip()], row[-1].strip(), split))
    else:
        path = _find_list(root, o.csv_file, ["vggsound.csv"], "vggsound.csv", True)
        for line in _read_lines(path):
            row = next(csv.reader([line]))
            if len(row) < 4:
                raise DataError(f"vggsound: row '{line}' of '{path}' is not ytid,start,label,split")
            try:
                start = int(float(row[1]))
            except ValueError:
                continue  # header
            split = row[3].strip().lower()
            split = "test" if split.startswith("test") else ("val" if split.startswith("val") else "train")
            rows.append(([f"{row[0]}_{start:06d}", f"{row[0]}_{start}", row[0]], row[2].strip(), split))
    names = sorted({r[1] for r in rows})
    cidx = {n: k for k, n in enumerate(names)}
    audio_dir = _find(root, o.audio_dir, ["audio", "Audio", "audio_wav", "AudioWAV"], "audio folder")
    visual_dir = _find(root, o.visual_dir, ["visual", "frames", "video", "Image-01-FPS"], "frame folder")
    aidx, dirs = _audio_index(audio_dir, o.audio_format), _FrameDirs(visual_dir)
    clips = []
    for cands, lab, split in rows:
        name = next((n for n in cands if n in aidx or dirs.find(n) is not None), cands[0])
        c = Clip(name, cidx[lab], split)
        c.audio = aidx.get(name)
        _attach_frames(c, "visual", dirs)
        clips.append(c)
    return build_av_bundle("vggsound", o, data_cfg, clips, names, len(names), _audio_spec(o), [_rgb_spec(o)],
                           ("audio", "visual"), {"audio": "resnet18", "visual": "resnet18"})


# VGGSound's defaults differ from CREMA-D's only in sr/seconds; keep n_fft 512 / hop 353 (C-OGM).

__all__ = ["AVOptions", "CremaDOptions", "KineticsSoundsOptions", "AVEOptions", "UCF101Options", "VGGSoundOptions",
           "AVClipDataset", "Clip", "FrameSpec", "AudioSpec", "compute_audio", "transform_frames", "build_av_bundle",
           "CREMAD_OGM_ORDER", "AVE_MCR_ORDER"]

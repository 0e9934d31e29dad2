"""``mmbalance prepare DATASET --src RAW --dst DIR``: raw videos -> 1 fps JPEG frames + mono WAV +
split files, in the layouts the audio-video loaders read.

Layout written (``<clip>`` = the video file name without extension):

* ``cremad`` (C-OGM / OGM-GE layout)::

      DST/Image-01-FPS/<clip>/NNNNN.jpg   first frame of every second; NNNNN = original frame index
                                          (00000, 00030, 00060 ... for 30 fps video)
      DST/AudioWAV/<clip>.wav             mono 16 kHz PCM-16 (from RAW/AudioWAV/<clip>.wav when it
                                          exists, as CREMA-D ships it, else from the video's audio)
      DST/train.csv, DST/test.csv         rows "clip,EMO" (no header); EMO = 3rd field of the clip
                                          name ActorID_Sentence_EMO_Level
      DST/stat.csv                        the class list NEU,HAP,SAD,FEA,DIS,ANG (C-OGM order)

  Videos are looked for under ``RAW/VideoFlash`` if it exists, else anywhere under ``RAW``.
  Split: ``--splits DIR`` holding ``train.csv``/``test.csv`` (e.g. C-OGM's files) keeps that
  split; otherwise a seeded stratified split with ``--test-fraction`` (0.1) of the clips as test.

* ``kinetics_sounds``, ``ave``, ``vggsound``, ``ucf101``, ``generic`` (GeWu layout)::

      DST/visual/<clip>/frame_00001.jpg ...   1 fps, numbered from 1
      DST/audio/<clip>.wav                    mono 16 kHz PCM-16 (missing if the video has none;
                                              listed under "no_audio" in the report)
      DST/train.txt, DST/test.txt (val.txt)   rows "clip label" (label = class index, GeWu/ARM style)
      DST/classes.txt                         sorted class names, one per line (line k = class k)

  The audio-video loaders read these with ``data.train_list=train.txt data.test_list=test.txt``
  (``data.val_list=val.txt``) and, where they take one, ``data.class_names_file=classes.txt``.

  Labels: ``--labels CSV`` with rows ``clip,label[,split]`` (header optional; split in
  train/val/test), else the name of the folder holding the video. Split: the csv's third column,
  else an ancestor folder named ``train``/``val``/``test``, else seeded stratified
  ``--test-fraction``. AVE event segments and UCF-101 optical flow are not computed (whole clip
  frames only).

Bookkeeping (resumable): after each clip ``DST/.prepare/done/<clip>.json`` is written; a second
run skips those clips. Clips that fail to decode are listed in ``DST/failed.txt`` (``clip<TAB>path
<TAB>error``) and ``DST/report.json`` and left out of the split files; the run carries on.
Frames and audio go to temporary names first and are renamed when complete.

Decoding uses PyAV (``--backend pyav``); ``--backend ffmpeg`` (or ``auto`` without PyAV) calls an
``ffmpeg`` binary if one is on the PATH. Clips are processed in parallel (``--workers``).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, MMBalanceError

VIDEO_EXTS = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
PREPARE_DATASETS = ("cremad", "kinetics_sounds", "ave", "vggsound", "ucf101", "generic")
CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


@dataclass
class PrepareOptions:
    dataset: str
    src: str
    dst: str
    workers: int = 1
    fps: float = 1.0
    sample_rate: int = 16000
    labels: Optional[str] = None
    splits: Optional[str] = None
    test_fraction: float = 0.1
    seed: int = 0
    backend: str = "auto"  # auto | pyav | ffmpeg
    audio: bool = True
    short_side: int = 0  # 0 = keep the frame size
    jpeg_quality: int = 95
    progress: bool = True


@dataclass
class Job:
    clip: str
    video: str
    frames_dir: str
    naming: str  # "index" (NNNNN = original frame index) | "gewu" (frame_00001 ...)
    wav: Optional[str]
    audio_src: Optional[str]  # an existing wav to resample instead of the video's audio
    done: str
    fps: float
    sample_rate: int
    backend: str
    short_side: int
    jpeg_quality: int


# --------------------------------------------------------------------------------------- decoding
def _frame_name(naming: str, index: int, k: int) -> str:
    return f"{index:05d}.jpg" if naming == "index" else f"frame_{k + 1:05d}.jpg"


def _save_frame(img, path: Path, short_side: int, quality: int) -> None:
    from PIL import Image
    if short_side > 0:
        w, h = img.size
        s = short_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    img.convert("RGB").save(path, "JPEG", quality=quality)


def frames_pyav(video: Path, out: Path, naming: str, fps: float, short_side: int, quality: int) -> int:
    """Save the first frame of every 1/fps seconds; returns the number of frames written."""
    import av
    with av.open(str(video)) as c:
        if not c.streams.video:
            raise DataError("no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        rate = float(vs.average_rate or vs.guessed_rate or 25)
        step = 1.0 / fps
        t0: Optional[float] = None
        next_t = 0.0
        k = 0
        for idx, frame in enumerate(c.decode(vs)):
            t = frame.time if frame.time is not None else idx / rate
            if t0 is None:
                t0 = t
            t -= t0
            if t + 1e-6 >= next_t:
                _save_frame(frame.to_image(), out / _frame_name(naming, idx, k), short_side, quality)
                k += 1
                while next_t <= t + 1e-6:
                    next_t += step
    if k == 0:
        raise DataError("no decodable video frames")
    return k


def audio_pyav(video: Path, sample_rate: int) -> Optional[np.ndarray]:
    """Mono int16 samples at ``sample_rate`` of the first audio stream; None if there is none."""
    import av
    with av.open(str(video)) as c:
        if not c.streams.audio:
            return None
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        chunks = []
        for frame in c.decode(c.streams.audio[0]):
            for f in resampler.resample(frame):
                chunks.append(f.to_ndarray().reshape(-1))
        for f in resampler.resample(None):
            chunks.append(f.to_ndarray().reshape(-1))
    if not chunks:
        raise DataError("audio stream holds no samples")
    return np.concatenate(chunks).astype(np.int16)


def audio_from_wav(path: Path, sample_rate: int) -> np.ndarray:
    import soundfile as sf
    from scipy.signal import resample_poly
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"audio file '{path}' could not be decoded ({exc})") from None
    x = x.mean(axis=1)
    if x.size == 0:
        raise DataError(f"audio file '{path}' holds no samples")
    if sr != sample_rate:
        fr = Fraction(sample_rate, int(sr))
        x = resample_poly(x.astype(np.float64), fr.numerator, fr.denominator)
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if not exe:
        raise MMBalanceError("the ffmpeg backend needs an 'ffmpeg' binary on the PATH (or use --backend pyav)")
    return exe


def frames_ffmpeg(video: Path, out: Path, naming: str, fps: float, short_side: int, quality: int) -> int:
    """ffmpeg: every round(rate/fps)-th frame (C-OGM's rule), renamed to the chosen naming."""
    exe = _ffmpeg()
    probe = subprocess.run([exe, "-i", str(video)], capture_output=True, text=True)
    import re
    m = re.search(r"(\d+(?:\.\d+)?) fps", probe.stderr)
    rate = float(m.group(1)) if m else 25.0
    every = max(1, int(round(rate / fps)))
    vf = f"select='not(mod(n\\,{every}))'"
    if short_side > 0:
        vf += f",scale='if(lt(iw,ih),{short_side},-2)':'if(lt(iw,ih),-2,{short_side})'"
    q = max(2, min(31, int(round(31 - quality * 29 / 100))))
    r = subprocess.run([exe, "-v", "error", "-y", "-i", str(video), "-vf", vf, "-vsync", "vfr", "-q:v", str(q),
                        str(out / "tmp_%06d.jpg")], capture_output=True, text=True)
    if r.returncode != 0:
        raise DataError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"ffmpeg exit {r.returncode}")
    files = sorted(out.glob("tmp_*.jpg"))
    for k, f in enumerate(files):
        f.rename(out / _frame_name(naming, k * every, k))
    if not files:
        raise DataError("no decodable video frames")
    return len(files)


def audio_ffmpeg(video: Path, sample_rate: int) -> Optional[np.ndarray]:
    exe = _ffmpeg()
    r = subprocess.run([exe, "-v", "error", "-i", str(video), "-vn", "-ac", "1", "-ar", str(sample_rate),
                        "-f", "s16le", "-acodec", "pcm_s16le", "-"], capture_output=True)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace")
        if "does not contain any stream" in err or "matches no streams" in err:
            return None
        raise DataError(err.strip().splitlines()[-1] if err.strip() else f"ffmpeg exit {r.returncode}")
    x = np.frombuffer(r.stdout, dtype=np.int16)
    return x if x.size else None


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf
    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), samples, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def process_clip(job: Job) -> Dict[str, Any]:
    """Extract one clip (frames, then audio, then the done-marker). Never raises."""
    start = time.time()
    res: Dict[str, Any] = {"clip": job.clip, "video": job.video, "ok": False}
    frames_dir = Path(job.frames_dir)
    tmp = frames_dir.with_name(frames_dir.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        extract = frames_ffmpeg if job.backend == "ffmpeg" else frames_pyav
        n = extract(Path(job.video), tmp, job.naming, job.fps, job.short_side, job.jpeg_quality)
        if frames_dir.exists():
            shutil.rmtree(frames_dir)
        os.replace(tmp, frames_dir)
        res["frames"] = n
        res["audio"] = False
        if job.wav is not None:
            if job.audio_src:
                samples = audio_from_wav(Path(job.audio_src), job.sample_rate)
            else:
                samples = (audio_ffmpeg if job.backend == "ffmpeg" else audio_pyav)(Path(job.video), job.sample_rate)
            if samples is not None:
                write_wav(Path(job.wav), samples, job.sample_rate)
                res["audio"] = True
                res["audio_seconds"] = round(len(samples) / job.sample_rate, 3)
        res["ok"] = True
        res["seconds"] = round(time.time() - start, 3)
        marker = Path(job.done)
        marker.write_text(json.dumps(res))
    except Exception as exc:  # a bad clip is reported, never fatal
        res["error"] = f"{type(exc).__name__}: {exc}".strip()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------ labels, splits
def find_videos(src: Path) -> List[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS
                  and not any(part.startswith(".") for part in p.relative_to(src).parts))


def read_label_csv(path: Path) -> Dict[str, Tuple[str, Optional[str]]]:
    """``clip,label[,split]`` rows (header optional) -> {clip: (label, split or None)}."""
    if not path.is_file():
        raise DataError(f"labels file '{path}' does not exist")
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row or not row[0].strip():
                continue
            if reader.line_num == 1 and row[0].strip().lower() in ("clip", "video", "id", "youtube_id", "name", "file"):
                continue
            if len(row) < 2:
                raise DataError(f"labels file '{path}' line {reader.line_num}: expected clip,label[,split], got {row}")
            clip = Path(row[0].strip()).stem if Path(row[0].strip()).suffix.lower() in VIDEO_EXTS else row[0].strip()
            split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else None
            if split is not None:
                split = {"valid": "val", "validation": "val", "dev": "val"}.get(split, split)
                if split not in ("train", "val", "test"):
                    raise DataError(f"labels file '{path}' line {reader.line_num}: split '{row[2]}' is not train, val or test")
            out[clip] = (row[1].strip(), split)
    return out


def seeded_split(clips: Sequence[str], labels: Sequence[str], test_fraction: float, seed: int) -> Dict[str, str]:
    """Stratified by label: round(test_fraction * n_c) clips of each class (>= 1 when n_c >= 2) are test."""
    from .base import stratified_holdout
    if not clips:
        return {}
    classes = sorted(set(labels))
    y = np.array([classes.index(l) for l in labels])
    keep, held = stratified_holdout(y, test_fraction, seed)
    out = {clips[i]: "train" for i in keep}
    out.update({clips[i]: "test" for i in held})
    return out


def _split_from_path(video: Path, src: Path) -> Optional[str]:
    for part in video.relative_to(src).parts[:-1]:
        p = part.lower()
        if p in ("train", "training"):
            return "train"
        if p in ("val", "valid", "validation", "dev"):
            return "val"
        if p in ("test", "testing"):
            return "test"
    return None


# ------------------------------------------------------------------------------------------- driver
def _backend(name: str) -> str:
    if name not in ("auto", "pyav", "ffmpeg"):
        raise MMBalanceError(f"--backend must be auto, pyav or ffmpeg, got '{name}'")
    if name == "auto":
        try:
            import av  # noqa: F401
            return "pyav"
        except ImportError:
            if shutil.which("ffmpeg"):
                return "ffmpeg"
            raise MMBalanceError("prepare needs PyAV (pip install av) or an ffmpeg binary on the PATH") from None
    if name == "ffmpeg":
        _ffmpeg()
    return name


def prepare(o: PrepareOptions) -> Dict[str, Any]:
    """Run the preparation; returns the report (also written to ``DST/report.json``)."""
    if o.dataset not in PREPARE_DATASETS:
        from ..registry import suggest
        raise MMBalanceError(f"prepare: unknown dataset '{o.dataset}'.{suggest(o.dataset, list(PREPARE_DATASETS))} "
                             f"Choose from {', '.join(PREPARE_DATASETS)}")
    if o.fps <= 0 or o.sample_rate <= 0 or o.workers < 1:
        raise MMBalanceError("prepare: --fps, --sample-rate and --workers must be positive")
    if not 0.0 < o.test_fraction < 1.0:
        raise MMBalanceError(f"prepare: --test-fraction must be in (0, 1), got {o.test_fraction}")
    backend = _backend(o.backend)
    src, dst = Path(o.src).expanduser(), Path(o.dst).expanduser()
    if not src.is_dir():
        raise DataError(f"prepare: --src '{src}' is not a folder")
    cremad = o.dataset == "cremad"
    video_root = src / "VideoFlash" if cremad and (src / "VideoFlash").is_dir() else src
    videos = find_videos(video_root)
    if not videos:
        raise DataError(f"prepare: no videos ({', '.join(VIDEO_EXTS)}) under '{video_root}'")
    frames_root = dst / ("Image-01-FPS" if cremad else "visual")
    audio_root = dst / ("AudioWAV" if cremad else "audio")
    done_root = dst / ".prepare" / "done"
    for d in (frames_root, done_root) + ((audio_root,) if o.audio else ()):
        d.mkdir(parents=True, exist_ok=True)

    failed: List[Dict[str, str]] = []
    label_of: Dict[str, str] = {}
    split_of: Dict[str, str] = {}
    csv_labels = read_label_csv(Path(o.labels)) if o.labels else None
    jobs: List[Job] = []
    seen: Dict[str, Path] = {}
    for v in videos:
        clip = v.stem
        if clip in seen:
            failed.append({"clip": clip, "video": str(v), "error": f"duplicate clip name (also {seen[clip]}); skipped"})
            continue
        seen[clip] = v
        if cremad:
            parts = clip.split("_")
            if len(parts) < 3 or parts[2] not in CREMAD_CLASSES:
                failed.append({"clip": clip, "video": str(v),
                               "error": f"clip name is not ActorID_Sentence_EMO_Level with EMO in {','.join(CREMAD_CLASSES)}"})
                continue
            label_of[clip] = parts[2]
        elif csv_labels is not None:
            if clip not in csv_labels:
                failed.append({"clip": clip, "video": str(v), "error": f"no label for this clip in '{o.labels}'"})
                continue
            label_of[clip], sp = csv_labels[clip]
            if sp:
                split_of[clip] = sp
        else:
            if v.parent == src or v.parent.name.lower() in ("train", "val", "test", "valid", "validation"):
                failed.append({"clip": clip, "video": str(v),
                               "error": "no label: the video is not inside a class folder (give --labels CSV)"})
                continue
            label_of[clip] = v.parent.name
        if not cremad and clip not in split_of:
            sp = _split_from_path(v, src)
            if sp:
                split_of[clip] = sp
        audio_src = None
        if cremad and (src / "AudioWAV" / f"{clip}.wav").is_file():
            audio_src = str(src / "AudioWAV" / f"{clip}.wav")
        jobs.append(Job(clip=clip, video=str(v), frames_dir=str(frames_root / clip),
                        naming="index" if cremad else "gewu",
                        wav=str(audio_root / f"{clip}.wav") if o.audio else None, audio_src=audio_src,
                        done=str(done_root / f"{clip}.json"), fps=o.fps, sample_rate=o.sample_rate,
                        backend=backend, short_side=o.short_side, jpeg_quality=o.jpeg_quality))

    todo = [j for j in jobs if not Path(j.done).is_file()]
    skipped_done = len(jobs) - len(todo)
    results: List[Dict[str, Any]] = []
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=f"prepare {o.dataset}", unit="clip", disable=not o.progress or not todo)
    if o.workers == 1 or len(todo) <= 1:
        for j in todo:
            results.append(process_clip(j))
            bar.update(1)
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(o.workers, len(todo))) as pool:
            for r in pool.imap_unordered(process_clip, todo, chunksize=1):
                results.append(r)
                bar.update(1)
    bar.close()
    for r in results:
        if not r["ok"]:
            failed.append({"clip": r["clip"], "video": r["video"], "error": r.get("error", "?")})

    done_clips = sorted(j.clip for j in jobs if Path(j.done).is_file())
    no_audio = []
    if o.audio:
        no_audio = sorted(c for c in done_clips if not (audio_root / f"{c}.wav").is_file())
    split_counts = write_splits(o, dst, done_clips, label_of, split_of, cremad)
    report = {
        "dataset": o.dataset, "src": str(src), "dst": str(dst), "backend": backend,
        "layout": {"frames": f"{frames_root.name}/<clip>/" + ("NNNNN.jpg (original frame index)" if cremad else "frame_00001.jpg"),
                   "audio": f"{audio_root.name}/<clip>.wav" if o.audio else None,
                   "splits": ["train.csv", "test.csv"] if cremad else sorted(f"{s}.txt" for s in split_counts)},
        "fps": o.fps, "sample_rate": o.sample_rate,
        "videos_found": len(videos), "clips": len(jobs), "processed": len(results),
        "skipped_already_done": skipped_done, "done": len(done_clips),
        "failed": sorted(failed, key=lambda f: f["clip"]), "no_audio": no_audio, "splits": split_counts,
        "options": {k: v for k, v in asdict(o).items() if k not in ("progress",)},
    }
    (dst / "report.json").write_text(json.dumps(report, indent=2))
    (dst / "failed.txt").write_text("".join(f"{f['clip']}\t{f['video']}\t{f['error']}\n" for f in report["failed"]))
    return report


def write_splits(o: PrepareOptions, dst: Path, clips: Sequence[str], label_of: Dict[str, str],
                 split_of: Dict[str, str], cremad: bool) -> Dict[str, int]:
    clips = [c for c in clips if c in label_of]
    if cremad:
        if o.splits:
            given: Dict[str, str] = {}
            for s in ("train", "test"):
                f = Path(o.splits) / f"{s}.csv"
                if not f.is_file():
                    raise DataError(f"prepare: --splits folder must hold train.csv and test.csv; '{f}' is missing")
                with open(f, newline="", encoding="utf-8-sig") as fh:
                    for row in csv.reader(fh):
                        if row and row[0].strip():
                            given[row[0].strip()] = s
            assign = {c: given[c] for c in clips if c in given}
        else:
            assign = seeded_split(clips, [label_of[c] for c in clips], o.test_fraction, o.seed)
        counts = {}
        for s in ("train", "test"):
            rows = [c for c in clips if assign.get(c) == s]
            (dst / f"{s}.csv").write_text("".join(f"{c},{label_of[c]}\n" for c in rows))
            counts[s] = len(rows)
        (dst / "stat.csv").write_text("".join(f"{c}\n" for c in CREMAD_CLASSES))
        return counts
    rest = [c for c in clips if c not in split_of]
    assign = dict(split_of)
    assign.update(seeded_split(rest, [label_of[c] for c in rest], o.test_fraction, o.seed) if len(rest) > 1 else
                  {c: "train" for c in rest})
    classes = sorted({label_of[c] for c in clips})
    index = {c: i for i, c in enumerate(classes)}
    counts = {}
    for s in ("train", "val", "test"):
        rows = [c for c in clips if assign.get(c) == s]
        if rows or s != "val":
            (dst / f"{s}.txt").write_text("".join(f"{c} {index[label_of[c]]}\n" for c in rows))
            counts[s] = len(rows)
    (dst / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return counts

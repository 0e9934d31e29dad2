"""UPMC Food-101: a food photo and the title of the recipe page it came from (101 classes).

Modalities ``("image", "text")`` (``data.modalities=[image]`` etc. for a subset):

* ``image``: [3, S, S] float, ImageNet-normalised, ``S = data.image_size`` (224). Evaluation:
  ``Resize((S, S))``. Training (``data.augment``): ``cbb`` (default, as BalanceBenchmark) random
  rotation in [-30, 30] degrees (nearest, zero fill), ``Resize((S, S))``, horizontal flip p=0.5 (the
  rotation is applied after the resize here, which is cheaper and nearly the same); ``crop``:
  ``RandomResizedCrop(S)`` + flip; ``none``: as evaluation.
* ``text``: [L] int64 token ids, ``L = data.max_length`` (40, as C-BB). The title is cleaned as in
  C-BB (leading "RT", URLs, '#' removed; see :mod:`mmbalance.data.text`). ``data.tokenizer=simple``
  (default): lower-cased words, vocabulary built from the training split (``min_freq``,
  ``max_vocab``), pad id 0, unknown id 1, and a trainable transformer text encoder (encoder hint
  ``text:<V>``). ``data.tokenizer=hf:/local/folder``: a Hugging Face tokenizer and (unless
  ``data.text_encoder`` says otherwise) the model in that folder, loaded with
  ``local_files_only=True`` -- nothing is downloaded; ``transformers`` must be installed.

Layouts under ``data.root`` (detected, or ``data.layout=kaggle|jsonl``):

* ``kaggle`` (Kaggle UPMC release, as C-BB reads it)::

      images/train/<class>/<class>_<n>.jpg      images/test/<class>/<class>_<n>.jpg
      texts/train_titles.csv                    texts/test_titles.csv

  csv rows ``image,text,label`` with or without a header row (a header is recognised by its
  column names, e.g. ``Image_path,text,label``; named columns may come in any order). The image
  field is a file name looked up as ``images/<split>/<label>/<name>`` (else a path relative to
  ``images/<split>``, a file of that name anywhere under ``images/<split>``, or a path relative
  to the root). Validation = a seeded stratified ``val_fraction`` of train.
* ``jsonl`` (MMBT style, as C-MLA): ``train.jsonl``, ``dev.jsonl`` (optional), ``test.jsonl``; one
  object per line with ``text``, ``img`` (path relative to the root) and ``label``. ``dev`` is the
  validation split; without it, a seeded stratified hold-out of train.

Classes: ``data.classes`` if given, else the sorted class folder names of ``images/train``
(``kaggle``) or the sorted set of training labels (``jsonl``); label index = position in that
sorted list (``apple_pie`` = 0 ...). A label outside the class list is an error.

Bad input (unreadable csv/jsonl line, missing image, empty text after cleaning, unknown label)
raises :class:`DataError` naming the file, line and field; with ``data.on_error=skip`` the sample
is dropped and listed in ``bundle.skipped``. Images are decoded when a sample is read (a corrupt
JPEG raises then, naming the file). ``data.cache=DIR`` stores the resized images as uint8 ``.npy``
(under ``DIR/food101/<S>/``) so later epochs skip JPEG decoding.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError, DataError
from .. import media
from ..base import DataBundle, MultimodalDataset, register_dataset, stratified_holdout
from ..text import build_tokenizer, clean_text, hf_path

MODALITIES = ("image", "text")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_HEADER_NAMES = {"image": ("image", "image_path", "img", "path", "image_id", "filename", "file", "image_name"),
                 "text": ("text", "title", "caption", "titles"),
                 "label": ("label", "class", "food", "category", "labels")}


@dataclass
class Food101Options:
    layout: str = "auto"  # auto | kaggle | jsonl
    modalities: List[str] = field(default_factory=lambda: list(MODALITIES))
    image_size: int = 224
    augment: str = "cbb"  # cbb | crop | none
    rotation: float = 30.0  # degrees of the cbb random rotation
    tokenizer: str = "simple"  # simple | hf:<local folder>
    text_encoder: str = ""  # "" = text:<V> (simple) or the tokenizer's hf folder; or any encoder kind
    image_encoder: str = "resnet18"  # encoder hint for the image (model.encoders.image overrides)
    max_length: int = 40
    min_freq: int = 1
    max_vocab: int = 0  # 0 = no cap
    classes: List[str] = field(default_factory=list)  # explicit class list (default: sorted names)
    val_fraction: float = 0.1
    val_seed: int = 0


@dataclass
class _Rows:
    images: List[Path]
    texts: List[str]
    labels: List[str]
    where: List[str]  # "file:line" of each row


# ---------------------------------------------------------------------------------------- reading
def _is_header(row: Sequence[str]) -> bool:
    cells = [c.strip().lower() for c in row]
    known = {n for names in _HEADER_NAMES.values() for n in names}
    return bool(cells) and (cells[0] in known or cells[-1] in known) and not cells[0].endswith(IMAGE_EXTS)


def _header_columns(row: Sequence[str], path: Path) -> Tuple[int, int, int]:
    cells = [c.strip().lower() for c in row]
    cols = {}
    for key, names in _HEADER_NAMES.items():
        hit = [i for i, c in enumerate(cells) if c in names]
        if hit:
            cols[key] = hit[0]
    if len(cols) == 3:
        return cols["image"], cols["text"], cols["label"]
    if len(cells) == 3:
        return 0, 1, 2
    raise DataError(f"food101: '{path}' header {list(row)} does not name the image, text and label columns")


def read_titles_csv(path: Path) -> List[Tuple[str, str, str, int]]:
    """Rows ``(image, text, label, line)`` of a Kaggle ``*_titles.csv`` (header optional)."""
    if not path.is_file():
        raise DataError(f"food101: text file '{path}' does not exist")
    out = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            cols: Optional[Tuple[int, int, int]] = None
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if cols is None:
                    if _is_header(row):
                        cols = _header_columns(row, path)
                        continue
                    cols = (0, 1, 2)
                if len(row) < 3:
                    raise DataError(f"food101: '{path}' line {line}: expected 3 fields (image,text,label), got {len(row)}: {row}")
                if cols == (0, 1, 2) and len(row) > 3:  # unquoted commas inside the title
                    row = [row[0], ",".join(row[1:-1]), row[-1]]
                out.append((row[cols[0]].strip(), row[cols[1]], row[cols[2]].strip(), line))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"food101: '{path}' is not a readable csv ({exc})") from None
    if not out:
        raise DataError(f"food101: '{path}' holds no rows")
    return out


def read_jsonl(path: Path) -> List[Tuple[str, str, str, int]]:
    """Rows ``(img, text, label, line)`` of an MMBT-style jsonl file."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"food101: '{path}' line {line} is not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"food101: '{path}' line {line}: expected an object with text, img, label")
            missing = [k for k in ("text", "img", "label") if k not in obj]
            if missing:
                raise DataError(f"food101: '{path}' line {line}: missing field(s) {missing}; has {sorted(obj)}")
            label = obj["label"]
            if isinstance(label, list):
                if len(label) != 1:
                    raise DataError(f"food101: '{path}' line {line}: field 'label' must be one class, got {label}")
                label = label[0]
            text = obj["text"] if obj["text"] is not None else ""
            out.append((str(obj["img"]), str(text), str(label).strip(), line))
    if not out:
        raise DataError(f"food101: '{path}' holds no rows")
    return out


def _list_images(folder: Path) -> set:
    """Relative posix paths of every image under ``folder`` (one walk)."""
    found = set()
    for dirpath, _, files in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for n in files:
            if n.lower().endswith(IMAGE_EXTS):
                found.add((rel / n).as_posix())
    return found


class _Problems:
    """Raise at once (on_error=raise) or collect into ``skipped``."""

    def __init__(self, on_error: str):
        self.skip = on_error == "skip"
        self.skipped: List[Dict[str, Any]] = []

    def __call__(self, split: str, where: str, field_: str, reason: str, **extra) -> None:
        msg = f"food101: {where}: field '{field_}': {reason}"
        if not self.skip:
            raise DataError(msg + " (set data.on_error=skip to drop such samples)")
        self.skipped.append({"split": split, "sample": where, "field": field_, "reason": reason, **extra})


def detect_layout(root: Path, layout: str) -> str:
    if layout not in ("auto", "kaggle", "jsonl"):
        raise ConfigError(f"data.layout must be auto, kaggle or jsonl, got '{layout}'")
    kaggle = (root / "texts" / "train_titles.csv").is_file()
    jsonl = (root / "train.jsonl").is_file()
    if layout == "auto":
        if kaggle:
            return "kaggle"
        if jsonl:
            return "jsonl"
        raise DataError(f"food101: '{root}' holds neither texts/train_titles.csv + images/ (Kaggle UPMC layout) nor "
                        "train.jsonl/dev.jsonl/test.jsonl (MMBT layout); set data.root to the dataset folder")
    return layout


def _read_kaggle(root: Path, problems: _Problems) -> Tuple[Dict[str, _Rows], List[str]]:
    rows: Dict[str, _Rows] = {}
    folder_classes: List[str] = []
    train_dir = root / "images" / "train"
    if train_dir.is_dir():
        folder_classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for split in ("train", "test"):
        csv_path = root / "texts" / f"{split}_titles.csv"
        img_dir = root / "images" / split
        if not img_dir.is_dir():
            raise DataError(f"food101: image folder '{img_dir}' does not exist (Kaggle layout: images/{{train,test}}/<class>/)")
        present = _list_images(img_dir)
        by_name: Dict[str, str] = {}
        for rel in sorted(present):
            by_name.setdefault(rel.rsplit("/", 1)[-1], rel)
        r = _Rows([], [], [], [])
        for image, text, label, line in read_titles_csv(csv_path):
            where = f"{csv_path.relative_to(root)}:{line}"
            name = Path(image).name
            cands = [f"{label}/{name}", Path(image).as_posix()]
            hit = next((c for c in cands if c in present), None) or by_name.get(name)
            if hit is not None:
                path = img_dir / hit
            elif (root / image).is_file():
                path = root / image
            else:
                problems(split, where, "image", f"image '{image}' not found (looked for {img_dir / cands[0]})", file=str(img_dir / cands[0]))
                continue
            r.images.append(path)
            r.texts.append(text)
            r.labels.append(label)
            r.where.append(where)
        rows[split] = r
    return rows, folder_classes


def _read_jsonl_layout(root: Path, problems: _Problems) -> Dict[str, _Rows]:
    rows: Dict[str, _Rows] = {}
    for split, fname in (("train", "train.jsonl"), ("val", "dev.jsonl"), ("test", "test.jsonl")):
        path = root / fname
        if not path.is_file():
            if split == "val":
                continue
            raise DataError(f"food101: '{path}' does not exist (MMBT layout: train.jsonl, dev.jsonl, test.jsonl)")
        r = _Rows([], [], [], [])
        for img, text, label, line in read_jsonl(path):
            where = f"{fname}:{line}"
            p = Path(img) if Path(img).is_absolute() else root / img
            if not p.is_file():
                problems(split, where, "img", f"image '{img}' not found ({p})", file=str(p))
                continue
            r.images.append(p)
            r.texts.append(text)
            r.labels.append(label)
            r.where.append(where)
        rows[split] = r
    return rows


# ---------------------------------------------------------------------------------------- dataset
def random_rotate(img: torch.Tensor, degrees: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """torchvision ``RandomRotation(degrees)`` (nearest, zero fill, same size) of a float [C, H, W]."""
    if degrees <= 0:
        return img
    a = math.radians(float(torch.empty(1).uniform_(-degrees, degrees, generator=generator)))
    h, w = img.shape[-2:]
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=img.dtype)
    grid = F.affine_grid(theta[None], [1, *img.shape[-3:]], align_corners=False)
    return F.grid_sample(img[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


class Food101Dataset(MultimodalDataset):
    """Image paths + pre-tokenised titles; images are decoded on access."""

    def __init__(self, images: Sequence[Path], tokens: np.ndarray, labels: np.ndarray, num_classes: int,
                 modalities: Sequence[str], image_size: int, augment: str = "none", rotation: float = 30.0,
                 cache: Optional[str] = None):
        self.images = [Path(p) for p in images]
        self.tokens = torch.as_tensor(tokens, dtype=torch.int64)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.modalities = tuple(modalities)
        self.image_size = int(image_size)
        self.augment, self.rotation = augment, float(rotation)
        self.cache = Path(cache) / "food101" / str(self.image_size) if cache else None

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def _image_uint8(self, path: Path) -> torch.Tensor:
        if self.cache is None:
            return media.load_image_uint8(path, self.image_size)
        key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
        f = self.cache / key[:2] / f"{key}.npy"
        if f.is_file():
            try:
                return torch.from_numpy(np.load(f))
            except Exception:
                pass  # a broken cache entry is rebuilt
        img = media.load_image_uint8(path, self.image_size)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img.numpy())
        os.replace(tmp, f)
        return img

    def image(self, i: int) -> torch.Tensor:
        path = self.images[i]
        if self.augment == "crop":
            img = media.random_resized_crop(media.load_image(path), self.image_size)
        else:
            img = media.to_float(self._image_uint8(path))
            if self.augment == "cbb":
                img = random_rotate(img, self.rotation)
        if self.augment in ("cbb", "crop") and bool(torch.rand(1) < 0.5):
            img = media.hflip(img)
        return media.normalize_imagenet(img)

    def get_inputs(self, i: int) -> Dict[str, torch.Tensor]:
        out = {}
        for m in self.modalities:
            out[m] = self.image(i) if m == "image" else self.tokens[i]
        return out


# ---------------------------------------------------------------------------------------- builder
@register_dataset("food101", options=Food101Options, modalities=MODALITIES, needs_root=True,
                  description="UPMC Food-101 image + recipe title (Kaggle images/+texts/ or MMBT jsonl layout)",
                  presets={"train": {"epochs": 30}, "optim": {"lr": 1e-3}, "data": {"batch_size": 64},
                           "schedule": {"name": "step", "step_size": 15, "gamma": 0.1}})
def build_food101(options: Food101Options, data_cfg=None, seed: int = 0) -> DataBundle:
    o = options or Food101Options()
    if getattr(data_cfg, "root", None) in (None, ""):
        raise DataError("food101: set data.root (or --data-root) to the Food-101 folder")
    root = Path(data_cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"food101: data.root '{root}' is not a folder")
    mods = list(o.modalities)
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods or len(set(mods)) != len(mods):
        raise ConfigError(f"food101: data.modalities must be a non-empty subset of {list(MODALITIES)}, got {mods}")
    mods = [m for m in MODALITIES if m in mods]
    if o.augment not in ("cbb", "crop", "none"):
        raise ConfigError(f"food101: data.augment must be cbb, crop or none, got '{o.augment}'")
    if o.image_size < 8:
        raise ConfigError(f"food101: data.image_size must be >= 8, got {o.image_size}")
    on_error = getattr(data_cfg, "on_error", "raise")
    problems = _Problems(on_error)
    layout = detect_layout(root, o.layout)
    folder_classes: List[str] = []
    if layout == "kaggle":
        rows, folder_classes = _read_kaggle(root, problems)
    else:
        rows = _read_jsonl_layout(root, problems)

    # classes
    if o.classes:
        classes = list(o.classes)
        if len(set(classes)) != len(classes):
            raise ConfigError(f"food101: data.classes has duplicates: {classes}")
        class_source = "data.classes"
    elif folder_classes:
        classes, class_source = folder_classes, f"the class folders of '{root / 'images' / 'train'}'"
    else:
        classes, class_source = sorted(set(rows["train"].labels)), "the training labels"
    index = {c: i for i, c in enumerate(classes)}

    # clean text, check labels
    split_data: Dict[str, Dict[str, list]] = {}
    for split, r in rows.items():
        keep = {"images": [], "texts": [], "labels": [], "where": []}
        for img, text, label, where in zip(r.images, r.texts, r.labels, r.where):
            if label not in index:
                problems(split, where, "label", f"label '{label}' is not in the class list ({len(classes)} classes "
                         f"from {class_source})", file=str(img))
                continue
            t = clean_text(text)
            if "text" in mods and not t:
                problems(split, where, "text", f"empty text (after cleaning: {text!r})", file=str(img))
                continue
            keep["images"].append(img)
            keep["texts"].append(t)
            keep["labels"].append(index[label])
            keep["where"].append(where)
        split_data[split] = keep
    for split in ("train", "test"):
        if not split_data[split]["labels"]:
            raise DataError(f"food101: no usable '{split}' samples in '{root}'")

    # validation split
    if "val" not in split_data:
        tr = split_data["train"]
        y = np.asarray(tr["labels"])
        keep_i, held_i = stratified_holdout(y, o.val_fraction, o.val_seed)
        split_data["val"] = {k: [v[i] for i in held_i] for k, v in tr.items()}
        split_data["train"] = {k: [v[i] for i in keep_i] for k, v in tr.items()}
    if not split_data["val"]["labels"]:
        raise DataError(f"food101: the validation split is empty (too few training samples per class for val_fraction={o.val_fraction})")

    # tokenizer (vocabulary from the training split only)
    tok = build_tokenizer(o.tokenizer, split_data["train"]["texts"], max_length=o.max_length,
                          min_freq=o.min_freq, max_vocab=o.max_vocab)
    cache = getattr(data_cfg, "cache", None)
    splits, train_eval = {}, None
    for split in ("train", "val", "test"):
        d = split_data[split]
        tokens = tok(d["texts"]) if d["texts"] else np.zeros((0, o.max_length), dtype=np.int64)
        aug = o.augment if split == "train" else "none"
        splits[split] = Food101Dataset(d["images"], tokens, np.asarray(d["labels"]), len(classes), mods,
                                       o.image_size, aug, o.rotation, cache)
        splits[split].where = d["where"]
        if split == "train":
            train_eval = Food101Dataset(d["images"], tokens, np.asarray(d["labels"]), len(classes), mods,
                                        o.image_size, "none", o.rotation, cache)
    hints = {}
    if "text" in mods:
        hints["text"] = o.text_encoder or (o.tokenizer if hf_path(o.tokenizer) else f"text:{tok.vocab_size}")
    if "image" in mods and o.image_encoder and o.image_encoder != "auto":
        hints["image"] = o.image_encoder
    shapes = {"image": (3, o.image_size, o.image_size), "text": (o.max_length,)}
    bundle = DataBundle("food101", tuple(mods), len(classes), splits, class_names=classes,
                        input_shapes={m: shapes[m] for m in mods}, encoder_hints=hints, train_eval=train_eval,
                        skipped=problems.skipped)
    bundle.tokenizer = tok
    return bundle

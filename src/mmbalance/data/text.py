"""Text for the text modality: cleaning, a simple word tokenizer with a vocabulary, and an optional
Hugging Face tokenizer loaded from a *local* folder (never downloaded).

Simple tokenizer (the default):

* :func:`clean_text` is the BalanceBenchmark (C-BB) Food-101 cleaning: drop a leading ``RT``,
  drop everything from an ``http(s)://`` URL to the end of the line, drop ``#``; then collapse
  white space.
* :func:`tokenize` lower-cases and splits into words (``\\w+`` runs, keeping inner apostrophes:
  ``"don't"`` is one word); punctuation is dropped.
* :class:`Vocabulary` is built from the training texts only: id 0 = ``<pad>``, id 1 = ``<unk>``,
  then every word seen at least ``min_freq`` times, most frequent first (ties alphabetical),
  optionally capped at ``max_size`` entries. :meth:`Vocabulary.encode` truncates / pads to
  ``max_length`` and returns int64 ids.

Hugging Face (``tokenizer="hf:/path/to/local/model"``): ``transformers`` is imported only then;
``AutoTokenizer.from_pretrained(path, local_files_only=True)``, truncation and padding to
``max_length``. A missing package or a path that is not a local folder gives a clear error.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError, DataError

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

_RT = re.compile(r"^RT[\s]+")
_URL = re.compile(r"https?://.*[\r\n]*")
_WORD = re.compile(r"\w+(?:'\w+)*", re.UNICODE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """C-BB cleaning (leading "RT", URLs to end of line, '#') plus white-space collapsing."""
    t = _RT.sub("", str(text))
    t = _URL.sub("", t)
    t = t.replace("#", "")
    return _SPACE.sub(" ", t).strip()


def tokenize(text: str) -> List[str]:
    """Lower-cased words of ``text`` (punctuation dropped)."""
    return _WORD.findall(str(text).lower())


class Vocabulary:
    """Word -> id map with ``<pad>`` = 0 and ``<unk>`` = 1."""

    def __init__(self, words: Sequence[str] = ()):
        self.itos: List[str] = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id = PAD_ID, UNK_ID

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1, max_size: int = 0) -> "Vocabulary":
        """From (already cleaned) training texts: words with count >= ``min_freq``, most frequent
        first, ties alphabetical; ``max_size`` > 0 caps the total size (pad and unk included)."""
        if min_freq < 1:
            raise ConfigError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(w for t in texts for w in tokenize(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        if max_size > 0:
            words = words[: max(0, max_size - 2)]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, max_length: int) -> np.ndarray:
        """int64 ids [max_length]: the first ``max_length`` words, then ``<pad>``."""
        ids = [self.stoi.get(w, UNK_ID) for w in tokenize(text)][:max_length]
        out = np.full(max_length, PAD_ID, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        out = np.full((len(texts), max_length), PAD_ID, dtype=np.int64)
        for i, t in enumerate(texts):
            out[i] = self.encode(t, max_length)
        return out

    def decode(self, ids: Iterable[int]) -> List[str]:
        """Words of ``ids`` (padding dropped; unknown words come back as ``<unk>``)."""
        return [self.itos[int(i)] for i in ids if int(i) != PAD_ID]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        try:
            itos = json.loads(Path(path).read_text())["itos"]
        except Exception as exc:
            raise DataError(f"vocabulary file '{path}' is not readable ({exc})") from None
        if itos[:2] != [PAD, UNK]:
            raise DataError(f"vocabulary file '{path}' must start with {PAD!r}, {UNK!r}")
        return cls(itos[2:])


class SimpleTokenizer:
    """Vocabulary built from training texts; ``__call__(texts) -> int64 [N, max_length]``."""

    kind = "simple"

    def __init__(self, vocab: Vocabulary, max_length: int = 40):
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}")
        self.vocab, self.max_length = vocab, int(max_length)
        self.pad_id = PAD_ID

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.vocab.encode_batch(texts, self.max_length)


def hf_path(spec: str) -> Optional[str]:
    """``"hf:/some/dir"`` -> ``"/some/dir"``; anything else -> None."""
    return spec[3:] if isinstance(spec, str) and spec.startswith("hf:") else None


def import_transformers(what: str):
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs the 'transformers' package, which is not installed "
                          "(pip install transformers), or use the built-in simple tokenizer / text encoder") from None
    return transformers


def check_local_model_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{what}: '{path}' is not a local folder; Hugging Face models are loaded only from a local "
                          "path (e.g. a folder saved with save_pretrained), never downloaded")
    return p


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (``local_files_only=True``)."""

    kind = "hf"

    def __init__(self, path: str, max_length: int = 40):
        p = check_local_model_dir(path, "Hugging Face tokenizer")
        tf = import_transformers("a Hugging Face tokenizer")
        try:
            self.tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"could not load a Hugging Face tokenizer from '{p}': {exc}") from None
        self.path, self.max_length = str(p), int(max_length)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tok(list(texts), max_length=self.max_length, truncation=True, padding="max_length")
        return np.asarray(enc["input_ids"], dtype=np.int64)


def build_tokenizer(spec: str, train_texts: Sequence[str], *, max_length: int = 40, min_freq: int = 1,
                    max_vocab: int = 0):
    """``spec`` = ``"simple"`` (vocabulary from ``train_texts``) or ``"hf:<local folder>"``."""
    path = hf_path(spec)
    if path is not None:
        return HFTokenizer(path, max_length)
    if spec != "simple":
        raise ConfigError(f"unknown tokenizer '{spec}'; use 'simple' or 'hf:<local folder>'")
    return SimpleTokenizer(Vocabulary.build(train_texts, min_freq, max_vocab), max_length)

"""Text cleaning, the simple tokenizer/vocabulary, and the text encoders."""
import sys

import numpy as np
import pytest
import torch

from mmbalance.data.text import (PAD_ID, UNK_ID, SimpleTokenizer, Vocabulary, build_tokenizer, clean_text,
                                 tokenize)
from mmbalance.errors import ConfigError
from mmbalance.models.encoders import ENCODER_NAMES, TextEncoder, build_encoder


def test_clean_text_as_cbb():
    assert clean_text("RT  Best #apple pie recipe") == "Best apple pie recipe"
    assert clean_text("Apple pie http://x.com/a?b=1 tail") == "Apple pie"  # URL to end of line (C-BB)
    assert clean_text("  many   spaces\n") == "many spaces"
    assert clean_text("ART of pie") == "ART of pie"  # only a leading "RT " is dropped


def test_tokenize_lowercase_words():
    assert tokenize("Grandma's BEST Apple-Pie, ever!") == ["grandma's", "best", "apple", "pie", "ever"]
    assert tokenize("") == []


def test_vocabulary_round_trip_and_ids():
    train = ["apple pie apple", "Apple tart", "cherry pie"]
    v = Vocabulary.build(train)
    assert v.itos[:4] == ["<pad>", "<unk>", "apple", "pie"]  # by frequency, ties alphabetical
    assert len(v) == 2 + 4
    ids = v.encode("Cherry PIE with apple", max_length=6)
    assert ids.dtype == np.int64 and ids.shape == (6,)
    assert v.decode(ids) == ["cherry", "pie", "<unk>", "apple"]
    assert list(ids[4:]) == [PAD_ID, PAD_ID]
    s = "apple tart cherry pie"
    assert v.decode(v.encode(s, 40)) == tokenize(s)
    assert list(v.encode("a b c d e f g", 3)) == [UNK_ID] * 3  # truncation


def test_vocabulary_min_freq_max_size_save_load(tmp_path):
    v = Vocabulary.build(["a a a b b c"], min_freq=2)
    assert v.itos == ["<pad>", "<unk>", "a", "b"]
    assert Vocabulary.build(["a a a b b c"], max_size=3).itos == ["<pad>", "<unk>", "a"]
    v.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").itos == v.itos
    with pytest.raises(ConfigError):
        Vocabulary.build(["x"], min_freq=0)


def test_tokenizer_batch_and_hf_errors(tmp_path, monkeypatch):
    tok = build_tokenizer("simple", ["apple pie"], max_length=4)
    assert isinstance(tok, SimpleTokenizer) and tok.vocab_size == 4
    out = tok(["pie apple", "x"])
    assert out.tolist() == [[3, 2, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        build_tokenizer("bert", ["x"])
    with pytest.raises(ConfigError, match="not a local folder"):
        build_tokenizer("hf:/no/such/folder", ["x"])
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ConfigError, match="transformers"):
        build_tokenizer(f"hf:{tmp_path}", ["x"])
    with pytest.raises(ConfigError, match="transformers"):
        build_encoder((8,), f"hf:{tmp_path}")


def test_text_encoder_padding_mask_and_builder():
    torch.manual_seed(0)
    enc = build_encoder((6,), "text:10", feature_dim=8, hidden_dim=16)
    assert isinstance(enc, TextEncoder) and enc.out_dim == 8
    enc.eval()
    x = torch.tensor([[2, 3, 4, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    z = enc(x)
    assert z.shape == (2, 8) and torch.isfinite(z).all()
    # padding does not change the features of the real tokens
    x2 = torch.tensor([[2, 3, 4, 0, 0, 0]])
    enc_short = enc(x2)
    assert torch.allclose(z[:1], enc_short, atol=1e-5)
    z.sum().backward()
    assert "text" in ENCODER_NAMES and "text:10" in ENCODER_NAMES and "hf:/x" in ENCODER_NAMES
    assert "bogus" not in ENCODER_NAMES
    with pytest.raises(ConfigError, match="vocabulary size"):
        build_encoder((6,), "text")
    with pytest.raises(ConfigError, match="token ids"):
        build_encoder((6, 3), "text:10")

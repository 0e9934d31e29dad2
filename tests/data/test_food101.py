"""Food-101 in the Kaggle UPMC layout and the MMBT jsonl layout, with real JPEGs written here."""
import json
import sys

import pytest
import torch
from PIL import Image

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.data import build_dataset
from mmbalance.errors import ConfigError, DataError

CLASSES = ["baklava", "apple_pie", "caesar_salad"]  # sorted order: apple_pie, baklava, caesar_salad
COLOURS = {"apple_pie": (200, 120, 40), "baklava": (230, 200, 60), "caesar_salad": (60, 180, 60)}


def jpeg(path, colour, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def make_kaggle(root, n_train=4, n_test=2, header=False):
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = ["image_path,text,label"] if header and split == "test" else []
        for c in CLASSES:
            for k in range(n):
                name = f"{c}_{k}.jpg"
                jpeg(root / "images" / split / c / name, COLOURS[c])
                title = f"RT Best {c.replace('_', ' ')} recipe #{k} http://food.example/{c}"
                rows.append(f'{name},"{title}",{c}')
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n")
    return root


def make_jsonl(root):
    for split, n in (("train", 4), ("dev", 1), ("test", 2)):
        lines = []
        for c in CLASSES:
            for k in range(n):
                rel = f"images/{split}/{c}/{c}_{k}.jpg"
                jpeg(root / rel, COLOURS[c])
                lines.append(json.dumps({"text": f"Tasty {c} number {k}", "img": rel, "label": c}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def build(root, on_error="raise", extra=(), **opts):
    cfg = resolve_config("food101", "joint", None, [f"data.root={root}", f"data.on_error={on_error}",
                                                     "data.image_size=16"] +
                         [f"data.{k}={v}" for k, v in opts.items()] + list(extra))
    return build_dataset("food101", cfg.data_options, cfg.data)


@pytest.fixture
def kaggle(tmp_path):
    return make_kaggle(tmp_path / "food", header=True)


def test_kaggle_layout_shapes_labels_splits(kaggle):
    b = build(kaggle)
    assert b.class_names == ["apple_pie", "baklava", "caesar_salad"]
    assert b.modalities == ("image", "text") and b.num_classes == 3
    assert [len(b.splits[s]) for s in ("train", "val", "test")] == [9, 3, 6]  # 1 val per class
    assert b.input_shapes == {"image": (3, 16, 16), "text": (40,)}
    assert b.encoder_hints["text"] == f"text:{b.tokenizer.vocab_size}"
    s = b.test[0]
    assert s["inputs"]["image"].shape == (3, 16, 16) and s["inputs"]["image"].dtype == torch.float32
    assert s["inputs"]["text"].shape == (40,) and s["inputs"]["text"].dtype == torch.int64
    # labels = position in the sorted class list; test csv (with header) order is kept
    assert b.test.labels.tolist() == [1, 1, 0, 0, 2, 2]
    assert b.test.images[0].name == "baklava_0.jpg"
    # cleaned title, tokenised: "RT", '#', URL gone
    words = b.tokenizer.vocab.decode(b.test.tokens[0].tolist())
    assert words == ["best", "baklava", "recipe", "0"]
    # image content: ImageNet-normalised colour of the class
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb = (b.test[0]["inputs"]["image"] * std + mean).mean(dim=(1, 2)) * 255
    assert torch.allclose(rgb, torch.tensor(COLOURS["baklava"], dtype=torch.float32), atol=6)
    # train split augments, train_eval does not; val is disjoint from train
    assert torch.equal(b.train_eval[0]["inputs"]["image"], b.train_eval[0]["inputs"]["image"])
    assert not set(map(str, b.val.images)) & set(map(str, b.train.images))


def test_header_optional_and_jsonl_layout(tmp_path):
    a = build(make_kaggle(tmp_path / "a", header=False))
    b = build(make_kaggle(tmp_path / "b", header=True))
    assert a.test.labels.tolist() == b.test.labels.tolist()
    assert torch.equal(a.test.tokens, b.test.tokens)
    j = build(make_jsonl(tmp_path / "j"))
    assert [len(j.splits[s]) for s in ("train", "val", "test")] == [12, 3, 6]  # dev.jsonl = val
    assert j.class_names == ["apple_pie", "baklava", "caesar_salad"]
    assert j.val.labels.tolist() == [1, 0, 2]
    assert j.tokenizer.vocab.decode(j.val.tokens[0].tolist()) == ["tasty", "baklava", "number", "0"]


def test_options_subset_maxlen_cache(kaggle, tmp_path):
    b = build(kaggle, modalities="[text]", max_length=5, min_freq=2)
    assert b.modalities == ("text",) and b.input_shapes == {"text": (5,)}
    assert set(b.train[0]["inputs"]) == {"text"}
    assert "caesar" in b.tokenizer.vocab and "recipe" in b.tokenizer.vocab
    cache = tmp_path / "cache"
    c = build(kaggle, extra=[f"data.cache={cache}"], modalities="[image]")
    first = c.test[2]["inputs"]["image"]
    assert len(list(cache.rglob("*.npy"))) == 1
    assert torch.equal(first, c.test[2]["inputs"]["image"])
    with pytest.raises(ConfigError, match="data.modalities"):
        build(kaggle, modalities="[image,audio]")
    with pytest.raises(ConfigError, match="data.augment"):
        build(kaggle, augment="mixup")


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="neither texts/train_titles.csv"):
        build(tmp_path)
    root = make_kaggle(tmp_path / "f")
    (root / "images" / "test" / "baklava" / "baklava_1.jpg").unlink()
    with pytest.raises(DataError, match=r"test_titles.csv:2: field 'image': image 'baklava_1.jpg' not found"):
        build(root)
    b = build(root, on_error="skip")
    assert len(b.test) == 5 and b.skipped[0]["field"] == "image" and b.skipped[0]["split"] == "test"
    # label outside the class list
    make_kaggle(root)
    lines = (root / "texts" / "test_titles.csv").read_text().splitlines()
    lines[0] = lines[0].replace(",baklava", ",pizza")
    (root / "texts" / "test_titles.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_titles.csv:1: field 'label': label 'pizza' is not in the class list"):
        build(root)
    assert build(root, on_error="skip").skipped[0]["field"] == "label"
    # empty text after cleaning
    make_kaggle(root)
    lines = (root / "texts" / "train_titles.csv").read_text().splitlines()
    lines[2] = 'baklava_2.jpg,"RT # http://x.y/z",baklava'
    (root / "texts" / "train_titles.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train_titles.csv:3: field 'text': empty text"):
        build(root)
    assert build(root, modalities="[image]").num_classes == 3  # text not used: no error
    # malformed csv row
    make_kaggle(root)
    with open(root / "texts" / "train_titles.csv", "a") as f:
        f.write("just_one_field.jpg\n")
    with pytest.raises(DataError, match="line 13: expected 3 fields"):
        build(root)
    # missing text file
    make_kaggle(root)
    (root / "texts" / "test_titles.csv").unlink()
    with pytest.raises(DataError, match="test_titles.csv' does not exist"):
        build(root)
    # jsonl: bad JSON, missing field, missing image
    j = make_jsonl(tmp_path / "j")
    (j / "dev.jsonl").write_text('{"text": "x", "img": "images/dev/baklava/baklava_0.jpg", "label": "baklava"}\n{oops\n')
    with pytest.raises(DataError, match="dev.jsonl' line 2 is not valid JSON"):
        build(j)
    (j / "dev.jsonl").write_text('{"text": "x", "label": "baklava"}\n')
    with pytest.raises(DataError, match=r"line 1: missing field\(s\) \['img'\]"):
        build(j)
    (j / "dev.jsonl").write_text('{"text": "x", "img": "nope.jpg", "label": "baklava"}\n')
    with pytest.raises(DataError, match="dev.jsonl:1: field 'img': image 'nope.jpg' not found"):
        build(j)
    # a corrupt JPEG fails when read, naming the file
    (j / "dev.jsonl").unlink()
    (j / "images" / "test" / "baklava" / "baklava_0.jpg").write_bytes(b"not a jpeg")
    b = build(j)
    with pytest.raises(DataError, match="baklava_0.jpg' could not be decoded"):
        b.test[0]


def test_hf_tokenizer_needs_local_folder_and_transformers(kaggle, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not a local folder"):
        build(kaggle, tokenizer="hf:/no/such/model")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match="transformers"):
        build(kaggle, tokenizer=f"hf:{tmp_path}")


def test_train_end_to_end(kaggle, tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        rc = main(["train", "--dataset", "food101", "--data-root", str(kaggle), "--method", "joint", "--out", str(out),
                   "--quiet", "epochs=2", "data.image_size=16", "data.image_encoder=cnn", "model.feature_dim=8",
                   "model.hidden_dim=16", "data.batch_size=4", "train.progress=off", "train.threads=1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["dataset"] == "food101" and res["modalities"] == ["image", "text"]
    assert 0.0 <= res["test"]["accuracy"] <= 1.0

import warnings

import numpy as np
import pytest
import torch

from mmbalance.data.base import DataBundle, TensorMultimodalDataset
from mmbalance.data.checks import check_bundle
from mmbalance.errors import DataError


def bundle(train=(0, 1, 2, 0, 1, 2), val=(0, 1), test=(2, 1), k=3, shapes=None, class_names=None):
    shapes = shapes or {"a": (4,), "b": (2, 3)}
    splits = {s: TensorMultimodalDataset({m: torch.zeros(len(y), *shp) for m, shp in shapes.items()},
                                         np.array(y, dtype=np.int64), k)
              for s, y in (("train", train), ("val", val), ("test", test))}
    return DataBundle("toy", tuple(shapes), k, splits, class_names=class_names)


def test_good_bundle_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_bundle(bundle(class_names=["x", "y", "z"]))


def test_zero_width_modality():
    with pytest.raises(DataError, match=r"dataset 'toy': modality 'b' is zero-width: per-sample shape \[2, 0\]"):
        check_bundle(bundle(shapes={"a": (4,), "b": (2, 0)}))


def test_class_names_length_mismatch():
    with pytest.raises(DataError, match="class_names has 2 names but num_classes is 3"):
        check_bundle(bundle(class_names=["x", "y"]))


def test_fewer_than_two_classes():
    with pytest.raises(DataError, match="num_classes is 1; classification needs at least 2"):
        check_bundle(bundle(train=(0, 0), val=(0,), test=(0,), k=1))


def test_single_class_in_train():
    with pytest.raises(DataError, match=r"train split has rows of 1 class\(es\) \(present: 2 \('z'\)\)"):
        check_bundle(bundle(train=(2, 2, 2), class_names=["x", "y", "z"]))


def test_label_out_of_range():
    with pytest.raises(DataError, match="split 'test' has label 3 at index 1; labels must be in 0..2"):
        check_bundle(bundle(test=(0, 3)))


def test_class_without_train_rows_warns():
    with pytest.warns(UserWarning, match=r"class\(es\) 2 \('z'\) have no train rows"):
        check_bundle(bundle(train=(0, 1, 0, 1), class_names=["x", "y", "z"]))


def test_label_gap_warns():
    with pytest.warns(UserWarning, match=r"label gap: class\(es\) 1, 3 have no rows in any split"):
        check_bundle(bundle(train=(0, 2, 0, 2), val=(0,), test=(2,), k=4))

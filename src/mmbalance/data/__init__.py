from .base import DATASETS, DataBundle, MultimodalDataset, TensorMultimodalDataset, register_dataset
from .batch import Batch, Sample, collate

__all__ = ["Batch", "Sample", "collate", "DATASETS", "DataBundle", "MultimodalDataset",
           "TensorMultimodalDataset", "register_dataset", "build_dataset"]


def build_dataset(name: str, options, data_cfg, seed: int = 0) -> DataBundle:
    from . import datasets  # noqa: F401  (registers the built-in datasets)
    return DATASETS.get(name)(options, data_cfg, seed)

from .base import DATASETS, DataBundle, MultimodalDataset, TensorMultimodalDataset, register_dataset
from .batch import Batch, Sample, collate
from .adapters import DatasetAdapter, from_arrays, from_datasets

__all__ = ["Batch", "Sample", "collate", "DATASETS", "DataBundle", "MultimodalDataset",
           "TensorMultimodalDataset", "register_dataset", "build_dataset", "DatasetAdapter", "from_arrays",
           "from_datasets"]


def build_dataset(name: str, options, data_cfg, seed: int = 0) -> DataBundle:
    from ..config import dataset_entry
    entry = dataset_entry(name)
    if options is None and entry.meta.get("options") is not None:
        options = entry.meta["options"]()
    return entry.obj(options, data_cfg, seed)

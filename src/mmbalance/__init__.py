"""mmbalance: balanced multimodal learning in PyTorch.

The public surface, for your own data, model and loop (README: "Your own model and data"):

* data: :func:`from_datasets` / :func:`from_arrays` -> a :class:`DataBundle`;
* model: :meth:`MultimodalModel.from_encoders` (your encoders, a library fusion);
* config: :func:`make_config` (a method and overrides; no dataset presets);
* training: :class:`Trainer` (``Trainer(cfg, out, model=..., data=...).fit()``) or
  :func:`build_run` to get the parts the command line would build;
* your own loop: :func:`make_method`, :func:`prepare_model`, :func:`optimizer_groups`,
  :func:`make_context`.
"""
__version__ = "0.1.0"

from .config import Config, resolve_config
from .data import DataBundle, from_arrays, from_datasets
from .models.multimodal import MultimodalModel
from .training.build import RunParts, build_run, make_config, make_method, optimizer_groups, prepare_model
from .training.loop import make_context
from .training.trainer import Trainer

__all__ = ["Config", "resolve_config", "DataBundle", "from_arrays", "from_datasets", "MultimodalModel",
           "RunParts", "build_run", "make_config", "make_method", "optimizer_groups", "prepare_model", "make_context", "Trainer"]

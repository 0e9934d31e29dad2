"""Assembly: a config (and optionally your own data and model) -> the parts a run trains.

The command line calls :func:`build_run` with a config; from Python you may hand in your own
:class:`~mmbalance.data.base.DataBundle` (see :mod:`mmbalance.data.adapters`) and your own
:class:`~mmbalance.models.multimodal.MultimodalModel` (see ``MultimodalModel.from_encoders``).
The trainer only takes parts; it never reads a dataset or model name itself.

A method gets its say over the model here, whoever built it (:func:`attach_method`): unimodal
heads are added when the method switches them on, its own fusion replaces the model's, the
method may rebuild it (``Method.rebuild_model``: mid-level fusion between encoder stages), and its
extra modules are attached as ``model.extras``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

import torch
from torch import nn

from ..config import Config, resolve_config
from ..data import build_dataset
from ..data.base import DataBundle, Subset, stratified_holdout
from ..errors import ConfigError, MethodSetupError
from ..methods import build_method
from ..methods.base import Method
from ..models import build_model
from ..models.multimodal import MultimodalModel

#: ``data.name`` prefix of runs whose data was handed in from Python
CUSTOM_DATA = "custom"


@dataclass
class RunParts:
    """Everything one run trains: the resolved config, the data, the method and the model."""

    cfg: Config
    data: DataBundle
    method: Method
    model: MultimodalModel


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def describe_model(model: MultimodalModel) -> str:
    encs = ", ".join(f"{m}={type(e).__name__}" for m, e in model.encoders.items())
    return f"{type(model).__name__}(encoders: {encs}; fusion: {type(model.fusion).__name__})"


def attach_method(method: Method, model: MultimodalModel, model_cfg: Any) -> MultimodalModel:
    """Let ``method`` adapt ``model``: heads if it needs them, its own fusion, a rebuilt model
    (``Method.rebuild_model``, e.g. cross-modal blocks between encoder stages), its extra modules.
    ``method.configure_model(model_cfg)`` must have run before (it may switch the heads on).
    Returns the model to train -- a new object when the method rebuilt it; use the return value."""
    if not isinstance(model, MultimodalModel):
        raise ConfigError(f"the model must be a mmbalance MultimodalModel (build one from your encoders with "
                          f"MultimodalModel.from_encoders), got {type(model).__name__}")
    if set(model.modalities) != set(method.modalities):
        raise ConfigError(f"the model's modalities {list(model.modalities)} differ from the data's "
                          f"{list(method.modalities)}")
    if model.num_classes != method.num_classes:
        raise ConfigError(f"the model predicts {model.num_classes} classes but the data has {method.num_classes}")
    if getattr(model_cfg, "unimodal_heads", False):
        model.add_heads()
    fusion = method.build_fusion(dict(model.feature_dims), model.num_classes, model_cfg)
    if fusion is not None:
        model.fusion = fusion
    rebuilt = method.rebuild_model(model)
    if rebuilt is not None:
        if not isinstance(rebuilt, MultimodalModel):
            raise MethodSetupError(f"method '{method.name}': rebuild_model must return a MultimodalModel, got "
                                   f"{type(rebuilt).__name__}")
        if list(rebuilt.modalities) != list(model.modalities) or rebuilt.num_classes != model.num_classes:
            raise MethodSetupError(f"method '{method.name}': rebuild_model changed the modalities or classes "
                                   f"({list(model.modalities)}, {model.num_classes} -> {list(rebuilt.modalities)}, "
                                   f"{rebuilt.num_classes})")
        model = rebuilt
    extras = method.extra_modules(model)
    if extras:
        model.extras = nn.ModuleDict(extras)
    return model


def prepare_model(method: Method, model: MultimodalModel, model_cfg: Any = None) -> MultimodalModel:
    """For your own loop: ``method.configure_model`` + :func:`attach_method` on your model."""
    from ..config import ModelConfig
    model_cfg = copy.deepcopy(model_cfg) if model_cfg is not None else ModelConfig()
    method.configure_model(model_cfg)
    return attach_method(method, model, model_cfg)


def optimizer_groups(method: Method, model: MultimodalModel, lr: float):
    """What to hand an optimiser: the method's parameter groups (``Method.param_groups``) with
    each group's ``lr_scale`` turned into ``lr = lr * lr_scale``, or all trainable parameters.
    The trainer uses it; in your own loop: ``torch.optim.SGD(optimizer_groups(method, model, lr), lr=lr)``."""
    groups = method.param_groups(model)
    if groups is None:
        return [p for p in model.parameters() if p.requires_grad]
    out = []
    names = [g["name"] for g in groups if "name" in g]
    bad = [n for n in names if not isinstance(n, str)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if bad or dup:
        raise MethodSetupError(f"method '{method.name}': parameter-group names must be unique strings "
                               f"(got {'duplicates ' + str(dup) if dup else 'non-strings ' + str(bad)})")
    for g in groups:
        g = dict(g)
        scale = g.pop("lr_scale", None)
        if scale is not None:
            g["lr"] = lr * float(scale)
        out.append(g)
    return out


def holdout_seed(seed: int) -> int:
    """The seed of the method holdout's stratified draw (a stream of its own, fixed by ``train.seed``)."""
    return (seed * 1_000_003 + 4099) % (2**32)


def carve_holdout(data: DataBundle, fraction: float, seed: int) -> Tuple[DataBundle, Optional[Subset]]:
    """Remove a stratified, seeded ``fraction`` of the training split for a method (gap B).

    Returns a shallow copy of ``data`` whose ``train`` and ``train_eval`` hold only the kept rows
    (re-numbered 0..n-1: ``batch.index`` and ``train_size`` refer to them) and the held-out rows
    as a dataset with EVAL transforms (a view of ``train_eval``). ``fraction`` 0 -> ``(data, None)``.
    The same labels, fraction and seed always give the same rows (resume holds out the same).
    """
    fraction = float(fraction)
    if fraction == 0.0:
        return data, None
    if not 0.0 < fraction < 0.5:
        raise ConfigError(f"the method holdout must be a fraction in [0, 0.5) of the training split, got {fraction}")
    labels = np.asarray(data.train.labels)
    keep, held = stratified_holdout(labels, fraction, holdout_seed(seed))
    if len(held) == 0 or len(keep) == 0:
        raise ConfigError(f"a method holdout of {fraction} leaves no rows on one side ({len(keep)} kept, "
                          f"{len(held)} held out of {len(labels)}); use a larger fraction or more data")
    train_eval = data.train_eval if data.train_eval is not None else data.train
    splits = dict(data.splits)
    splits["train"] = Subset(data.train, keep)
    carved = dataclasses.replace(data, splits=splits, train_eval=Subset(train_eval, keep))
    return carved, Subset(train_eval, held)


def make_config(method: str = "joint", overrides: Sequence[str] = (), config_file: Optional[str] = None,
                dataset: str = CUSTOM_DATA) -> Config:
    """A config for a method on your own data: defaults, the method's generic presets, then
    ``config_file`` and dotted ``overrides`` (``["epochs=5", "method.alpha=0.5"]``)."""
    return resolve_config(dataset, method, config_file, overrides)


def make_method(name: str, modalities: Sequence[str], num_classes: int, dataset: Optional[str] = None,
                **options: Any) -> Method:
    """A registered method with validated options (the method's presets for ``dataset``, or its
    generic ones, then ``options``)."""
    cfg = resolve_config(dataset or CUSTOM_DATA, name, tree={"method": options})
    return build_method(name, cfg.method_options, modalities, num_classes)


def build_run(cfg: Config, *, data: Optional[DataBundle] = None,
              model: Optional[MultimodalModel] = None) -> RunParts:
    """Turn a config into parts. ``data`` / ``model`` replace what the config would build; the
    returned config records that they came from Python (``data.name: custom:<name>``,
    ``model.custom: <description>``) so the run folder never claims another dataset or model."""
    from ..data.checks import check_bundle
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    if data is None:
        if cfg.data.name.startswith(CUSTOM_DATA):
            raise ConfigError(f"data.name is '{cfg.data.name}': this run's data was handed in from Python and "
                              f"cannot be rebuilt from the config; pass it again: Trainer(cfg, out, data=..., model=...)")
        seed_everything(t.seed)
        data = build_dataset(cfg.data.name, cfg.data_options, cfg.data, t.seed)
    else:
        if not isinstance(data, DataBundle):
            raise ConfigError(f"data must be a DataBundle (see mmbalance.data.from_datasets / from_arrays), "
                              f"got {type(data).__name__}")
        cfg.data.name = CUSTOM_DATA if data.name == CUSTOM_DATA else f"{CUSTOM_DATA}:{data.name}"
        cfg.data_options = None
    check_bundle(data)
    method = build_method(cfg.method.name, cfg.method_options, data.modalities, data.num_classes)
    method.data_name = cfg.data.name
    method.configure_model(cfg.model)
    unknown = [m for m in cfg.model.encoders if m not in data.modalities]
    if unknown:
        raise ConfigError(f"model.encoders names unknown modalities {unknown}; this dataset has {list(data.modalities)}")
    seed_everything(t.seed)
    if model is None:
        if cfg.model.custom:
            raise ConfigError(f"model.custom is '{cfg.model.custom}': this run's model was built in Python; "
                              f"pass it again: Trainer(cfg, out, model=...)")
        model = build_model(data.modalities, data.input_shapes, data.num_classes, cfg.model, data.encoder_hints)
    else:
        cfg.model.custom = describe_model(model)
    model = attach_method(method, model, cfg.model)
    return RunParts(cfg, data, method, model)

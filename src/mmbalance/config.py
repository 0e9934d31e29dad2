"""One typed config tree: defaults -> dataset preset -> method preset -> YAML -> dotted overrides.

Every section is a dataclass. The ``data`` and ``method`` sections also accept the options of the
chosen dataset / method (each declares its own options dataclass), so ``method.alpha=0.5`` is
validated against the method's own fields. All problems are collected and reported together,
with suggestions, before anything is built.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import yaml

from .errors import ConfigError
from .registry import suggest


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: Optional[str] = None
    batch_size: int = 64
    eval_batch_size: int = 256
    #: DataLoader worker processes; -1 = auto: 0 on CPU (and for in-memory tensor datasets, which
    #: are sliced directly), min(4, cores - 1) on CUDA (with pinned memory)
    num_workers: int = -1
    on_error: str = "raise"  # raise | skip (datasets that read files)
    cache: Optional[str] = None  # input cache directory (datasets that decode media)
    #: fraction of train held out for the method (stratified by label, seeded by train.seed; the
    #: method reads it via ctx.holdout_batches()); 0 = the method's own Method.holdout_fraction()
    method_holdout: float = 0.0

    def validate(self):
        errs = []
        if self.batch_size < 1 or self.eval_batch_size < 1:
            errs.append("batch sizes must be >= 1")
        if not 0.0 <= self.method_holdout < 0.5:
            errs.append(f"method_holdout must be a fraction in [0, 0.5) of the training split (0 = none), "
                        f"got {self.method_holdout}")
        if self.num_workers < -1:
            errs.append(f"num_workers must be >= 0, or -1 for auto, got {self.num_workers}")
        if self.on_error not in ("raise", "skip"):
            errs.append(f"on_error must be 'raise' or 'skip', got '{self.on_error}'")
        return errs


@dataclass
class ModelConfig:
    fusion: str = "concat"  # concat | sum | late | film | gated
    encoder: str = "auto"  # auto | mlp | transformer | gru | tcn | cnn | resnet18 | text:V | hf:<dir>
    encoders: Dict[str, str] = field(default_factory=dict)  # per-modality override
    feature_dim: int = 64  # output size of the small encoders (ResNet-18: 512)
    hidden_dim: int = 128
    fusion_hidden: int = 128  # FiLM / gated hidden size
    dropout: float = 0.0
    unimodal_heads: bool = False  # methods that need heads switch this on themselves
    small_input: bool = False  # ResNet-18 stem for small images (3x3 conv, no max-pool)
    #: channels-last memory format for conv encoders (faster with several threads and on GPU;
    #: numerically equivalent, not bit-identical: measured up to 1e-6 in a forward and 2e-5 in
    #: gradients against the contiguous layout; no effect on MLP / sequence encoders)
    channels_last: bool = True
    #: set by the trainer when the model was built in Python (its description); not a user key
    custom: Optional[str] = None

    def validate(self):
        from .models.encoders import ENCODER_NAMES
        from .models.fusion import FUSIONS
        errs = []
        if self.fusion not in FUSIONS:
            errs.append(f"unknown fusion '{self.fusion}'.{suggest(self.fusion, FUSIONS.names())} Choose from {', '.join(FUSIONS.names())}")
        for where, enc in [("encoder", self.encoder)] + [(f"encoders.{m}", e) for m, e in self.encoders.items()]:
            if enc not in ENCODER_NAMES:
                errs.append(f"unknown {where} '{enc}'.{suggest(enc, list(ENCODER_NAMES))} Choose from {', '.join(ENCODER_NAMES)}")
        if self.feature_dim < 1 or self.hidden_dim < 1 or self.fusion_hidden < 1:
            errs.append("feature_dim, hidden_dim and fusion_hidden must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            errs.append(f"dropout must be in [0, 1), got {self.dropout}")
        return errs


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)

    def validate(self):
        errs = []
        if self.name not in OPTIMIZERS:
            errs.append(f"unknown optimiser '{self.name}'.{suggest(self.name, list(OPTIMIZERS))} Choose from {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            errs.append(f"lr must be > 0, got {self.lr}")
        if self.momentum < 0:
            errs.append(f"momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            errs.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            errs.append(f"betas must each be in [0, 1), got {list(self.betas)}")
        return errs


@dataclass
class ScheduleConfig:
    name: str = "none"  # none | step | cosine
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0  # linear warm-up (cosine and step)

    def validate(self):
        errs = []
        if self.name not in SCHEDULES:
            errs.append(f"unknown schedule '{self.name}'.{suggest(self.name, list(SCHEDULES))} Choose from {', '.join(SCHEDULES)}")
        if self.step_size < 1:
            errs.append(f"step_size must be >= 1 (epochs between decays), got {self.step_size}")
        if not self.gamma > 0:
            errs.append(f"gamma must be > 0, got {self.gamma}")
        if self.warmup_epochs < 0:
            errs.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        return errs


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    deterministic: bool = True
    early_stopping: int = 0  # patience in epochs on val accuracy; 0 = off
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    #: fp32 | bf16 (bf16 autocast, opt-in: changes gradients) | fp16 (fp16 autocast with a
    #: GradScaler; CUDA only). Gradient-editing methods compute their coefficients in fp32 either
    #: way. ``train.bf16=true`` (the old key) still works: it means precision=bf16.
    precision: str = "fp32"
    progress: str = "auto"  # auto (only on a TTY) | on | off
    tensorboard: bool = False
    eval_every: int = 1
    threads: int = 0  # torch intra-op threads; 0 = auto (1 for small models on CPU, see Trainer)
    diagnose: bool = False  # at the end: mmbalance diagnose on the best checkpoint -> diagnostics.json
    #: at the end: each modality's linear-probe accuracy on test (a logistic regression on the frozen
    #: encoder's train features; one extra forward pass over train) -> result.json
    probe: bool = True

    def validate(self):
        errs = []
        if self.epochs < 1:
            errs.append(f"epochs must be >= 1, got {self.epochs}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            errs.append(f"device must be cpu, cuda, cuda:N or auto, got '{self.device}'")
        if self.precision not in PRECISIONS:
            errs.append(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.progress not in ("auto", "on", "off"):
            errs.append(f"progress must be auto, on or off, got '{self.progress}'")
        if self.eval_every < 1:
            errs.append(f"eval_every must be >= 1 (evaluate every N epochs), got {self.eval_every}")
        if self.early_stopping < 0:
            errs.append(f"early_stopping must be >= 0 (0 = off), got {self.early_stopping}")
        if self.grad_clip < 0:
            errs.append(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.threads < 0:
            errs.append(f"threads must be >= 0 (0 = auto), got {self.threads}")
        return errs


@dataclass
class MethodConfig:
    name: str = "joint"


SECTIONS: Dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "method": MethodConfig,
}

#: top-level shortcuts accepted on the command line (``epochs=5 seed=1``)
ALIASES = {"epochs": "train.epochs", "seed": "train.seed", "lr": "optim.lr",
           "batch_size": "data.batch_size", "fusion": "model.fusion"}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    #: options of the chosen dataset / method (typed dataclass instances)
    data_options: Any = None
    method_options: Any = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name in SECTIONS:
            sec = dataclasses.asdict(getattr(self, name))
            extra = {"data": self.data_options, "method": self.method_options}.get(name)
            if extra is not None:
                sec.update(dataclasses.asdict(extra))
            out[name] = _plain(sec)
        return out


def upgrade_legacy_keys(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """Map keys of older configs to today's (a saved ``config.yaml`` still resolves and resumes):
    ``train.bf16`` (bool, before ``train.precision``) -> ``train.precision=bf16`` when true; the old
    key is dropped. Refuses ``train.bf16=true`` together with another explicit precision."""
    train = tree.get("train") if isinstance(tree, Mapping) else None
    if not isinstance(train, Mapping) or "bf16" not in train:
        return dict(tree) if isinstance(tree, Mapping) else tree
    out = dict(tree)
    train = dict(train)
    old = train.pop("bf16")
    on = old.parsed() if isinstance(old, RawValue) else old
    if isinstance(on, str):
        on = on.lower() in ("true", "yes", "on", "1")
    if on:
        now = train.get("precision")
        now = now.parsed() if isinstance(now, RawValue) else now
        if now not in (None, "bf16"):
            raise ConfigError(f"train.bf16=true (the old key for train.precision=bf16) conflicts with "
                              f"train.precision={now}; give only train.precision")
        train["precision"] = "bf16"
    out["train"] = train
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def defaults_dict(cls: type) -> Dict[str, Any]:
    return _plain(dataclasses.asdict(cls()))


def deep_merge(base: Dict[str, Any], other: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> Tuple[List[str], Any]:
    """``method.alpha=0.5`` -> (["method", "alpha"], 0.5). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"Override '{item}' is not of the form key=value (e.g. method.alpha=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override '{item}' has an empty key")
    key = ALIASES.get(key, key)
    return key.split("."), RawValue(raw)


class RawValue(str):
    """A command-line value, parsed according to the type of the field it sets."""

    def parsed(self) -> Any:
        try:
            return yaml.safe_load(str(self)) if self.strip() != "" else ""
        except yaml.YAMLError:
            return str(self)


def flatten_tree(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty dicts stay leaves)."""
    out: Dict[str, Any] = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_tree(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(tree: Dict[str, Any], flat: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``tree`` with every dotted key of ``flat`` set (``{"a.b": 1}`` -> ``tree["a"]["b"] = 1``)."""
    import copy
    tree = copy.deepcopy(tree)
    for k, v in flat.items():
        node = tree
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def overrides_to_dict(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        path, value = parse_override(item)
        if len(path) == 1:
            raise ConfigError(
                f"Override '{item}': '{path[0]}' is not a config key.{suggest(path[0], list(ALIASES) + list(SECTIONS))} "
                f"Use section.key=value (sections: {', '.join(SECTIONS)}) or one of {', '.join(ALIASES)}."
            )
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}' conflicts with another override")
        node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    out: Dict[str, Any] = {}
    for k, v in data.items():
        k = ALIASES.get(k, k)
        if "." in k:
            sec, key = k.split(".", 1)
            out = deep_merge(out, {sec: {key: v}})
        else:
            out = deep_merge(out, {k: v})
    return out


# ----------------------------------------------------------------------------------------- typing
def _coerce(value: Any, tp: Any, where: str, errors: List[str]) -> Any:
    if isinstance(value, RawValue):
        value = str(value) if tp is str or (typing.get_origin(tp) is typing.Union and str in typing.get_args(tp)
                                            and value.strip() not in ("none", "None", "null", "~")) else value.parsed()
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value in ("none", "None", "null") and type(None) in args:
            return None
        return _coerce(value, inner[0], where, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        errors.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            errors.append(f"{where}: expected an integer, got {value!r}")
            return value
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            errors.append(f"{where}: expected a string, got {value!r}")
            return value
        return str(value)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", errors) for i, v in enumerate(value))
        if args and len(value) != len(args):
            errors.append(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(value)
        return tuple(_coerce(v, a, f"{where}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return value
        inner = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, inner, f"{where}.{k}", errors) for k, v in value.items()}
    return value


def build_dataclass(cls: Type, values: Mapping[str, Any], where: str, errors: List[str]) -> Any:
    """Create ``cls`` from ``values``; unknown keys and bad types are appended to ``errors``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            errors.append(f"unknown key '{where}.{k}'.{suggest(k, names)} Valid keys: {', '.join(names)}")
            continue
        local: List[str] = []
        value = _coerce(v, hints[k], f"{where}.{k}", local)
        if local:
            errors.extend(local)
        else:
            kwargs[k] = value
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: {exc}")
        return cls()
    validate = getattr(obj, "validate", None)
    if callable(validate):
        for msg in validate() or []:
            errors.append(f"{where}: {msg}")
    return obj


def split_section(values: Mapping[str, Any], base_cls: type) -> Tuple[Dict, Dict]:
    """Split a section into the keys of ``base_cls`` and the rest (the dataset/method options)."""
    base_names = {f.name for f in fields(base_cls)}
    base = {k: v for k, v in values.items() if k in base_names}
    rest = {k: v for k, v in values.items() if k not in base_names}
    return base, rest


def check_section(name: str, values: Mapping[str, Any], errors: List[str]) -> Dict[str, Any]:
    if not isinstance(values, Mapping):
        errors.append(f"section '{name}' must be a mapping, got {values!r}")
        return {}
    return dict(values)


def options_fields(cls: Optional[type]) -> List[str]:
    return [f.name for f in fields(cls)] if cls is not None and is_dataclass(cls) else []


# ------------------------------------------------------------------------------------ resolution
def dataset_entry(name: str):
    """The registry entry of a dataset name; a path ending in ``.npz`` is the generic loader."""
    from .data import DATASETS
    from .data import datasets  # noqa: F401  (registers built-ins)
    if name.endswith(".npz"):
        return DATASETS.entry("npz")
    if name.split(":", 1)[0] == "custom":
        return DATASETS.entry("custom")
    return DATASETS.entry(name)


def resolve_config(dataset: Optional[str] = None, method: Optional[str] = None,
                   config_file: Optional[str] = None, overrides: Sequence[str] = (),
                   tree: Optional[Mapping[str, Any]] = None) -> Config:
    """Resolve the whole config tree; raises :class:`ConfigError` listing every problem."""
    from .methods import METHODS
    from .errors import RegistryError

    user: Dict[str, Any] = deep_merge({}, tree or {})
    if config_file:
        user = deep_merge(user, load_yaml(config_file))
    user = deep_merge(user, overrides_to_dict(overrides))
    user = upgrade_legacy_keys(user)
    errors: List[str] = []
    for sec in list(user):
        if sec not in SECTIONS:
            errors.append(f"unknown config section '{sec}'.{suggest(sec, list(SECTIONS))} Sections: {', '.join(SECTIONS)}")
            del user[sec]  # reported; the other sections are still checked below
    ds_name = dataset or user.get("data", {}).get("name") or DataConfig.name
    m_name = method or user.get("method", {}).get("name") or MethodConfig.name
    try:
        ds_entry = dataset_entry(str(ds_name))
    except RegistryError as exc:
        errors.append(str(exc))
        ds_entry = None
    try:
        m_cls = METHODS.get(str(m_name))
    except RegistryError as exc:
        errors.append(str(exc))
        m_cls = None
    if ds_entry is None or m_cls is None:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

    raw: Dict[str, Any] = {sec: defaults_dict(cls) for sec, cls in SECTIONS.items()}
    raw = deep_merge(raw, ds_entry.meta.get("presets", {}))
    method_presets = getattr(m_cls, "presets", {}) or {}
    raw = deep_merge(raw, method_presets.get(ds_entry.name, method_presets.get("*", {})))
    raw = deep_merge(raw, user)
    raw["data"]["name"] = str(ds_name)
    raw["method"]["name"] = str(m_name)

    cfg = Config()
    for sec, cls in SECTIONS.items():
        values = check_section(sec, raw.get(sec, {}), errors)
        opts_cls = ds_entry.meta.get("options") if sec == "data" else (m_cls.Options if sec == "method" else None)
        if sec not in ("data", "method"):
            setattr(cfg, sec, build_dataclass(cls, values, sec, errors))
            continue
        base, rest = split_section(values, cls)
        setattr(cfg, sec, build_dataclass(cls, base, sec, errors))
        valid = [f.name for f in fields(cls)] + options_fields(opts_cls)
        if opts_cls is None:
            for k in rest:
                errors.append(f"unknown key '{sec}.{k}'.{suggest(k, valid)} Valid keys: {', '.join(valid)}")
            continue
        sub: List[str] = []
        setattr(cfg, f"{sec}_options", build_dataclass(opts_cls, rest, sec, sub))
        # name the section's own keys too in "Valid keys" (they are accepted beside the options)
        errors.extend(e.replace(f"Valid keys: {', '.join(options_fields(opts_cls))}", f"Valid keys: {', '.join(valid)}")
                      for e in sub)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Rebuild a config from a saved, fully resolved tree (``config.yaml`` of a run)."""
    return resolve_config(tree=tree)

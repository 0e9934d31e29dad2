"""The one training loop. Methods plug in through hooks (see :mod:`mmbalance.methods.base`)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from .. import distributed as D
from ..config import (SECTIONS, Config, config_from_dict, defaults_dict, flatten_tree, overrides_to_dict,
                      set_dotted, upgrade_legacy_keys)
from ..data import collate
from ..data.base import DataBundle
from ..data.batch import Batch
from ..data.fastpath import tensor_batches, tensor_source
from ..errors import ConfigError, MethodSetupError, MMBalanceError
from ..evaluation import evaluate
from ..methods.base import LossOutput, TrainContext
from ..models.multimodal import MultimodalModel
from .build import RunParts, build_run, carve_holdout, optimizer_groups, seed_everything
from .checkpoint import load_checkpoint, save_checkpoint, write_text

#: config keys that may differ between a checkpoint and a resumed run (they change no trained value
#: up to the checkpoint): extend ``epochs``, change patience, logging, threads and data plumbing
RESUME_SAFE_KEYS = ("train.epochs", "train.early_stopping", "train.progress", "train.threads",
                    "train.tensorboard", "train.eval_every", "data.num_workers", "data.eval_batch_size",
                    "data.root", "data.cache", "train.diagnose", "train.probe")
#: files and folders of a run in its output folder
RUN_FILES = ("config.yaml", "metrics.jsonl", "result.json", "skipped.json", "checkpoints", "tensorboard")
#: parameters below this count train on one CPU thread by default (see ``train.threads``)
SMALL_MODEL_PARAMS = 2_000_000
#: how many of the last evaluated epochs the end-of-run averages cover
LAST_K = 5
#: training batches between checks for a non-finite loss (one host sync each; also at epoch end)
NONFINITE_CHECK_EVERY = 50


class _EpochSums:
    """Per-epoch training sums kept on the device: the loss and every log (each times its batch
    size, float64: the same additions as Python floats, so the epoch means are unchanged), the
    correct count, and the first non-finite loss (batch index and value). Reading them
    (:meth:`read`, :meth:`check_finite`) is the only host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.sums: Dict[str, torch.Tensor] = {}
        self.bad_batch = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor, b: int, i: int) -> None:
        value = loss.detach().to(self.device, torch.float64).reshape(())
        first = (~torch.isfinite(value)) & (self.bad_batch < 0)
        self.bad_batch = torch.where(first, torch.full_like(self.bad_batch, i), self.bad_batch)
        self.bad_value = torch.where(first, value, self.bad_value)
        self.loss = self.loss + value * b

    def add_correct(self, hits: torch.Tensor) -> None:
        self.correct = self.correct + hits.sum().to(self.device)

    def add(self, key: str, value: Any, b: int) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().to(self.device, torch.float64).reshape(())
        else:
            value = float(value)
        prev = self.sums.get(key)
        self.sums[key] = (prev if prev is not None else torch.zeros((), dtype=torch.float64, device=self.device)) \
            + value * b

    def check_finite(self, epoch: int, method: str) -> None:
        if int(self.bad_batch) >= 0:
            raise MMBalanceError(f"loss became {float(self.bad_value)} at epoch {epoch}, batch {int(self.bad_batch)} "
                                 f"(method {method}); lower optim.lr or check the inputs "
                                 f"(raw features: data.standardize=auto)")

    def read(self, keys: Sequence[str]):
        vec = torch.stack([self.loss, self.correct.to(torch.float64)] + [self.sums[k] for k in keys]).cpu().tolist()
        return vec[0], int(vec[1]), dict(zip(keys, vec[2:]))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every epoch starts from (global RNGs and the shuffle); makes resume exact."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class _IndexSampler(torch.utils.data.Sampler):
    """Yields the given entries in order: indices, or ``(index, tag)`` pairs (see :class:`_Tagged`)."""

    def __init__(self, indices: Sequence[Any]):
        self.indices = [i if isinstance(i, tuple) else int(i) for i in indices]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class _Tagged(torch.utils.data.Dataset):
    """A dataset read with sampler entries that may be ``(index, tag)`` pairs: the sample gets
    ``tag`` (collated into ``Batch.tag``); a plain index reads the sample as it is (tag -1)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            sample = dict(self.base[key[0]])
            sample["tag"] = key[1]
            return sample
        return self.base[key]


def sampler_order(order: Any, n: int, method: str = "?") -> List[Any]:
    """A method sampler's order as a list of ``int`` indices and ``(int, int)`` (index, tag) pairs,
    checked: indices in [0, n), tags >= 0 (-1 is "untagged"). Accepts a 1-D tensor of indices or an
    [N, 2] tensor of pairs."""
    if isinstance(order, torch.Tensor):
        if order.dim() == 2 and order.shape[1] == 2:
            order = [tuple(r) for r in order.tolist()]
        elif order.dim() == 1:
            order = order.tolist()
        else:
            raise MMBalanceError(f"method '{method}': sampler returned a tensor of shape {list(order.shape)}; "
                                 f"expected [N] indices or [N, 2] (index, tag) pairs")
    out: List[Any] = []
    for e in order:
        if isinstance(e, (tuple, list)):
            if len(e) != 2:
                raise MMBalanceError(f"method '{method}': sampler entry {e!r} is not an index or an (index, tag) pair")
            i, tag = int(e[0]), int(e[1])
            if tag < -1:
                raise MMBalanceError(f"method '{method}': sampler entry {e!r} has tag {tag}; tags are >= 0 "
                                     f"(-1 = untagged)")
            out.append((i, tag))
        else:
            i = int(e)
            out.append(i)
        if not 0 <= i < n:
            raise MMBalanceError(f"method '{method}': sampler entry {e!r} is outside the training split "
                                 f"(indices 0..{n - 1})")
    return out


def make_loader(dataset, indices: Sequence[Any], batch_size: int, num_workers: int, pin: bool = False):
    if any(isinstance(i, tuple) for i in indices):
        dataset = _Tagged(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_IndexSampler(indices), collate_fn=collate,
        num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        pin_memory=pin, persistent_workers=False)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ConfigError(f"unknown optimiser '{o.name}'")


def build_scheduler(cfg: Config, optimizer, epochs: int):
    s = cfg.schedule
    warm = max(0, s.warmup_epochs)

    def factor(e: int) -> float:
        w = (e + 1) / (warm + 1) if e < warm else 1.0
        if s.name == "step":
            return w * (s.gamma ** (e // s.step_size))
        if s.name == "cosine":
            t = max(0, e - warm) / max(1, epochs - warm)
            return w * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return w

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available; under torchrun ``cuda`` means this process's GPU
    (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    if name == "cuda" and D.is_distributed():
        return torch.device(f"cuda:{D.local_rank()}")
    return torch.device(name)


class _Engine(nn.Module):
    """What DistributedDataParallel wraps: ``forward(fn, *args)`` runs ``fn(model, *args)``, so
    any forward pass a method makes (``ctx.run``) gets DDP's bucketed gradient all-reduce."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def config_differences(a: Dict[str, Any], b: Dict[str, Any], ignore: Sequence[str] = RESUME_SAFE_KEYS) -> List[str]:
    """Dotted keys whose values differ between two config trees (``ignore``d keys left out). Old
    trees are read as today's (:func:`~mmbalance.config.upgrade_legacy_keys`: ``train.bf16``), and
    a key one tree lacks (added to the config since it was saved) counts as equal when the other
    holds its default value."""
    fa, fb = flatten_tree(upgrade_legacy_keys(a)), flatten_tree(upgrade_legacy_keys(b))
    defaults = flatten_tree({sec: defaults_dict(cls) for sec, cls in SECTIONS.items()})
    missing = object()

    def same(k: str) -> bool:
        va, vb = fa.get(k, missing), fb.get(k, missing)
        if va is missing:
            va = defaults.get(k, missing)
        if vb is missing:
            vb = defaults.get(k, missing)
        return va == vb
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and not same(k))


class Trainer:
    """Runs one configuration: ``Trainer(cfg, out_dir).fit()`` -> the result dict.

    Your own parts: ``Trainer(cfg, out_dir, data=bundle, model=model)`` (see
    :func:`mmbalance.training.build.build_run`); ``cfg`` supplies the method, optimiser, schedule
    and loop settings. ``overwrite=True`` replaces a run already in ``out_dir`` (otherwise refused).
    """

    def __init__(self, cfg: Config, out_dir: Optional[str | Path] = None, *, model: Optional[MultimodalModel] = None,
                 data: Optional[DataBundle] = None, quiet: bool = False, overwrite: bool = False,
                 bundle: Optional[DataBundle] = None, parts: Optional[RunParts] = None):
        self.out = Path(out_dir) if out_dir else None
        self.quiet = quiet
        self.overwrite = overwrite
        self.is_main = D.rank() == 0
        t = cfg.train
        self.device = resolve_device(t.device)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # bit-identical results either way; filling every new tensor with NaN costs ~830
            # fills per ResNet-18 step on CPU
            torch.utils.deterministic.fill_uninitialized_memory = False
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest conv algorithms (not bit-reproducible)
        if t.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.precision=fp16 needs a CUDA device (fp16 autocast with a GradScaler); "
                              f"on {self.device.type} use train.precision=bf16 or fp32")
        #: fp16 only: loss scaling (methods backpropagate through ctx.backward, so gradient hooks
        #: see unscaled gradients; see Method.finish_step)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        if parts is None:
            parts = build_run(cfg, data=data if data is not None else bundle, model=model)
        self.cfg, self.bundle, self.method, self.model = parts.cfg, parts.data, parts.method, parts.model
        # gap B: the method's holdout leaves train before anything (sampler, passes) sees it
        frac = self.cfg.data.method_holdout or float(self.method.holdout_fraction())
        if not 0.0 <= frac < 0.5:
            raise MethodSetupError(f"method '{self.method.name}': holdout_fraction() must be in [0, 0.5), got {frac}")
        self.bundle, self.holdout = carve_holdout(self.bundle, frac, t.seed)
        b = self.bundle
        #: gap E: dynamic LR multipliers by parameter-group name (ctx.set_lr_scale)
        self.lr_scales: Dict[str, float] = {}
        self.threads = self._pick_threads()
        self.model.to(self.device)
        if self.cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.engine = None
        self._build_optimizer()
        self.ctx = TrainContext(
            model=self.model, optimizer=self.optimizer, num_epochs=t.epochs, device=self.device,
            reset_optimizer=self._reset_optimizer, train_eval_batches=self._train_eval_batches,
            val_batches=self._val_batches,
            train_size=len(b.train), train_labels=b.train.labels, autocast=self._autocast,
            grad_clip=self.cfg.train.grad_clip, seed=self.cfg.train.seed,
            train_batches=self._train_pass, holdout_batches=self._holdout_batches,
            holdout_size=len(self.holdout) if self.holdout is not None else 0,
            make_optimizer=self._make_optimizer, set_lr_scale=self._set_lr_scale)
        self.ctx._lr_scales = self.lr_scales
        #: saved method optimiser / scheduler states not yet loaded (the method creates them later)
        self._pending_method_states: Dict[str, Dict[str, Any]] = {}
        self.ctx.grad_scaler = self.scaler
        self._open_engine()
        self.start_epoch = 0
        self.best_val = -1.0
        self.best_epoch = -1
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.samples_seen = 0
        self._extra_seen = 0  # rows of ctx.train_batches passes (copies, teachers) since the last epoch end
        self.history: List[Dict[str, Any]] = []
        self.writer = None
        self.method.setup(self.model, self.ctx)

    @property
    def data(self) -> DataBundle:
        return self.bundle

    def _pick_threads(self) -> int:
        """``train.threads`` > 0 is used as given. 0 (auto): one thread for a model under
        SMALL_MODEL_PARAMS parameters on CPU -- a small MLP gains nothing from more and loses a lot
        to contention on a busy machine (docs/benchmarks.md) -- else torch's default."""
        n = self.cfg.train.threads
        if n == 0 and self.device.type == "cpu":
            size = sum(p.numel() for p in self.model.parameters())
            n = 1 if size < SMALL_MODEL_PARAMS else 0
        return n

    # ------------------------------------------------------------------------------- helpers
    def _build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.cfg, optimizer_groups(self.method, self.model, self.cfg.optim.lr))
        self.scheduler = build_scheduler(self.cfg, self.optimizer, self.cfg.train.epochs)

    def _reset_optimizer(self) -> None:
        self._build_optimizer()
        self.ctx.optimizer = self.optimizer
        self._apply_lr_scales()

    def _make_optimizer(self, params, lr: Optional[float] = None) -> torch.optim.Optimizer:
        cfg = self.cfg
        if lr is not None:
            cfg = copy.copy(cfg)
            cfg.optim = copy.copy(cfg.optim)
            cfg.optim.lr = float(lr)
        return build_optimizer(cfg, params)

    def _set_lr_scale(self, name: str, scale: float) -> None:
        known = [g.get("name") for g in self.optimizer.param_groups if g.get("name") is not None]
        if name not in known:
            raise KeyError(f"no parameter group named {name!r}; the optimiser's named groups are "
                           f"{known or 'none'} (name them in Method.param_groups)")
        scale = float(scale)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"LR scale of group {name!r} must be a finite number >= 0, got {scale}")
        self.lr_scales[name] = scale
        self._apply_lr_scales()

    def _apply_lr_scales(self) -> None:
        """lr = the schedule's lr for the group (which includes its static ``lr_scale``) x the
        group's dynamic scale; called after every schedule step, reset and restore."""
        if not self.lr_scales:
            return
        scheduled = self.scheduler.get_last_lr()
        for g, lr in zip(self.optimizer.param_groups, scheduled):
            name = g.get("name")
            if name in self.lr_scales:
                g["lr"] = lr * self.lr_scales[name]

    def _autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _to_device(self, batch: Batch) -> Batch:
        batch = batch.to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            batch.inputs = {m: (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
                            for m, x in batch.inputs.items()}
        return batch

    def _shard(self, indices: Sequence[int], pad: bool = False) -> List[int]:
        """This process's share of ``indices`` (every ``world_size``-th). ``pad``: wrap around so
        every process gets the same number (training: DDP needs equal step counts; as in
        torch's DistributedSampler, up to world_size - 1 samples are repeated)."""
        idx, ws = list(indices), D.world_size()
        if pad and ws > 1 and len(idx) % ws:
            idx = idx + idx[: ws - len(idx) % ws]
        return idx[D.rank()::ws]

    def _num_workers(self) -> int:
        """``data.num_workers``; -1 (auto) = 0 on CPU, min(4, cores - 1) on CUDA."""
        n = self.cfg.data.num_workers
        if n >= 0:
            return n
        return min(4, max(0, (os.cpu_count() or 1) - 1)) if self.device.type == "cuda" else 0

    def _batches(self, dataset, indices, batch_size) -> Iterator[Batch]:
        pin = self.device.type == "cuda"
        source = tensor_source(dataset)
        if source is not None:  # in-memory tensors: sliced, no DataLoader (identical batches)
            for batch in tensor_batches(source, indices, batch_size, pin=pin):
                yield self._to_device(batch)
            return
        loader = make_loader(dataset, indices, batch_size, self._num_workers(), pin)
        for batch in loader:
            yield self._to_device(batch)

    def _train_pass(self, generator: torch.Generator, batch_size: Optional[int] = None) -> Iterator[Batch]:
        """``ctx.train_batches``: its rows count in ``samples_seen`` (a fair training cost)."""
        ds = self.bundle.train
        order = self._shard(torch.randperm(len(ds), generator=generator).tolist(), pad=True)
        for batch in self._batches(ds, order, batch_size or self.cfg.data.batch_size):
            self._extra_seen += len(batch)
            yield batch

    def _holdout_batches(self, batch_size: Optional[int] = None) -> Iterator[Batch]:
        ds = self.holdout
        return self._batches(ds, range(len(ds)), batch_size or self.cfg.data.eval_batch_size)

    def _train_eval_batches(self) -> Iterator[Batch]:
        ds = self.bundle.train_eval
        return self._batches(ds, self._shard(range(len(ds))), self.cfg.data.eval_batch_size)

    def _val_batches(self) -> Iterator[Batch]:
        ds = self.bundle.val
        return self._batches(ds, range(len(ds)), self.cfg.data.eval_batch_size)

    def _eval_split(self, split: str) -> Dict[str, Any]:
        ds = self.bundle.splits[split]
        batches = self._batches(ds, self._shard(range(len(ds))), self.cfg.data.eval_batch_size)
        return evaluate(self.model, self.method, batches, self.device, self._autocast,
                        gather=D.all_gather_cat if D.is_distributed() else None,
                        class_names=self.bundle.class_names)

    def _progress(self, it, total, desc):
        mode = self.cfg.train.progress
        show = (mode == "on") or (mode == "auto" and sys.stderr.isatty())
        if self.quiet or not show or not self.is_main:
            return it
        from tqdm import tqdm
        return tqdm(it, total=total, desc=desc, leave=False)

    def _log(self, msg: str) -> None:
        if not self.quiet and self.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------- state
    def _state(self, epoch: int) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "method": self.method.state_dict(),
                "epoch": epoch, "best_val": self.best_val, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "train_seconds": self.train_seconds,
                "samples_seen": self.samples_seen, "global_step": self.ctx.global_step,
                "lr_scales": dict(self.lr_scales),
                "method_optimizers": {k: o.state_dict() for k, o in self.method.optimizers().items()},
                "method_schedulers": {k: o.state_dict() for k, o in self.method.schedulers().items()},
                "config": self.cfg.to_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "data_transform": self.bundle.transform_state}

    def load_state(self, state: Dict[str, Any], *, weights_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if weights_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.train_seconds = float(state["train_seconds"])
        self.samples_seen = int(state["samples_seen"])
        self.ctx.global_step = int(state.get("global_step", 0))
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale continues
        self.lr_scales.clear()
        self.lr_scales.update({k: float(v) for k, v in (state.get("lr_scales") or {}).items()})
        self._apply_lr_scales()
        self._load_method_optimizers(state)

    def _load_method_optimizers(self, state: Dict[str, Any], final: bool = False) -> None:
        """Gap G: after the model and the method's state are back, the method's optimisers (and
        schedulers) -- recreated by the method from its state -- get their saved states. Those the
        method creates later (lazily in ``on_epoch_start``) are loaded after that hook
        (``final=True``: still missing is an error)."""
        pending: Dict[str, Dict[str, Any]] = {}
        for key, current in (("method_optimizers", self.method.optimizers()),
                             ("method_schedulers", self.method.schedulers())):
            saved = state.get(key) or {}
            missing = [k for k in saved if k not in current]
            if missing and final:
                raise MMBalanceError(f"method '{self.method.name}': the checkpoint holds {key.replace('_', ' ')} "
                                     f"{missing} that the restored method does not return from "
                                     f"{key.split('_')[1]}() even after on_epoch_start (create them "
                                     f"deterministically from the method's own state, or in setup())")
            for k, st in saved.items():
                if k in current:
                    current[k].load_state_dict(st)
                else:
                    pending.setdefault(key, {})[k] = st
        self._pending_method_states = pending

    def resume(self) -> None:
        """Load ``last.pt``; refuses when its config differs from this run's (other than
        :data:`RESUME_SAFE_KEYS`) or the data's fitted statistics changed."""
        if self.out is None:
            raise MMBalanceError("resume needs the run's output folder")
        path = self.out / "checkpoints" / "last.pt"
        if not path.is_file():
            raise MMBalanceError(f"'{self.out}' has no checkpoint ({path}) to resume from; start it again "
                                 f"with --overwrite")
        state = load_checkpoint(path)
        diff = config_differences(state["config"], self.cfg.to_dict())
        if diff:
            fa, fb = flatten_tree(state["config"]), flatten_tree(self.cfg.to_dict())
            lines = "; ".join(f"{k}: checkpoint {fa.get(k)!r}, now {fb.get(k)!r}" for k in diff)
            raise MMBalanceError(f"cannot resume '{self.out}': the checkpoint was trained with another config "
                                 f"({lines}). Only {', '.join(RESUME_SAFE_KEYS)} may change on resume.")
        if not _same_tensors(state.get("data_transform") or {}, self.bundle.transform_state or {}):
            raise MMBalanceError(f"cannot resume '{self.out}': the data's fitted statistics (e.g. standardisation) "
                                 f"differ from the checkpoint's; the data changed since the run started")
        self.load_state(state)
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():  # drop rows written after the checkpoint
            rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
            self.history = [r for r in rows if r["epoch"] < self.start_epoch]
            evaluated = [r for r in self.history if "val_accuracy" in r]
            if evaluated:
                self.ctx.last_eval = {k: v for k, v in evaluated[-1].items() if k.startswith("val_")}
            if self.is_main:
                write_text(metrics, "".join(json.dumps(r) + "\n" for r in self.history))

    def _prepare_out(self, resume: bool) -> None:
        out = self.out
        if out is None:
            return
        if out.exists() and not out.is_dir():
            raise MMBalanceError(f"output path '{out}' exists and is not a folder")
        held = [f for f in RUN_FILES if (out / f).exists()]
        if held and not resume and not self.overwrite:  # every process refuses, before any writes
            raise MMBalanceError(f"'{out}' already holds a run ({', '.join(held)}); pass --overwrite "
                                 f"(overwrite=True) to replace it, or --resume {out} to continue it")
        D.barrier()
        if not self.is_main:
            return
        if held and not resume:
            for f in held:
                p = out / f
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        try:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MMBalanceError(f"cannot create the output folder '{out}': {exc.strerror or exc}") from None
        if not os.access(out, os.W_OK):
            raise MMBalanceError(f"output folder '{out}' is not writable")
        if not resume:
            write_text(out / "metrics.jsonl", "")
        write_text(out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------------------- loop
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, ctx, model, method = self.cfg, self.ctx, self.model, self.method
        s = epoch_seed(cfg.train.seed, epoch)
        seed_everything(s)
        gen = torch.Generator().manual_seed(s)
        ctx.epoch = epoch
        method.on_epoch_start(model, ctx)
        n = len(self.bundle.train)
        if self._pending_method_states:
            self._load_method_optimizers(self._pending_method_states, final=True)
        order = method.sampler(n, epoch, gen)
        if order is None:
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = sampler_order(order, n, method.name)
        order = self._shard(order, pad=True)
        bs = cfg.data.batch_size
        ctx.num_batches = (len(order) + bs - 1) // bs
        model.train()
        # the running sums stay on the device (float64, the same sequence of additions as Python
        # floats): no host sync per batch; read once at the end of the epoch
        acc = _EpochSums(self.device)
        seen = 0
        batches = self._batches(self.bundle.train, order, bs)
        try:
            for i, batch in enumerate(self._progress(batches, ctx.num_batches, f"epoch {epoch}")):
                ctx.batch_idx = i
                res: LossOutput = method.training_step(model, batch, ctx)
                ctx.global_step += 1
                b = len(batch)
                acc.add_loss(res.loss, b, i)
                seen += b
                if res.output is not None:
                    labels = res.labels if res.labels is not None else batch.labels
                    if res.output.logits.shape[0] == labels.shape[0]:
                        acc.add_correct(res.output.logits.detach().argmax(1) == labels)
                for k, v in res.logs.items():
                    acc.add(k, v, b)
                if (i + 1) % NONFINITE_CHECK_EVERY == 0:
                    acc.check_finite(epoch, method.name)
        except MMBalanceError:
            raise
        except Exception:
            # the loss is checked every NONFINITE_CHECK_EVERY batches: a NaN seen since then may be
            # what made a method fail inside torch -- report it first, by its batch
            acc.check_finite(epoch, method.name)
            raise
        acc.check_finite(epoch, method.name)
        # every process reports the same (global) numbers
        keys = sorted(acc.sums)
        loss_sum, correct, sums = acc.read(keys)
        extra = method.on_epoch_end(model, ctx)
        extra_seen, self._extra_seen = self._extra_seen, 0
        tot = D.all_reduce_sum(torch.tensor([loss_sum, float(seen), float(correct), float(extra_seen)]
                                            + [sums[k] for k in keys],
                                            dtype=torch.float64)).tolist()
        loss_sum, seen, correct, extra_seen = tot[0], int(tot[1]), tot[2], int(tot[3])
        # samples_seen: the main steps' rows plus the rows of the method's extra training passes
        # (ctx.train_batches, in any hook of this epoch: G-Blending's copies, UMT's teachers)
        self.samples_seen += seen + extra_seen
        logs = {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "train_samples": seen}
        if extra_seen:
            logs["extra_train_samples"] = extra_seen
        logs.update({k: v / max(seen, 1) for k, v in zip(keys, tot[4:])})
        if extra:
            logs.update({k: float(v) for k, v in extra.items()})
        with warnings.catch_warnings():  # methods that step only their own optimisers (ReconBoost, UME)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self._apply_lr_scales()
        for sched in method.schedulers().values():
            sched.step()
        return logs

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        cfg = self.cfg
        self._open_engine()  # (again, if an earlier fit closed it)
        self._prepare_out(resume)
        if resume:
            self.resume()
        if cfg.train.tensorboard and self.out is not None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        threads_before = torch.get_num_threads()
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            self._log(self.bundle.summary() + f" | method {self.method.name}")
            self._loop()
            return self.finish()
        finally:
            torch.set_num_threads(threads_before)
            if self.writer is not None:
                self.writer.close()
            self.close()

    def _open_engine(self) -> None:
        """Under torchrun: wrap the model in DistributedDataParallel (``ctx.run`` goes through it).
        ``find_unused_parameters``: methods use parameter subsets (heads, one modality per step)."""
        if D.is_distributed() and self.engine is None:
            self.engine = nn.parallel.DistributedDataParallel(
                _Engine(self.model), device_ids=None, find_unused_parameters=True)
            self.ctx._engine = self.engine

    def close(self) -> None:
        """Release the DDP wrapper (its reducer must not outlive the process group: under gloo a
        live one at exit aborts about 1 run in 6). ``fit`` calls this; the model stays usable."""
        if self.engine is not None:
            self.engine = None
            self.ctx._engine = None
            import gc
            gc.collect()

    def _loop(self) -> None:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            logs = self.train_epoch(epoch)
            self.train_seconds += time.perf_counter() - t0
            row: Dict[str, Any] = {"epoch": epoch, **logs, "lr": self.optimizer.param_groups[0]["lr"]}
            improved = False
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch == cfg.train.epochs - 1:
                val = self._eval_split("val")
                row.update({"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "val_loss": val["loss"]})
                for m, d in val["modalities"].items():
                    for k, v in d.items():
                        row[f"val_{m}_{k}"] = v
                self.ctx.last_eval = {k: v for k, v in row.items() if k.startswith("val_")}
                improved = val["accuracy"] > self.best_val
                if improved:
                    self.best_val, self.best_epoch, self.bad_epochs = val["accuracy"], epoch, 0
                else:
                    self.bad_epochs += 1
            self.history.append(row)
            self._log(f"epoch {epoch:3d} | loss {row['train_loss']:.4f} | train acc {row['train_accuracy']:.4f}"
                      + (f" | val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""))
            if self.is_main and self.out is not None:
                try:
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                except OSError as exc:
                    raise MMBalanceError(f"cannot write '{self.out / 'metrics.jsonl'}': {exc.strerror or exc}") from None
                state = self._state(epoch)
                if improved:
                    save_checkpoint(self.out / "checkpoints" / "best.pt", state)
                save_checkpoint(self.out / "checkpoints" / "last.pt", state)
            elif improved:
                self._best_state = copy.deepcopy(self._state(epoch))
            if self.writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.writer.add_scalar(k, v, epoch)
            if cfg.train.early_stopping > 0 and self.bad_epochs >= cfg.train.early_stopping:
                self._log(f"early stopping at epoch {epoch} (no val improvement for {self.bad_epochs} epochs)")
                break

    def finish(self) -> Dict[str, Any]:
        # test (and val) on the best checkpoint
        # (other processes keep their own copy: rank 0 may still be writing best.pt)
        if self.is_main and self.out is not None and (self.out / "checkpoints" / "best.pt").exists():
            self.load_state(load_checkpoint(self.out / "checkpoints" / "best.pt"), weights_only=True)
        elif getattr(self, "_best_state", None) is not None:
            self.load_state(self._best_state, weights_only=True)
        test = self._eval_split("test")
        val = self._eval_split("val")
        result = {
            "method": self.method.name, "dataset": self.bundle.name, "seed": self.cfg.train.seed,
            "epochs": self.cfg.train.epochs, "best_epoch": self.best_epoch,
            "train_seconds": round(self.train_seconds, 3),
            "train_samples_per_second": round(self.samples_seen / self.train_seconds, 2) if self.train_seconds > 0 else None,
            "samples_seen": self.samples_seen,
            "modalities": list(self.bundle.modalities),
            "class_names": self.bundle.class_names,
            "test": _strip(test), "val": _strip(val),
            "skipped_samples": len(self.bundle.skipped),
            "holdout_size": len(self.holdout) if self.holdout is not None else 0,
        }
        warmup = getattr(self.method.options, "warmup_epochs", None)
        if isinstance(warmup, int) and not isinstance(warmup, bool):
            result["warmup_epochs"] = warmup
            result["best_epoch_in_warmup"] = bool(0 <= self.best_epoch < warmup)
        result.update(self._late_zero_out(test))
        probes = None
        if self.cfg.train.diagnose and self.is_main:
            from ..diagnostics import diagnose
            diag = diagnose(self.model, self.method, self.bundle, device=self.device, seed=self.cfg.train.seed)
            if self.out is not None:
                write_text(self.out / "diagnostics.json", json.dumps(diag, indent=2))
            result["verdicts"] = diag["verdicts"]
            probes = {m: e["probe_accuracy"] for m, e in diag["per_modality"].items()}  # the same probe
        if self.cfg.train.probe and self.is_main:
            if probes is None:
                from ..diagnostics.diagnose import probe_accuracies
                probes = probe_accuracies(self.model, self.bundle, "test", self.device,
                                          self.cfg.data.eval_batch_size, seed=self.cfg.train.seed)
            for m, acc in probes.items():
                result["test"]["modalities"][m]["probe_accuracy"] = acc
        if self.out is not None and self.is_main:
            write_text(self.out / "result.json", json.dumps(result, indent=2))
            if self.bundle.skipped:
                write_text(self.out / "skipped.json", json.dumps(self.bundle.skipped, indent=2))
        self._log(self._report(result))
        return result

    def _late_zero_out(self, test: Dict[str, Any]) -> Dict[str, Any]:
        """The weak modality (lowest test zero-out accuracy at the best checkpoint) and every
        modality's val zero-out accuracy averaged over the last ``LAST_K`` evaluated epochs --
        a best checkpoint can sit on one lucky epoch."""
        zo = {m: d["zero_out_accuracy"] for m, d in test["modalities"].items() if "zero_out_accuracy" in d}
        if not zo:
            return {}
        rows = [r for r in self.history if "val_accuracy" in r][-LAST_K:]
        late = {m: round(float(np.mean([r[f"val_{m}_zero_out_accuracy"] for r in rows])), 6)
                for m in zo if rows and all(f"val_{m}_zero_out_accuracy" in r for r in rows)}
        weak = min(zo, key=zo.get)
        return {"weak_modality": weak, "val_zero_out_last_k": {"k": len(rows), **late}}

    def _report(self, result: Dict[str, Any]) -> str:
        t = result["test"]
        lines = [f"test accuracy {t['accuracy']:.4f} (macro-F1 {t['macro_f1']:.4f}, best epoch {self.best_epoch})"]
        for m, d in t["modalities"].items():
            parts = [f"{k.replace('_accuracy', '').replace('_', '-')} {v:.4f}" for k, v in d.items()]
            lines.append(f"  {m}: " + (", ".join(parts) if parts else "-"))
        if self.out is not None:
            lines.append(f"run folder: {self.out}")
        return "\n".join(lines)


def _same_tensors(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def _strip(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "modalities", "per_class_accuracy")
            if k in metrics}


def run_from_dir(out_dir: str | Path, quiet: bool = False, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Continue a stopped run from its folder (``mmbalance train --resume DIR [key=value ...]``).

    Overrides of :data:`RESUME_SAFE_KEYS` (e.g. ``epochs=30`` to extend a run) are applied and
    saved to ``config.yaml``; any other override is refused, naming it.
    """
    out = Path(out_dir)
    cfg_path = out / "config.yaml"
    if not cfg_path.is_file():
        raise MMBalanceError(f"'{out}' is not a run folder (no config.yaml)")
    tree = yaml.safe_load(cfg_path.read_text())
    data_name = str(tree.get("data", {}).get("name", ""))
    custom_model = tree.get("model", {}).get("custom")
    if data_name.startswith("custom") or custom_model:
        what = " and ".join(x for x in (f"its data ({data_name})" if data_name.startswith("custom") else "",
                                        f"its model ({custom_model})" if custom_model else "") if x)
        raise MMBalanceError(f"'{out}' was trained from Python with {what}; the command line cannot rebuild them. "
                             f"Resume it from Python with the same parts: Trainer(cfg, '{out}', data=..., model=...)"
                             f".fit(resume=True), cfg = mmbalance.training.trainer.load_run_config('{out}')")
    if overrides:
        flat = flatten_tree(overrides_to_dict(list(overrides)))
        bad = [k for k in flat if k not in RESUME_SAFE_KEYS]
        if bad:
            raise MMBalanceError(f"--resume cannot change {', '.join(bad)} (the checkpoint was trained with the "
                                 f"saved values); only {', '.join(RESUME_SAFE_KEYS)} may change. Start a new run "
                                 f"with --out to change anything else")
        tree = set_dotted(tree, {k: v.parsed() if hasattr(v, "parsed") else v for k, v in flat.items()})
    cfg = config_from_dict(tree)
    trainer = Trainer(cfg, out, quiet=quiet)
    return trainer.fit(resume=True)


def load_run_config(out_dir: str | Path) -> Config:
    """The saved config of a run folder (e.g. to resume a Python-made run with its own parts)."""
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise MMBalanceError(f"'{out_dir}' is not a run folder (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))

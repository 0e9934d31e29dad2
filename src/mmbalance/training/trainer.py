"""The one training loop. Methods plug in through hooks (see :mod:`mmbalance.methods.base`)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from .. import distributed as D
from ..config import Config, config_from_dict
from ..data import build_dataset, collate
from ..data.base import DataBundle
from ..data.batch import Batch
from ..errors import ConfigError, MMBalanceError
from ..evaluation import evaluate
from ..methods import build_method
from ..methods.base import LossOutput, Method, TrainContext
from ..models import build_model
from .checkpoint import load_checkpoint, save_checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every epoch starts from (global RNGs and the shuffle); makes resume exact."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class _IndexSampler(torch.utils.data.Sampler):
    def __init__(self, indices: Sequence[int]):
        self.indices = [int(i) for i in indices]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(dataset, indices: Sequence[int], batch_size: int, num_workers: int, pin: bool = False):
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


class Trainer:
    """Runs one configuration: ``Trainer(cfg, out_dir).fit()`` -> the result dict."""

    def __init__(self, cfg: Config, out_dir: Optional[str | Path] = None, *, quiet: bool = False,
                 bundle: Optional[DataBundle] = None):
        self.cfg = copy.deepcopy(cfg)
        self.out = Path(out_dir) if out_dir else None
        self.quiet = quiet
        self.is_main = D.rank() == 0
        t = self.cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        seed_everything(t.seed)
        self.bundle = bundle if bundle is not None else build_dataset(self.cfg.data.name, self.cfg.data_options, self.cfg.data, t.seed)
        b = self.bundle
        self.method: Method = build_method(self.cfg.method.name, self.cfg.method_options, b.modalities, b.num_classes)
        self.method.configure_model(self.cfg.model)
        unknown = [m for m in self.cfg.model.encoders if m not in b.modalities]
        if unknown:
            raise ConfigError(f"model.encoders names unknown modalities {unknown}; this dataset has {list(b.modalities)}")
        seed_everything(t.seed)
        self.model = build_model(b.modalities, b.input_shapes, b.num_classes, self.cfg.model, b.encoder_hints)
        dims = dict(self.model.feature_dims)
        fusion = self.method.build_fusion(dims, b.num_classes, self.cfg.model)
        if fusion is not None:
            self.model.fusion = fusion
        extras = self.method.extra_modules(self.model)
        if extras:
            self.model.extras = nn.ModuleDict(extras)
        self.model.to(self.device)
        if self.cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._build_optimizer()
        self.ctx = TrainContext(
            model=self.model, optimizer=self.optimizer, num_epochs=t.epochs, device=self.device,
            reset_optimizer=self._reset_optimizer, train_eval_batches=self._train_eval_batches,
            train_size=len(b.train), train_labels=b.train.labels, autocast=self._autocast,
            grad_clip=t.grad_clip, seed=t.seed, sync_grads=self._sync_grads)
        self.start_epoch = 0
        self.best_val = -1.0
        self.best_epoch = -1
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.writer = None

    # ------------------------------------------------------------------------------- helpers
    def _build_optimizer(self) -> None:
        groups = self.method.param_groups(self.model)
        params = groups if groups is not None else [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.cfg, params)
        self.scheduler = build_scheduler(self.cfg, self.optimizer, self.cfg.train.epochs)

    def _reset_optimizer(self) -> None:
        self._build_optimizer()
        self.ctx.optimizer = self.optimizer

    def _autocast(self):
        if not self.cfg.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: Batch) -> Batch:
        batch = batch.to(self.device, non_blocking=True)
        if self.cfg.model.channels_last:
            batch.inputs = {m: (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
                            for m, x in batch.inputs.items()}
        return batch

    def _sync_grads(self) -> None:
        """Average gradients over processes (no-op in one process)."""
        if not D.is_distributed():
            return
        ws = D.world_size()
        for p in self.model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= ws

    def _shard(self, indices: Sequence[int]) -> List[int]:
        return list(indices)[D.rank()::D.world_size()]

    def _batches(self, dataset, indices, batch_size) -> Iterator[Batch]:
        loader = make_loader(dataset, indices, batch_size, self.cfg.data.num_workers, self.device.type == "cuda")
        for batch in loader:
            yield self._to_device(batch)

    def _train_eval_batches(self) -> Iterator[Batch]:
        ds = self.bundle.train_eval
        return self._batches(ds, self._shard(range(len(ds))), self.cfg.data.eval_batch_size)

    def _eval_split(self, split: str) -> Dict[str, Any]:
        ds = self.bundle.splits[split]
        return evaluate(self.model, self.method, self._batches(ds, range(len(ds)), self.cfg.data.eval_batch_size),
                        self.device, self._autocast)

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
                "samples_seen": self.samples_seen, "config": self.cfg.to_dict()}

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

    def resume(self) -> None:
        if self.out is None:
            raise MMBalanceError("resume needs the run's output folder")
        self.load_state(load_checkpoint(self.out / "checkpoints" / "last.pt"))
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():  # drop rows written after the checkpoint
            rows = [l for l in metrics.read_text().splitlines() if l.strip()]
            keep = [l for l in rows if json.loads(l)["epoch"] < self.start_epoch]
            metrics.write_text("".join(l + "\n" for l in keep))

    # ------------------------------------------------------------------------------- loop
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, ctx, model, method = self.cfg, self.ctx, self.model, self.method
        s = epoch_seed(cfg.train.seed, epoch)
        seed_everything(s)
        gen = torch.Generator().manual_seed(s)
        ctx.epoch = epoch
        method.on_epoch_start(model, ctx)
        n = len(self.bundle.train)
        order = method.sampler(n, epoch, gen)
        if order is None:
            order = torch.randperm(n, generator=gen).tolist()
        order = self._shard(order)
        bs = cfg.data.batch_size
        ctx.num_batches = (len(order) + bs - 1) // bs
        model.train()
        sums: Dict[str, float] = {}
        correct = seen = 0
        loss_sum = 0.0
        batches = self._batches(self.bundle.train, order, bs)
        for i, batch in enumerate(self._progress(batches, ctx.num_batches, f"epoch {epoch}")):
            ctx.batch_idx = i
            res: LossOutput = method.training_step(model, batch, ctx)
            if not torch.isfinite(res.loss.detach()):
                raise MMBalanceError(f"loss became {float(res.loss)} at epoch {epoch}, batch {i} "
                                     f"(method {method.name}); lower optim.lr or check the inputs")
            ctx.global_step += 1
            b = len(batch)
            loss_sum += float(res.loss.detach()) * b
            seen += b
            if res.output is not None:
                labels = res.labels if res.labels is not None else batch.labels
                if res.output.logits.shape[0] == labels.shape[0]:
                    correct += int((res.output.logits.detach().argmax(1) == labels).sum())
            for k, v in res.logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
        self.samples_seen += seen
        logs = {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        logs.update({k: v / max(seen, 1) for k, v in sums.items()})
        extra = method.on_epoch_end(model, ctx)
        if extra:
            logs.update({k: float(v) for k, v in extra.items()})
        self.scheduler.step()
        return logs

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        cfg = self.cfg
        if self.out is not None and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "checkpoints").mkdir(exist_ok=True)
            if not resume:
                (self.out / "metrics.jsonl").write_text("")
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if resume:
            self.resume()
        if cfg.train.tensorboard and self.out is not None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        self._log(self.bundle.summary() + f" | method {self.method.name}")
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
                improved = val["accuracy"] > self.best_val
                if improved:
                    self.best_val, self.best_epoch, self.bad_epochs = val["accuracy"], epoch, 0
                else:
                    self.bad_epochs += 1
            self._log(f"epoch {epoch:3d} | loss {row['train_loss']:.4f} | train acc {row['train_accuracy']:.4f}"
                      + (f" | val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""))
            if self.is_main and self.out is not None:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
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
        return self.finish()

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
            "modalities": list(self.bundle.modalities),
            "test": _strip(test), "val": _strip(val),
            "skipped_samples": len(self.bundle.skipped),
        }
        if self.out is not None and self.is_main:
            (self.out / "result.json").write_text(json.dumps(result, indent=2))
            if self.bundle.skipped:
                (self.out / "skipped.json").write_text(json.dumps(self.bundle.skipped, indent=2))
        if self.writer is not None:
            self.writer.close()
        self._log(f"test accuracy {test['accuracy']:.4f} (best epoch {self.best_epoch})")
        return result


def _strip(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "modalities")}


def run_from_dir(out_dir: str | Path, quiet: bool = False) -> Dict[str, Any]:
    """Continue a stopped run from its folder (``mmbalance train --resume DIR``)."""
    out = Path(out_dir)
    cfg_path = out / "config.yaml"
    if not cfg_path.is_file():
        raise MMBalanceError(f"'{out}' is not a run folder (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    trainer = Trainer(cfg, out, quiet=quiet)
    return trainer.fit(resume=True)

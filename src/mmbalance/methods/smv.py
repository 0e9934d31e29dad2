"""SMV: sample-level modality valuation and re-sampling (sample level and modality level).

Paper: Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation",
CVPR 2024 (arXiv 2309.06255). Code read (spec ``baselines.md`` §4.8):
GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@7ed12b0 -- ``code/sample_level.py``
(``execute_modulation``, ``train_epoch``, ``warmup_epoch``, ``main``), ``code/modality_level.py``,
``code/datasets/dataloader.py`` (``AV_KS_Dataset_sample_level``, ``AV_KS_Dataset_modality_level``),
``code/models/models.py::AVClassifier.forward/exec_drop``.

* Warm-up, ``epoch < warmup_epochs`` (5): plain joint cross-entropy on the original training set.
* Valuation, at the end of every epoch ``e >= warmup_epochs - 1`` (``on_epoch_end``): an
  eval-mode, no-grad pass over the whole training split (``ctx.train_eval_batches()``); per
  sample, ``v(S) = |S| * [argmax fuse(z_S) == y]`` with the features of the modalities outside
  ``S`` replaced by zeros (feature-level, as the code's ``exec_drop``), ``v(∅) = 0``, and the
  exact Shapley value ``phi_m`` of each modality (M = 2: ``phi_a = (v_a + v_all - v_v) / 2``).
  Kept as the tensor state ``contrib`` ``[N, M]`` (per training index).
* ``level="sample"``: the next epoch iterates every sample once (all modalities) plus, for each
  modality m, extra copies of the sample that train m alone: 1 copy if ``0.4 < phi_m < 0.9``, 2 if
  ``-0.1 < phi_m < 0.4``, 3 if ``phi_m < -0.1`` (else 0). A copy is the sampler entry
  ``(index, m)``; its tag arrives as ``batch.tag`` and ``compute_loss`` zeroes every other
  modality's features of that row after the encoders (the dropped encoders still run, so their
  BatchNorm statistics see the row, but get no gradient from it), as the code.
* ``level="modality"``: ``phi_bar_m`` = mean contribution over ``int(part_ratio * N)`` samples
  drawn with replacement; ``gap_m = 1 - phi_bar_m``; ``delta = |gap_a - gap_v| * 2/3 * alpha``
  (``func=linear``; ``tanh``: ``tanh(. * alpha)``; ``square``: ``(.)^1.5 * alpha``); the next
  epoch appends ``int(delta * N)`` indices drawn with replacement, each training the modality with
  the larger gap alone (the other one dropped).
* Loss after the warm-up: the fused cross-entropy, mean over the epoch's rows (copies included).

Defaults (method): warmup 5, alpha 1, part_ratio 0.2, func linear, level sample. The code's
optimiser (Adam 5e-5, wd 1e-4, bs 64, 60 epochs, StepLR(30, 0.1)) belongs to the config.

Decisions and deviations:

* Thresholds of the sample level are the code's ``dataloader.py`` (``0.4 < phi < 0.9``; the spec
  wrote ``< 1``); for two modalities phi only takes -0.5, 0, 0.5, 1, 1.5 and both agree.
* The valuation pass uses eval transforms (``train_eval_batches``); the code passes the training
  dataset object, i.e. train transforms (spec DECISION). It runs only from epoch
  ``warmup_epochs - 1`` on (the code also runs it during the warm-up, for logging only).
* Random draws (the part sample, the appended indices of the modality level, the shuffle) use
  generators seeded from ``train.seed`` and the epoch, so reruns and resumed runs are identical
  (the code: ``np.random``).
* M > 2 (extension, as the peer's Shapley): ``v(S) = |S| * correct_S`` over all 2^M subsets;
  sample-level copies keep one modality at a time; modality level: modality m gets
  ``delta(gap_m - min_j gap_j)`` (for M = 2 exactly the code's rule).
* Processes: each process values its shard; the per-index contributions are summed over processes
  (``scatter_by_index``) so every replica holds the whole table and builds the same epoch list
  (which the trainer then shards). An index valued by no process (not expected) keeps phi = 0.
* Logs (epoch end, from the valuation): ``contrib_{m}`` (mean phi_m over the training split, the
  code's ``cona``/``conv``) and ``extra_{m}`` (extra copies keeping m in the next epoch, as a
  fraction of N). State: ``contrib`` (float tensor ``[N, M]`` or None), ``part`` (the
  modality level's ``[M]`` part means or None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.common import all_subsets
from ..functional.remix import keep_rows
from ..functional.smv import (
    FUNCS,
    modality_contributions,
    modality_level_entries,
    modality_resample_fractions,
    part_mean,
    sample_copies,
    sample_level_entries,
)
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method

LEVELS = ("sample", "modality")


@dataclass
class SMVOptions:
    level: str = "sample"  # sample (per-sample copies, code sample_level.py) | modality (code modality_level.py)
    warmup_epochs: int = 5  # epochs of plain joint training before re-sampling (the code's --warmup)
    alpha: float = 1.0  # modality level: scale of the re-sampled fraction (the code's --alpha)
    part_ratio: float = 0.2  # modality level: fraction of samples drawn to estimate mean contributions
    func: str = "linear"  # modality level: linear | tanh | square (the code's func)
    tune_space = {"warmup_epochs": ("int", 1, 10), "alpha": ("log", 0.25, 4.0)}  # mmbalance tune ranges (ours; code 5 / 1, peer alpha 0.5)

    def validate(self):
        errs = []
        if self.level not in LEVELS:
            errs.append(f"level must be one of {', '.join(LEVELS)}, got '{self.level}'")
        if self.warmup_epochs < 0:
            errs.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.alpha < 0:
            errs.append(f"alpha must be >= 0, got {self.alpha}")
        if not 0 < self.part_ratio <= 1:
            errs.append(f"part_ratio must be in (0, 1], got {self.part_ratio}")
        if self.func not in FUNCS:
            errs.append(f"func must be one of {', '.join(FUNCS)}, got '{self.func}'")
        return errs


@register_method("smv", paper="Wei et al., CVPR 2024", kind="data",
                 description="SMV: Shapley valuation of each modality per sample after each epoch; re-sampling "
                             "that trains low-contributing modalities alone (sample or modality level)")
class SMV(Method):
    Options = SMVOptions
    modality_range = (2, None)
    state_attrs = ("contrib", "part")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.contrib: Tensor | None = None  # [N, M] float: phi per training index (last valuation)
        self.part: Tensor | None = None  # [M] float64: modality level, mean phi over the drawn part

    def resampling(self, epoch: int) -> bool:
        return epoch >= self.options.warmup_epochs and self.contrib is not None

    # ------------------------------------------------------------------------------ valuation
    @torch.no_grad()
    def valuate(self, model, batches, size: int) -> Tensor:
        """``[size, M]`` contributions from an eval-mode pass over ``batches`` (global over processes)."""
        was = model.training
        model.eval()
        subsets = [s for s in all_subsets(self.modalities) if s]
        idx_all, phi_all = [], []
        try:
            for batch in batches:
                logits = model.subset_logits(batch.inputs, subsets, level="feature")
                correct = {s: l.argmax(1) == batch.labels for s, l in logits.items()}
                phi_all.append(modality_contributions(correct, self.modalities).float())
                idx_all.append(batch.index.to(phi_all[-1].device))
        finally:
            model.train(was)
        dev = next(model.parameters()).device
        if idx_all:
            idx, phi = torch.cat(idx_all), torch.cat(phi_all)
            size = max(size, int(idx.max()) + 1)
        else:
            idx = torch.zeros(0, dtype=torch.long, device=dev)
            phi = torch.zeros(0, len(self.modalities), device=dev)
        return D.scatter_by_index(phi, idx, size).cpu()

    def _generator(self, seed: int, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt * 104_729 + 61) % (2**31))

    def on_epoch_end(self, model, ctx):
        o = self.options
        if ctx.epoch < o.warmup_epochs - 1:
            return None
        n = int(ctx.train_size or 0)
        self.contrib = self.valuate(model, ctx.train_eval_batches(), n)
        n = self.contrib.shape[0]
        logs = {f"contrib_{m}": float(self.contrib[:, j].mean()) for j, m in enumerate(self.modalities)}
        if o.level == "sample":
            extra = sample_copies(self.contrib).sum(0)
        else:
            self.part = part_mean(self.contrib, o.part_ratio, self._generator(ctx.seed, ctx.epoch, 1))
            extra = torch.tensor([int(f * n) for f in modality_resample_fractions(self.part, o.alpha, o.func).tolist()])
        logs.update({f"extra_{m}": float(extra[j]) / max(n, 1) for j, m in enumerate(self.modalities)})
        return logs

    # ------------------------------------------------------------------------------ training
    def sampler(self, dataset_size, epoch, generator):
        if not self.resampling(epoch):
            return None
        if self.contrib.shape[0] != dataset_size:
            raise MethodSetupError(f"method 'smv': the contributions cover {self.contrib.shape[0]} training samples "
                                   f"but the training split has {dataset_size}")
        o = self.options
        if o.level == "sample":
            entries = sample_level_entries(self.contrib)
        else:
            fractions = modality_resample_fractions(self.part, o.alpha, o.func)
            entries = modality_level_entries(dataset_size, fractions, generator)
        perm = torch.randperm(len(entries), generator=generator).tolist()
        return [entries[i] for i in perm]

    def compute_loss(self, model, batch, ctx):
        feats = model.encode(batch.inputs)
        tag = batch.tag
        if bool((tag >= 0).any()):
            bad = tag >= len(self.modalities)
            if bool(bad.any()):
                raise MethodSetupError(f"method 'smv': batch tag {int(tag[bad][0])} names no modality "
                                       f"(0..{len(self.modalities) - 1})")
            feats = keep_rows(feats, tag.to(batch.labels.device), self.modalities)
        logits = model.fuse(feats)
        loss = F.cross_entropy(logits, batch.labels)
        return LossOutput(loss, ModelOutput(logits, feats, model.head_logits(feats)))

"""Evaluation of a model under a method: accuracy, macro-F1 and per-modality accuracies.

Per modality m:
* ``zero_out_accuracy`` -- the method's fused classifier with every other modality's features
  replaced by zeros (the OGM-GE / MIDAS convention; see ``Method.zero_out_logits``);
* ``head_accuracy`` -- the unimodal head's accuracy, where the model has heads.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch

from ..data.batch import Batch
from .metrics import accuracy, macro_f1


@torch.no_grad()
def evaluate(model, method, batches: Iterable[Batch], device="cpu", autocast=None) -> Dict:
    model.eval()
    preds: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    zero: Dict[str, List[torch.Tensor]] = {m: [] for m in model.modalities}
    head: Dict[str, List[torch.Tensor]] = {}
    loss_sum, n = 0.0, 0
    import contextlib
    for batch in batches:
        batch = batch.to(device)
        with (autocast() if autocast else contextlib.nullcontext()):
            out = method.predict(model, batch)
            zl = method.zero_out_logits(model, out)
        logits = out.logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        n += len(batch)
        preds.append(logits.argmax(1).cpu())
        labels.append(batch.labels.cpu())
        for m, l in zl.items():
            zero[m].append(l.float().argmax(1).cpu())
        for m, l in out.unimodal_logits.items():
            head.setdefault(m, []).append(l.float().argmax(1).cpu())
    if n == 0:
        raise ValueError("evaluation got no batches (empty split?)")
    y = torch.cat(labels)
    p = torch.cat(preds)
    mods = {}
    for m in model.modalities:
        entry = {}
        if zero.get(m):
            entry["zero_out_accuracy"] = accuracy(torch.cat(zero[m]), y)
        if m in head:
            entry["head_accuracy"] = accuracy(torch.cat(head[m]), y)
        mods[m] = entry
    return {"accuracy": accuracy(p, y), "macro_f1": macro_f1(p, y, model.num_classes),
            "loss": loss_sum / n, "n": n, "modalities": mods}

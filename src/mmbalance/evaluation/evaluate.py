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
def evaluate(model, method, batches: Iterable[Batch], device="cpu", autocast=None, gather=None,
             class_names=None) -> Dict:
    """Metrics of ``method``'s predictions over ``batches``. ``gather`` (e.g.
    ``distributed.all_gather_cat``) joins per-sample results of every process's shard before the
    metrics are computed, so every process returns the metrics of the whole split."""
    model.eval()
    cols: Dict[str, List[torch.Tensor]] = {"pred": [], "label": [], "loss": []}
    mods = list(model.modalities)
    import contextlib
    for batch in batches:
        batch = batch.to(device)
        with (autocast() if autocast else contextlib.nullcontext()):
            out = method.predict(model, batch)
            zl = method.zero_out_logits(model, out)
        logits = out.logits.float()
        cols["loss"].append(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none").cpu())
        cols["pred"].append(logits.argmax(1).cpu())
        cols["label"].append(batch.labels.cpu())
        for m, l in zl.items():
            cols.setdefault(f"zero:{m}", []).append(l.float().argmax(1).cpu())
        for m, l in out.unimodal_logits.items():
            cols.setdefault(f"head:{m}", []).append(l.float().argmax(1).cpu())
    # every process must gather the same columns, even with an empty shard
    keys = ["pred", "label", "loss"] + [f"{k}:{m}" for k in ("zero", "head") for m in mods]
    if gather is not None:
        have = torch.tensor([float(bool(cols.get(k))) for k in keys])
        from ..distributed import all_reduce_sum
        present = all_reduce_sum(have) > 0
        keys = [k for k, p in zip(keys, present) if p]
    else:
        keys = [k for k in keys if cols.get(k)]
    joined = {}
    for k in keys:
        local = torch.cat(cols[k]) if cols.get(k) else torch.zeros(0, dtype=torch.float32 if k == "loss" else torch.long)
        joined[k] = gather(local) if gather is not None else local
    if "label" not in joined or len(joined["label"]) == 0:
        raise ValueError("evaluation got no batches (empty split?)")
    y, p = joined["label"], joined["pred"]
    per_mod = {}
    for m in mods:
        entry = {}
        if f"zero:{m}" in joined:
            entry["zero_out_accuracy"] = accuracy(joined[f"zero:{m}"], y)
        if f"head:{m}" in joined:
            entry["head_accuracy"] = accuracy(joined[f"head:{m}"], y)
        per_mod[m] = entry
    res = {"accuracy": accuracy(p, y), "macro_f1": macro_f1(p, y, model.num_classes),
           "loss": float(joined["loss"].double().mean()), "n": int(len(y)), "modalities": per_mod}
    if class_names:
        res["per_class_accuracy"] = {str(class_names[c]): accuracy(p[y == c], y[y == c])
                                     for c in range(model.num_classes) if bool((y == c).any())}
    return res

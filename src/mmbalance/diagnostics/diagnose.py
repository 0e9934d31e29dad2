"""Is each modality used? ``diagnose(model, method, data)`` on a trained model, and
``diagnose_run(run_dir)`` / ``mmbalance diagnose RUN_DIR`` on a run folder's best checkpoint,
writing ``RUN_DIR/diagnostics.json``.

What is computed on the chosen split (``test`` by default, ``val`` on request):

* ``fused_accuracy`` -- the method's prediction (``method.predict``), as in ``result.json``;
* per modality: ``zero_out_accuracy`` (``method.zero_out_logits``), ``head_accuracy`` (the
  method's unimodal logits, where it has them), ``probe_accuracy`` (a multinomial logistic
  regression on the frozen encoder's standardised features, fitted on the train split with eval
  transforms, scored on the split), ``reference_accuracy`` (a matching ``unimodal`` run);
* ``shapley`` -- Shapley values of the modalities for accuracy and for the mean true-class
  probability; the value of a subset S is computed from the model's fusion with only S kept
  (``model.subset_logits``: features of the removed modalities zeroed, or their inputs with
  ``level="input"``). Exact for M <= 8, permutation sampling (with standard errors) beyond;
* ``cur`` -- Greedy's conditional utilisation rate (spec baselines §4.26 D3) for M = 2:
  ``CUR(m' -> m) = (A(all) - A(m alone)) / A(all)``, "m alone" = the other modality's feature
  replaced by its train-set mean; reported under ``rate[m']``;
* ``gap`` -- the GMM paper's modality gap per sample, ``softmax(l_i)[y] - softmax(l_j)[y]`` for
  every pair i < j, with the method's own per-modality logits when it defines them
  (``Method.zero_out_logits`` overridden, e.g. MLA's shared head) and the fusion's
  ``modality_logits`` otherwise (W-split for concat); 20-bin histogram on [-1, 1] and a
  2-component GMM (component 0 = balanced, mean nearest 0);
* ``ensemble_gap`` -- fused accuracy minus the accuracy of the averaged softmax of an ensemble of
  unimodal classifiers: the given ``unimodal`` reference runs when there is one per modality
  (``source: "references"``; each reference model is rebuilt from its folder and scored on the
  same split), else the method's per-modality heads (``source: "heads"``); the heads' ensemble is
  also kept under ``heads`` when both exist;
* ``verdicts`` -- one sentence per modality. **A modality is "used" when removing it (its
  features zeroed, the others kept, at the Shapley ``level``) lowers the fused accuracy by at
  least** :data:`~mmbalance.diagnostics.probes.USED_DROP_POINTS` **(1) percentage point.**

Models whose encoders exchange information between stages (``model.encoders_exchange``:
mid-level fusion, Greedy) cannot lose a modality at the feature level: for them the probe uses
each modality's features from a pass with the other inputs zeroed (``model.encode_alone``),
Shapley values and removal drops use input-level removal (``shapley.level_note`` says it was
forced), and CUR is reported undefined.

Non-finite numbers are written as ``null``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import MMBalanceError
from ..functional.scores import true_class_prob
from ..methods.base import Method
from . import probes as P

SPLITS = ("test", "val")
LEVELS = ("feature", "input")


def _batches(dataset, batch_size: int, device):
    from ..training.trainer import make_loader
    for batch in make_loader(dataset, range(len(dataset)), batch_size, 0):
        yield batch.to(device)


def _features(model, dataset, batch_size: int, device) -> tuple:
    """``({modality: [N, d] float features on the CPU}, [N] labels)`` of a split, eval mode."""
    feats: Dict[str, List[Tensor]] = {m: [] for m in model.modalities}
    ys: List[Tensor] = []
    for batch in _batches(dataset, batch_size, device):
        f = model.encode_alone(batch.inputs)  # = encode, unless the encoders exchange information
        for m in feats:
            feats[m].append(f[m].float().cpu())
        ys.append(batch.labels.cpu())
    if not ys:
        raise MMBalanceError("cannot compute features of an empty split")
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(ys)


def probe_accuracies(model, data, split: str = "test", device: str | torch.device = "cpu", batch_size: int = 256,
                     seed: int = 0) -> Dict[str, float]:
    """Each modality's linear-probe accuracy on ``split``: a multinomial logistic regression on the
    frozen encoder's standardised features of the train split (eval transforms). The model is put
    in eval mode; no gradients."""
    model.eval()
    with torch.no_grad():
        train_x, train_y = _features(model, data.train_eval, batch_size, torch.device(device))
        x, y = _features(model, data.splits[split], batch_size, torch.device(device))
    return {m: P.linear_probe_accuracy(train_x[m], train_y, x[m], y, seed=seed) for m in model.modalities}


def _method_has_own_modality_logits(method: Method) -> bool:
    return type(method).zero_out_logits is not Method.zero_out_logits


def _chunks(features: Mapping[str, Tensor], size: int = 4096):
    n = next(iter(features.values())).shape[0]
    for i in range(0, n, size):
        yield {m: z[i:i + size] for m, z in features.items()}


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


@torch.no_grad()
def diagnose(model, method: Method, data, split: str = "test", references: Optional[Mapping[str, float]] = None,
             level: str = "feature", device: str | torch.device = "cpu", *, batch_size: int = 256,
             n_permutations: int = 200, seed: int = 0,
             reference_probs: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Any]:
    """The diagnostics of a trained ``model`` under ``method`` on ``data`` (a DataBundle) as a
    JSON-ready dict (schema in the module docstring). ``references``: ``{modality: accuracy of
    that modality trained alone}`` on the same split; ``reference_probs``: ``{modality: [N, K]
    class probabilities of that unimodal model on the split, in the split's order}`` (for the
    ensemble gap). The model is put in eval mode."""
    if split not in SPLITS:
        raise MMBalanceError(f"split must be one of {SPLITS}, got '{split}'")
    if level not in LEVELS:
        raise MMBalanceError(f"level must be one of {LEVELS}, got '{level}'")
    references = dict(references or {})
    mods = list(model.modalities)
    unknown = [m for m in references if m not in mods]
    if unknown:
        raise MMBalanceError(f"references name modalities {unknown} the model does not have ({mods})")
    device = torch.device(device)
    model.to(device)
    model.eval()
    own_logits = _method_has_own_modality_logits(method)
    level_note = None
    if model.encoders_exchange and level == "feature":
        # mid-level fusion: a modality's features carry the others', so zeroing features does
        # not remove a modality; remove its input instead
        level, level_note = "input", "forced: the encoders exchange information between stages"

    exact, subsets = P.shapley_subsets(mods, n_permutations, seed)
    full = frozenset(mods)
    subsets = list(dict.fromkeys(list(subsets) + [full, frozenset()] + [full - {m} for m in mods]))
    acc_sum = {s: 0.0 for s in subsets}
    tcp_sum = {s: 0.0 for s in subsets}

    cols: Dict[str, List[Tensor]] = {}

    def put(key: str, t: Tensor) -> None:
        cols.setdefault(key, []).append(t.detach().float().cpu())

    n = 0
    for batch in _batches(data.splits[split], batch_size, device):
        y = batch.labels
        out = method.predict(model, batch)
        zl = method.zero_out_logits(model, out)
        own_logits = own_logits or bool(out.zero_out)
        feats = model.encode(batch.inputs)
        alone = model.encode_alone(batch.inputs) if model.encoders_exchange else feats
        put("label", y)
        put("fused", out.logits)
        for m in mods:
            put(f"feat:{m}", alone[m])
            if m in zl:
                put(f"zero:{m}", zl[m])
            if m in out.unimodal_logits:
                put(f"head:{m}", out.unimodal_logits[m])
        ml = zl if own_logits else model.modality_logits(feats)
        for m in mods:
            if m in ml:
                put(f"mlog:{m}", ml[m])
        sl = model.subset_logits(batch.inputs, subsets, level=level, bn="eval",
                                 features=feats if level == "feature" else None)
        for s, l in sl.items():
            l = l.float()
            acc_sum[s] += float((l.argmax(1) == y).double().sum())
            tcp_sum[s] += float(true_class_prob(l, y).double().sum())
        n += len(y)
    if n == 0:
        raise MMBalanceError(f"the '{split}' split is empty")
    col = {k: torch.cat(v) for k, v in cols.items()}
    y = col["label"].long()
    v_acc = {s: acc_sum[s] / n for s in subsets}
    v_tcp = {s: tcp_sum[s] / n for s in subsets}

    # train features: the probe and the train means of CUR
    train_x, train_y = _features(model, data.train_eval, batch_size, device)

    fused_acc = _acc(col["fused"], y)
    drops = {m: v_acc[full] - v_acc[full - {m}] for m in mods}

    # ------------------------------------------------------------------ per modality
    per_mod: Dict[str, Dict[str, float]] = {}
    for m in mods:
        e: Dict[str, float] = {}
        if f"zero:{m}" in col:
            e["zero_out_accuracy"] = _acc(col[f"zero:{m}"], y)
        if f"head:{m}" in col:
            e["head_accuracy"] = _acc(col[f"head:{m}"], y)
        e["probe_accuracy"] = P.linear_probe_accuracy(train_x[m], train_y, col[f"feat:{m}"], y, seed=seed)
        if m in references:
            e["reference_accuracy"] = float(references[m])
        e["removal_drop"] = drops[m]
        per_mod[m] = e

    # ---------------------------------------------------------------------- Shapley
    if exact:
        phi_acc = P.shapley_exact({s: v_acc[s] for s in P.all_subsets(mods)}, mods)
        phi_tcp = P.shapley_exact({s: v_tcp[s] for s in P.all_subsets(mods)}, mods)
        shap_extra: Dict[str, Any] = {}
    else:
        phi_acc, se_acc = P.shapley_monte_carlo(v_acc.__getitem__, mods, n_permutations, seed)
        phi_tcp, se_tcp = P.shapley_monte_carlo(v_tcp.__getitem__, mods, n_permutations, seed)
        shap_extra = {"n_permutations": int(n_permutations),
                      "stderr": {"accuracy": se_acc, "true_class_prob": se_tcp}}
    shapley = {"level": level, **({"level_note": level_note} if level_note else {}), "exact": bool(exact), "accuracy": phi_acc, "true_class_prob": phi_tcp,
               "v_all": {"accuracy": v_acc[full], "true_class_prob": v_tcp[full]},
               "v_none": {"accuracy": v_acc[frozenset()], "true_class_prob": v_tcp[frozenset()]},
               **shap_extra}

    # --------------------------------------------------------------------------- CUR
    if model.encoders_exchange:
        cur = {"defined": False, "why": "the encoders exchange information between stages, so replacing a "
                                        "modality's pooled feature does not remove it (Greedy logs its own CUR "
                                        "on the MMTM squeeze vectors: method.cur_every)"}
    else:
        cur = _cur(model, mods, {m: col[f"feat:{m}"] for m in mods}, y, train_x, device)

    # --------------------------------------------------------------------------- gap
    pairs = {}
    have = [m for m in mods if f"mlog:{m}" in col]
    tcp = {m: true_class_prob(col[f"mlog:{m}"], y) for m in have}
    for a, b in itertools.combinations(have, 2):
        pairs[f"{a}-{b}"] = P.gap_summary(tcp[a] - tcp[b], seed=seed)
    gap = {"logits": "method" if own_logits else "fusion.modality_logits", "pairs": pairs}

    # ------------------------------------------------------------------ ensemble gap
    heads = {m: col[f"head:{m}"] for m in mods if f"head:{m}" in col}
    head_gap = None
    if len(heads) == len(mods):
        ens = P.averaged_softmax_accuracy(heads, y)
        head_gap = {"source": "heads", "ensemble_accuracy": ens, "gap": fused_acc - ens}
    ref_probs = dict(reference_probs or {})
    for m, p in ref_probs.items():
        if m not in mods or tuple(p.shape) != (len(y), data.num_classes):
            raise MMBalanceError(f"reference probabilities for '{m}' must be [{len(y)}, {data.num_classes}] for a "
                                 f"modality of this model ({mods}); got {tuple(p.shape)}")
    if len(ref_probs) == len(mods):
        ens = P.averaged_probability_accuracy(ref_probs, y)
        ensemble_gap = {"source": "references", "ensemble_accuracy": ens, "gap": fused_acc - ens}
        if head_gap is not None:
            ensemble_gap["heads"] = head_gap
    elif head_gap is not None:
        ensemble_gap = head_gap
    else:
        ensemble_gap = {"source": "none", "ensemble_accuracy": None, "gap": None}

    verdicts = {m: P.verdict(m, drops[m], per_mod[m].get("zero_out_accuracy"), per_mod[m]["probe_accuracy"],
                             per_mod[m].get("reference_accuracy"), phi_acc.get(m)) for m in mods}
    res = {"split": split, "modalities": mods, "num_samples": int(n), "fused_accuracy": fused_acc,
           "per_modality": per_mod, "shapley": shapley, "cur": cur, "gap": gap,
           "ensemble_gap": ensemble_gap, "verdicts": verdicts,
           "used_rule": f"used = removing the modality lowers accuracy by >= {P.USED_DROP_POINTS:g} point(s)"}
    return _finite(res)


def _cur(model, mods: Sequence[str], feats: Mapping[str, Tensor], y: Tensor, train_x: Mapping[str, Tensor],
         device) -> Dict[str, Any]:
    if len(mods) != 2:
        return {"defined": False, "why": f"Greedy's conditional utilisation rate compares two modalities; this "
                                         f"model has {len(mods)}"}
    means = {m: train_x[m].mean(0) for m in mods}

    def acc(replace: Optional[str]) -> float:
        correct = 0.0
        off = 0
        for ch in _chunks(feats):
            b = next(iter(ch.values())).shape[0]
            f = {m: (means[m].expand_as(z) if m == replace else z).to(device) for m, z in ch.items()}
            correct += float((model.fuse(f).float().argmax(1).cpu() == y[off:off + b]).double().sum())
            off += b
        return correct / len(y)

    a_all = acc(None)
    if a_all <= 0:
        return {"defined": False, "why": "the fused accuracy is 0"}
    a, b = mods
    alone = {a: acc(b), b: acc(a)}  # "m alone": the other modality's feature at its train mean
    rate = {b: P.conditional_utilisation_rate(a_all, alone[a]),  # CUR(b -> a)
            a: P.conditional_utilisation_rate(a_all, alone[b])}
    return {"defined": True,
            "definition": "rate[m'] = CUR(m' -> m) = (A(all) - A(m alone)) / A(all); 'm alone' replaces the "
                          "other modality's feature by its train-set mean (Greedy, spec baselines 4.26 D3)",
            "accuracy_all": a_all, "accuracy_alone": alone, "rate": rate, "difference": rate[a] - rate[b]}


def _finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------------------ run folders
def reference_accuracies(run_dirs: Iterable[str | Path], modalities: Sequence[str], split: str = "test",
                         dataset: Optional[str] = None) -> Dict[str, float]:
    """``{modality: accuracy}`` of ``unimodal`` run folders (their ``result.json`` accuracy on
    ``split``); the modality is the run's ``method.modality`` (default: the first)."""
    return {m: acc for m, (acc, _) in _reference_runs(run_dirs, modalities, split, dataset).items()}


def _reference_runs(run_dirs: Iterable[str | Path], modalities: Sequence[str], split: str,
                    dataset: Optional[str]) -> Dict[str, tuple]:
    """``{modality: (accuracy on split, run folder)}``, every folder checked."""
    from ..training.trainer import load_run_config
    out: Dict[str, tuple] = {}
    for d in run_dirs:
        d = Path(d)
        res_path = d / "result.json"
        if not res_path.is_file():
            raise MMBalanceError(f"reference '{d}' has no result.json (is it a finished run folder?)")
        cfg = load_run_config(d)
        if cfg.method.name != "unimodal":
            raise MMBalanceError(f"reference '{d}' is a '{cfg.method.name}' run; a reference must be a 'unimodal' "
                                 f"run (mmbalance train --method unimodal method.modality=NAME ...)")
        res = json.loads(res_path.read_text())
        if dataset is not None and res.get("dataset") not in (None, dataset):
            raise MMBalanceError(f"reference '{d}' was trained on '{res.get('dataset')}', this run on '{dataset}'")
        m = getattr(cfg.method_options, "modality", None) or (res.get("modalities") or [None])[0]
        if m not in modalities:
            raise MMBalanceError(f"reference '{d}' trained modality '{m}', which this run does not have "
                                 f"({', '.join(modalities)})")
        if m in out:
            raise MMBalanceError(f"two references for modality '{m}'; give one per modality")
        out[m] = (float(res[split]["accuracy"]), d)
    return out


def reference_probabilities(run_dir: str | Path, split: str, labels: Tensor, device: str = "cpu") -> Tensor:
    """``[N, K]`` class probabilities of a ``unimodal`` run's best checkpoint on ``split``, in the
    split's order. ``labels`` (the diagnosed run's labels of that split) must match the reference's
    split row for row, so that both runs saw the same data."""
    parts, _ = _load_run(Path(run_dir))
    dev = torch.device(device)
    parts.model.to(dev).eval()
    probs, ys = [], []
    with torch.no_grad():
        for batch in _batches(parts.data.splits[split], 256, dev):
            probs.append(parts.method.predict(parts.model, batch).logits.float().softmax(1).cpu())
            ys.append(batch.labels.cpu())
    y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
    if y.shape != labels.shape or not torch.equal(y, labels.cpu().long()):
        raise MMBalanceError(f"reference '{run_dir}' has another '{split}' split than this run ({len(y)} vs "
                             f"{len(labels)} samples, or other labels): train both on the same data settings")
    return torch.cat(probs)


def _load_run(run_dir: Path):
    """Rebuild a run folder's parts from its config and load ``checkpoints/best.pt`` into them."""
    from ..training.build import CUSTOM_DATA, build_run
    from ..training.checkpoint import load_checkpoint
    from ..training.trainer import _same_tensors, load_run_config
    cfg = load_run_config(run_dir)
    if cfg.data.name.startswith(CUSTOM_DATA) or cfg.model.custom:
        what = f"data '{cfg.data.name}'" if cfg.data.name.startswith(CUSTOM_DATA) else f"model ({cfg.model.custom})"
        raise MMBalanceError(f"'{run_dir}' was trained from Python with its own {what}, which cannot be rebuilt "
                             f"from the config; call mmbalance.diagnostics.diagnose(model, method, data) on the "
                             f"same parts instead (load checkpoints/best.pt into them first)")
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        raise MMBalanceError(f"'{run_dir}' has no best checkpoint ({ckpt}); diagnose needs a finished run")
    parts = build_run(cfg)
    state = load_checkpoint(ckpt)
    if not _same_tensors(state.get("data_transform") or {}, parts.data.transform_state or {}):
        raise MMBalanceError(f"the data rebuilt for '{run_dir}' has other fitted statistics than the checkpoint's; "
                             f"the data changed since the run")
    parts.model.load_state_dict(state["model"])
    parts.method.load_state_dict(state["method"])
    # the rows the run held out of train for its method (G-Blending's V, ...) were not trained on;
    # leave them out of the probes' training features too, as the trainer's own probe does
    frac = cfg.data.method_holdout or float(parts.method.holdout_fraction())
    if frac:
        from ..training.build import carve_holdout
        data, _ = carve_holdout(parts.data, frac, cfg.train.seed)
        parts = dataclasses.replace(parts, data=data)
    return parts, cfg


def diagnose_run(run_dir: str | Path, split: str = "test", references: Sequence[str | Path] = (),
                 level: str = "feature", device: str = "cpu", write: bool = True) -> Dict[str, Any]:
    """Rebuild a run folder's parts from its config, load ``checkpoints/best.pt`` (model and
    method state), run :func:`diagnose` and write ``run_dir/diagnostics.json``. ``references``:
    folders of ``unimodal`` runs on the same dataset (their ``split`` accuracy becomes
    ``reference_accuracy``)."""
    from ..training.checkpoint import write_text
    run_dir = Path(run_dir)
    parts, _ = _load_run(run_dir)
    refs, probs = None, None
    if references:
        runs = _reference_runs(references, parts.data.modalities, split, parts.data.name)
        refs = {m: acc for m, (acc, _) in runs.items()}
        labels = torch.as_tensor(parts.data.splits[split].labels, dtype=torch.long)
        probs = {m: reference_probabilities(d, split, labels, device) for m, (_, d) in runs.items()}
    res = diagnose(parts.model, parts.method, parts.data, split=split, references=refs, level=level, device=device,
                   reference_probs=probs)
    res["run_dir"] = str(run_dir)
    if write:
        write_text(run_dir / "diagnostics.json", json.dumps(res, indent=2))
    return res

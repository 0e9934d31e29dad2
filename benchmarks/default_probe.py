"""The sweep that picked the synthetic default (issue 10 point 4): for each data setting, 3 seeds of
``joint`` (fused accuracy and x2's zero-out accuracy), ``unimodal`` on x1 and on x2, the ensemble of
those two unimodal models (averaged probabilities), ``ogm_ge`` and ``mla`` (fused and x2 zero-out).
Prints one markdown row per setting (mean ± std over seeds, in %). About 1 minute per setting here.

    .venv/bin/python benchmarks/default_probe.py            # every setting
    .venv/bin/python benchmarks/default_probe.py default    # only some, by name

The chosen default must show x2 under-used by joint (zero-out clearly below x2 alone, beyond the
seed spread) and leave a method room to help. The numbers are in the synthetic dataset's docstring.
"""
import statistics
import sys

import torch

from mmbalance.config import resolve_config
from mmbalance.data.batch import collate
from mmbalance.training.trainer import Trainer

SETTINGS = {
    "default": [],  # shared 0.9, unique [0.05, 0.05], noise [0.6, 1.5]
    "previous (shared .5, unique [.3,.1], noise [.6,1])": ["data.shared=0.5", "data.unique=[0.3,0.1]",
                                                            "data.noise=[0.6,1.0]"],
    "shared .8, unique [.15,.05], noise [.1,1.5]": ["data.shared=0.8", "data.unique=[0.15,0.05]", "data.noise=[0.1,1.5]"],
    "shared .7, unique [.25,.05], noise [.3,1.2]": ["data.shared=0.7", "data.unique=[0.25,0.05]", "data.noise=[0.3,1.2]"],
    "shared .7, unique [.2,.1], noise [.6,1.2]": ["data.shared=0.7", "data.unique=[0.2,0.1]", "data.noise=[0.6,1.2]"],
    "shared .8, unique [.1,.1], noise [.5,1.2]": ["data.shared=0.8", "data.unique=[0.1,0.1]", "data.noise=[0.5,1.2]"],
    "shared 1, unique [0,0], noise [.7,1.4]": ["data.shared=1.0", "data.unique=[0,0]", "data.noise=[0.7,1.4]"],
}
COLUMNS = ("joint", "joint x2 zero-out", "x1 alone", "x2 alone", "ensemble", "ogm_ge", "ogm_ge x2 zero-out",
           "mla", "mla x2 zero-out")


def run(method, over, seed):
    tr = Trainer(resolve_config("synthetic", method, overrides=list(over) + [f"seed={seed}", "train.progress=off",
                                                                           "train.threads=1", "train.probe=false"]),
                 None, quiet=True)
    return tr, tr.fit()["test"]


def test_probs(tr):
    ds = tr.data.splits["test"]
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return tr.method.predict(tr.model.eval(), batch).logits.softmax(1), batch.labels


def main(names):
    print("| setting | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name in names:
        over = SETTINGS[name]
        vals = {c: [] for c in COLUMNS}
        for seed in (0, 1, 2):
            for method in ("joint", "ogm_ge", "mla"):
                _, r = run(method, over, seed)
                vals[method].append(r["accuracy"])
                vals[f"{method} x2 zero-out"].append(r["modalities"]["x2"]["zero_out_accuracy"])
            p = {}
            for m in ("x1", "x2"):
                tr, r = run("unimodal", list(over) + [f"method.modality={m}"], seed)
                vals[f"{m} alone"].append(r["accuracy"])
                p[m], y = test_probs(tr)
            vals["ensemble"].append(float(((p["x1"] + p["x2"]) / 2).argmax(1).eq(y).double().mean()))
        cell = lambda v: f"{100 * statistics.fmean(v):.1f} ± {100 * statistics.stdev(v):.1f}"
        print(f"| {name} | " + " | ".join(cell(vals[c]) for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))

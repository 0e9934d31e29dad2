"""Probe for a synthetic default that makes the imbalance visible (issue 10 point 4): joint's weak-modality
zero-out accuracy against x2 trained alone, 3 seeds, for a few data settings. Prints a markdown row per setting.

    .venv/bin/python benchmarks/default_probe.py
"""
import statistics
from mmbalance.config import resolve_config
from mmbalance.training.trainer import Trainer
configs = {
  "current": [],
  "noise x1 0.3": ["data.noise=[0.3,1.0]"],
  "noise x1 0.3, x2 0.8": ["data.noise=[0.3,0.8]"],
  "shared 0.6, noise [0.3,0.8]": ["data.shared=0.6", "data.noise=[0.3,0.8]"],
  "shared 0.4, unique [0.4,0.2]": ["data.shared=0.4", "data.unique=[0.4,0.2]"],
  "shared 0.4, unique [0.4,0.2], noise [0.3,0.8]": ["data.shared=0.4", "data.unique=[0.4,0.2]", "data.noise=[0.3,0.8]"],
}
for name, ov in configs.items():
    jz, ua, jf = [], [], []
    for seed in (0, 1, 2):
        r = Trainer(resolve_config("synthetic", "joint", overrides=ov + [f"seed={seed}", "train.progress=off"]), None, quiet=True).fit()
        jz.append(r["test"]["modalities"]["x2"]["zero_out_accuracy"]); jf.append(r["test"]["accuracy"])
        u = Trainer(resolve_config("synthetic", "unimodal", overrides=ov + [f"seed={seed}", "method.modality=x2", "train.progress=off"]), None, quiet=True).fit()
        ua.append(u["test"]["accuracy"])
    f = lambda v: f"{100*statistics.fmean(v):.1f} ± {100*statistics.stdev(v):.1f}"
    print(f"| {name} | {f(jf)} | {f(jz)} | {f(ua)} |", flush=True)

"""Every registered method under torchrun (2 gloo processes): replicas stay identical, and where
the method's math does not depend on how a batch is split, the result equals one process on the
same global batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmbalance.methods import METHODS

WORKER = Path(__file__).with_name("replicas.py")
#: methods whose update is a function of the global batch only (no per-process random partner,
#: no per-process normalisation): 2 x 16 rows must equal 1 x 32 rows
SPLIT_INVARIANT = ["joint", "unimodal", "ensemble", "multiloss", "ogm", "ogm_ge", "mla", "agm", "amss", "amss_plus",
                   "inforeg", "lfm", "mlb", "mmcosine", "mmpareto", "mslr", "remix", "umt", "ume",
                   "reconboost", "cggm", "relearn"]


def _run(args, torchrun: bool):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pre = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.run(pre + [str(WORKER)] + args, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_every_method_keeps_replicas_identical_and_matches_one_process(tmp_path):
    _run([str(tmp_path / "two.pt"), "16"], torchrun=True)
    _run([str(tmp_path / "one.pt"), "32", ",".join(SPLIT_INVARIANT)], torchrun=False)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert sorted(two) == METHODS.names()
    drift = {m: r["rank_diff"] for m, r in two.items() if r["rank_diff"] != 0.0}
    assert not drift, f"parameters differ across ranks after 2 epochs: {drift}"
    gap = {m: float((two[m]["params"] - one[m]["params"]).abs().max()) for m in SPLIT_INVARIANT}
    assert max(gap.values()) < 1e-5, gap

"""Worker for the registry-wide replica test (run by tests/distributed/test_replicas.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed/replicas.py OUT.pt BATCH
    python tests/distributed/replicas.py OUT.pt 2*BATCH          # the 1-process reference

Every registered method trains 2 short epochs on a small synthetic set (warm-ups shortened to
1 epoch so each method's own mechanism runs in epoch 1). Under torchrun, rank 0 saves for each
method the largest parameter difference between the ranks; every run saves rank 0's parameters.
"""
from __future__ import annotations

import sys
from dataclasses import fields

import torch

from mmbalance import distributed as D
from mmbalance.config import resolve_config
from mmbalance.methods import METHODS, load_all
from mmbalance.training.trainer import Trainer

SMALL = ["data.n_train=128", "data.n_val=32", "data.n_test=32", "model.feature_dim=8", "model.hidden_dim=16",
         "model.fusion_hidden=16", "train.progress=off", "train.threads=1", "train.epochs=2"]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten() for v in model.state_dict().values() if v.is_floating_point()])


def main(out: str, batch_size: int, methods=None) -> None:
    D.init_from_env()
    torch.set_num_threads(1)
    load_all()
    report = {}
    try:
        for name in methods or METHODS.names():
            opts = {f.name for f in fields(METHODS.get(name).Options)}
            ov = SMALL + [f"data.batch_size={batch_size}"]
            if "warmup_epochs" in opts:
                ov.append("method.warmup_epochs=1")
            tr = Trainer(resolve_config("synthetic", name, overrides=ov), None, quiet=True)
            for epoch in range(2):
                tr.train_epoch(epoch)
            mine = flat_params(tr.model)
            every = D.all_gather_cat(mine[None])
            report[name] = {"params": mine, "rank_diff": float((every - every[0]).abs().max())}
            tr.close()
        if D.rank() == 0:
            torch.save(report, out)
    finally:
        D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3 else None)

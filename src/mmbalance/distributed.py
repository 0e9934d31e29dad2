"""The one reducer for statistics that span a dataset.

Every quantity aggregated over more than one batch (B-MM's rho sums, the GMM gap collection,
ARM's contributions, MIDAS's weights) goes through these functions. They are identities in a
single process and sum / gather across processes when ``torch.distributed`` is initialised.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes (a new tensor; ``x`` is untouched)."""
    y = x.detach().clone()
    if is_distributed():
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` (first dimension may differ per process) over processes, in rank order."""
    x = x.detach().contiguous()
    if not is_distributed():
        return x.clone()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    pad = max(sizes_i) - x.shape[0]
    xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    out = [torch.empty_like(xp) for _ in sizes_i]
    dist.all_gather(out, xp)
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)])


def scatter_by_index(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Place per-sample ``values`` at dataset ``index`` positions in a length-``size`` table,
    summed over processes (positions seen by no process stay 0); ``values`` may be [N] or [N, k]."""
    table = values.new_zeros((size, *values.shape[1:]))
    table.index_add_(0, index.to(values.device), values.detach())
    return all_reduce_sum(table)


def init_from_env(backend: str = "auto") -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    ``auto``: gloo where there is no GPU; with GPUs, torch's two-backend group
    ``cpu:gloo,cuda:nccl`` (collectives on CUDA tensors use NCCL, those on CPU tensors gloo) and
    this process's GPU is ``cuda:LOCAL_RANK``.
    """
    import os
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def local_rank() -> int:
    import os
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group (without this about 1 run in 3 aborts at exit under gloo)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_row_mean(x: Tensor) -> Tensor:
    """Mean over the first dimension of ``x`` taken over every process's rows (row counts may
    differ per process): one ``all_reduce`` of ``[sum of rows, row count]``, then the division.
    In one process this is ``x.mean(0)`` (as ``sum / count``). Detached; computed in ``x``'s dtype
    (pass a float32 ``x`` for a float32 mean)."""
    x = x.detach()
    flat = x.reshape(x.shape[0], -1)
    packed = torch.cat([flat.sum(dim=0), flat.new_full((1,), float(flat.shape[0]))])
    total = all_reduce_sum(packed)
    return (total[:-1] / total[-1]).reshape(x.shape[1:])

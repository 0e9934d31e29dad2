"""Counting host synchronisations (device -> host reads) of a piece of code, on any device.

A host sync is any operation whose result the host must wait for: reading a value
(``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` / ``if t:`` -- all dispatched as
``aten::_local_scalar_dense``), ops whose output *shape* depends on the data (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ...), and copies to the host
(``.tolist()``, ``.numpy()``, ``.cpu()``). On CPU none of these actually waits, but each one
would on CUDA; counting them on CPU is how the tests keep training steps sync-free.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from typing import Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                   "nonzero_static", "masked_scatter_", "_local_scalar_dense", "argwhere",
                   "repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...`` -> ``c.count`` and ``c.where`` (one short stack per sync)."""

    def __init__(self, stacks: bool = False):
        super().__init__()
        self.count = 0
        self.kinds: Counter = Counter()
        self.stacks = stacks
        self.where: List[str] = []
        self._patched: dict = {}

    def _hit(self, kind: str) -> None:
        self.count += 1
        self.kinds[kind] += 1
        if self.stacks:
            frames = [f for f in traceback.extract_stack()[:-2]
                      if "syncs.py" not in f.filename and "/torch/" not in f.filename]
            self.where.append(f"{kind}: " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}"
                                                          for f in reversed(frames[-4:])))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _DATA_DEPENDENT and not (name == "repeat_interleave" and "output_size" in kwargs):
            self._hit(name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else ()) if i is not None):
            self._hit("bool-mask index")
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for meth in ("tolist", "numpy", "cpu"):
            orig = getattr(torch.Tensor, meth)
            self._patched[meth] = orig

            def wrapped(t, *a, _orig=orig, _m=meth, **k):
                counter._hit(_m)
                return _orig(t, *a, **k)
            setattr(torch.Tensor, meth, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for meth, orig in self._patched.items():
            setattr(torch.Tensor, meth, orig)
        self._patched.clear()
        return super().__exit__(*exc)


@contextlib.contextmanager
def count_syncs(stacks: bool = False) -> Iterator[SyncCounter]:
    c = SyncCounter(stacks)
    with c:
        yield c

"""Counting, on CPU tensors, the operations that would make the host wait for a CUDA stream.

A test hook (never imported by the package). On a GPU the host synchronises with the device when
it reads a value (``item``, ``tolist``, ``numpy``, ``cpu``, ``__bool__``, ``int()``...), when an
operation's output size depends on the data (``nonzero``, boolean-mask indexing and assignment,
``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size``, torchvision's NMS,
whose CUDA kernel copies its overlap mask to the host), and when it copies host memory to the
device with a blocking copy (``.to(device)`` without ``non_blocking``, ``torch.tensor(...,
device=...)``). :class:`SyncCounter` sees every torch call (a ``TorchFunctionMode``, plus
``torch.from_numpy`` and ``torchvision.ops.nms`` patched) and counts those, on whatever device
the tensors are: run on CPU tensors, it says how often the same code would wait on a GPU.

Host tensors (made by ``torch.from_numpy``, or already read back by ``.cpu()``) are told apart so
that reading them again is not counted; a copy of one to a device (``.to(device)``) is counted in
``uploads`` (and as a synchronisation when it is blocking).
"""

from __future__ import annotations

import collections
import weakref

import torch
import torchvision
from torch.overrides import TorchFunctionMode

T = torch.Tensor

READS = {T.item, T.tolist, T.numpy, T.cpu, T.__bool__, T.__int__, T.__float__, T.__index__, T.__array__,
         T.__contains__}
DATA_SIZED = {torch.nonzero, T.nonzero, torch.argwhere, T.argwhere, torch.unique, T.unique, torch.unique_consecutive,
              T.unique_consecutive, torch.masked_select, T.masked_select}
INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put, torch.index_put}


def _has_bool_index(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.bool
    if isinstance(obj, (tuple, list)):
        return any(_has_bool_index(o) for o in obj)
    return False


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as c: ...`` then ``c.syncs`` (host waits for the device), ``c.uploads``
    (host -> device copies) and ``c.where`` (what was counted, by kind)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0
        self.uploads = 0
        self.where: collections.Counter = collections.Counter()
        self._host: dict[int, weakref.ref] = {}

    # host tensors -------------------------------------------------------------------------------
    def _mark_host(self, t):
        if isinstance(t, torch.Tensor):
            self._host[id(t)] = weakref.ref(t)

    def _is_host(self, t) -> bool:
        ref = self._host.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _count(self, kind: str, sync: bool = True):
        self.where[kind] += 1
        if sync:
            self.syncs += 1

    # the mode -----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        src = args[0] if args else None
        if func in READS:
            if not self._is_host(src):
                self._count(name)
        elif func in DATA_SIZED:
            self._count(name)
        elif func in (torch.where,) and len(args) + len(kwargs) == 1:
            self._count("where(cond)")
        elif func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs:
            self._count("repeat_interleave")
        elif func in INDEXING and _has_bool_index(args[1:]):
            self._count(f"{name}[bool]")
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            self._count("tensor(device=)")
        out = func(*args, **kwargs)
        if self._is_host(src) and (func is T.cuda or (func is T.to and _names_device(args, kwargs))):
            self.uploads += 1
            self._count("upload", sync=not kwargs.get("non_blocking", False))
            self._host.pop(id(out), None)  # now on the device (on CPU the same tensor)
        elif func in (T.cpu, T.numpy, T.pin_memory) or (self._is_host(src) and func in (T.contiguous, T.__getitem__)):
            self._mark_host(out)
        return out

    def __enter__(self):
        self._saved = (torch.from_numpy, torchvision.ops.nms)
        counter = self

        def from_numpy(a):
            t = counter._saved[0](a)
            counter._mark_host(t)
            return t

        def nms(*a, **k):
            counter._count("torchvision.ops.nms")
            return counter._saved[1](*a, **k)

        torch.from_numpy, torchvision.ops.nms = from_numpy, nms
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy, torchvision.ops.nms = self._saved
        return super().__exit__(*exc)


def _names_device(args, kwargs) -> bool:
    """A ``.to`` / ``.cuda`` that names a device (not only a dtype)."""
    return any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs


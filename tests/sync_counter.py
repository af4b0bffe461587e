"""Counting, on CPU tensors, the operations that would make the host wait for a CUDA stream.

A test hook (never imported by the package). On a GPU the host synchronises with the device when
it reads a value (``item``, ``tolist``, ``numpy``, ``cpu``, ``__bool__``, ``int()``...), when an
operation's output size depends on the data (``nonzero``, boolean-mask indexing and assignment,
``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size``, torchvision's NMS,
whose CUDA kernel copies its overlap mask to the host; ``torch.bincount``, whose CUDA kernel reads
its input's min and max: two waits), when it compares on the host (``torch.equal``), and when it
copies host memory to the device with a blocking copy (``.to(device)`` without ``non_blocking``,
``torch.tensor(..., device=...)``). A copy to the host (``.cpu()``, ``.to("cpu")``,
``.to(device="cpu")``, ``.numpy()``) is a wait. :class:`SyncCounter` sees every torch call (a ``TorchFunctionMode``, plus
``torch.from_numpy`` and ``torchvision.ops.nms`` patched) and counts those, on whatever device
the tensors are: run on CPU tensors, it says how often the same code would wait on a GPU.

The model's device on CPU tensors is a ``torch.device("cpu")`` object (as the package passes it), the
host the string ``"cpu"``. Host tensors (made by ``torch.from_numpy``, by a factory such as ``torch.tensor`` / ``zeros`` /
``arange`` without a ``device``, or already read back by ``.cpu()`` / ``.to("cpu")``) are told
apart so that reading them again is not counted; a copy of one to a device (``.to(device)``,
``.cuda()``) is counted in ``uploads`` (and as a synchronisation when it is blocking).

Not modelled (not counted, whatever they would cost on a GPU): ``Tensor.copy_`` between host and
device (either way), ``new_tensor`` from host data, ``.to(other_tensor)``, ``repr`` / ``str`` /
``format`` of a tensor (they read its values), ``is_nonzero``, waits inside kernels whose output
size depends on the data without an operation above (``one_hot`` without ``num_classes``, ``histc``
and the like), whether a host source is pinned (a non_blocking copy from pageable memory waits:
tests/test_cuda.py checks pinning on a GPU), and the caching allocator's own waits (``cudaMalloc``
when its pool is short, ``empty_cache``). tests/test_cuda.py counts the real waits on a GPU with
``torch.cuda.set_sync_debug_mode("error")``, which flags the synchronising calls torch itself
marks (not those inside a library's own code, such as nvJPEG's).
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
# Waits per call: torch.bincount on CUDA reads its input's min (the non-negative check) and max (the
# number of bins) on the host.
WAITS = {torch.bincount: 2, T.bincount: 2, torch.equal: 1, T.equal: 1}
# Factories that make a tensor on the host unless given a device.
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm}
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

    def _count(self, kind: str, waits: int = 1):
        """``waits`` host waits (0: counted by kind only, e.g. an asynchronous upload)."""
        self.where[kind] += max(waits, 1) if waits else 1
        self.syncs += waits

    # the mode -----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        src = args[0] if args else None
        if func in READS:
            if not self._is_host(src):
                self._count(name)
        elif func in WAITS:
            if not all(self._is_host(a) for a in args if isinstance(a, torch.Tensor)):
                self._count(name, WAITS[func])
        elif func is T.to and _names_cpu(args, kwargs):
            if not self._is_host(src):
                self._count("to(cpu)")
        elif func in DATA_SIZED:
            self._count(name)
        elif func in (torch.where,) and len(args) + len(kwargs) == 1:
            self._count("where(cond)")
        elif func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs:
            self._count("repeat_interleave")
        elif func in INDEXING and _has_bool_index(args[1:]):
            self._count(f"{name}[bool]")
        elif func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            self.uploads += 1
            self._count("tensor(device=)")
        out = func(*args, **kwargs)
        if func is T.to and _names_cpu(args, kwargs):
            self._mark_host(out)
        elif self._is_host(src) and (func is T.cuda or (func is T.to and _names_device(args, kwargs))):
            self.uploads += 1
            self._count("upload", 0 if kwargs.get("non_blocking", False) else 1)
            self._host.pop(id(out), None)  # now on the device (on CPU the same tensor)
        elif func in FACTORIES and not _on_device(kwargs.get("device")):
            self._mark_host(out)
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


def _device_of(args, kwargs):
    """The device a ``.to`` call names, or None (only a dtype, or another tensor's)."""
    for d in [kwargs.get("device"), *args[1:]]:
        if isinstance(d, (torch.device, str)):
            return d
    return None


# On CPU tensors the model's device is ``torch.device("cpu")`` (a device object, as the package
# passes it: ``self.device``, ``protos.device``), so that object stands for the accelerator; the
# host is named by the string (``.to("cpu")``, ``device="cpu"``), as a copy back is written.


def _names_device(args, kwargs) -> bool:
    """A ``.to`` that names the (simulated) device: a device object, or a string of another device."""
    d = _device_of(args, kwargs)
    return d is not None and not _is_host_name(d)


def _names_cpu(args, kwargs) -> bool:
    """A ``.to("cpu")`` / ``.to(device="cpu")``: a copy to the host."""
    d = _device_of(args, kwargs)
    return d is not None and _is_host_name(d)


def _is_host_name(d) -> bool:
    return isinstance(d, str) and torch.device(d).type == "cpu"


def _on_device(device) -> bool:
    """A factory's ``device=``: the (simulated) device, not None or ``"cpu"``."""
    return device is not None and not _is_host_name(device)

"""Model loading: a FastSAM / YOLOv8-seg checkpoint from a local path or object storage.

Never from a hub: a checkpoint that is not where the manifest says is an error before the run
starts. Remote checkpoints are copied once per node into a cache keyed by their SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .offline import configure_ultralytics
from .storage import Storage, protocol_of


class CheckpointError(FileNotFoundError):
    pass


def _cache_dir() -> Path:
    cache = Path(os.environ.get("FASTSAM_BATCH_CACHE", Path(tempfile.gettempdir()) / "fastsam-batch-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _copy_hashing(src, dst) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: src.read(1 << 20), b""):
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest()


def fetch_checkpoint(uri: str, storage: Storage) -> tuple[str, str]:
    """(a local path holding the checkpoint, its SHA-256), reading it once: a remote checkpoint is
    copied into this node's cache (where the actors on this node find it). Raises CheckpointError,
    naming the file and the cause, when it is missing or cannot be read."""
    from .storage import storage_error_cause

    try:
        if protocol_of(uri) == "file":
            path = uri.split("://", 1)[-1]
            if not os.path.isfile(path):
                raise CheckpointError(f"model.checkpoint {uri!r}: file not found (weights are never downloaded from a hub)")
            with open(path, "rb") as f:
                return path, _copy_hashing(f, None)
        cache = _cache_dir()
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, storage.fs(uri).open(uri, "rb") as src:
                sha = _copy_hashing(src, dst)
            dest = cache / f"{sha}{Path(uri).suffix or '.pt'}"
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return str(dest), sha
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"model.checkpoint {uri!r}: file not found (weights are never downloaded from a hub)") from None
    except Exception as e:  # noqa: BLE001 - permission, endpoint, ...: say which file and why
        raise CheckpointError(f"model.checkpoint {uri!r}: cannot read: {storage_error_cause(e)}") from None


def local_checkpoint(uri: str, storage: Storage, sha256: str) -> str:
    """A local path holding the checkpoint, verified against ``sha256``."""
    if protocol_of(uri) == "file":
        path = uri.split("://", 1)[-1]
        if not os.path.isfile(path):
            raise CheckpointError(f"model.checkpoint {uri!r}: file not found on this node")
        return path
    dest = _cache_dir() / f"{sha256}{Path(uri).suffix or '.pt'}"
    if not dest.exists():
        path, sha = fetch_checkpoint(uri, storage)
        if sha != sha256:
            raise CheckpointError(f"model.checkpoint {uri!r} changed during the run (SHA-256 mismatch)")
        return path
    return str(dest)


def check_checkpoint(path: str, uri: str) -> str:
    """Loads the checkpoint on this machine's CPU far enough to know it is a FastSAM / YOLO-seg model
    (before any Ray work starts); raises CheckpointError saying what it is instead. Returns its task."""
    configure_ultralytics()
    import torchvision  # noqa: F401 - as in load_model
    from ultralytics.nn import tasks

    try:
        model, _ = tasks.load_checkpoint(path, device="cpu", fuse=False)
    except Exception as e:  # noqa: BLE001 - the cause, in words
        text = f"{type(e).__name__}: {e}"
        if "PytorchStreamReader" in text or "central directory" in text or "EOF" in text:
            why = "the file is truncated or corrupt"
        elif "UnpicklingError" in text or "invalid load key" in text:
            why = "not a PyTorch checkpoint (it does not unpickle)"
        elif isinstance(e, (KeyError, AttributeError, TypeError)):
            why = "a PyTorch file without an ultralytics model in it (a bare state_dict?)"
        else:
            why = text.splitlines()[0][:200]
        raise CheckpointError(f"model.checkpoint {uri!r}: {why}; a FastSAM / YOLOv8-seg .pt checkpoint is needed") from None
    # By the model's class (subclasses first): the saved task argument defaults to 'detect'.
    kinds = (("SegmentationModel", "segment"), ("PoseModel", "pose"), ("OBBModel", "obb"),
             ("ClassificationModel", "classify"), ("DetectionModel", "detect"))
    task = next((t for name, t in kinds if hasattr(tasks, name) and isinstance(model, getattr(tasks, name))),
                getattr(model, "task", None))
    if task != "segment":
        raise CheckpointError(f"model.checkpoint {uri!r}: a {task!r} checkpoint, not a segmentation "
                              "(FastSAM / YOLOv8-seg) one")
    return task


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {device!r} but CUDA is not available on this node")
    return torch.device(device)


def load_model(path: str, device, half: bool = False):
    """The fused eval-mode torch module of a checkpoint, as ultralytics' predictor loads it."""
    configure_ultralytics()
    import torchvision  # noqa: F401 - with it imported, any ultralytics NMS runs torchvision's kernel, never
    # ultralytics' pure-torch fallback (its non_max_suppression checks sys.modules)
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(path, device=device, fuse=True)
    if getattr(model, "task", "segment") != "segment":
        raise CheckpointError(f"{path}: a '{model.task}' checkpoint, not a segmentation (FastSAM / YOLO-seg) one")
    if half and device.type == "cuda":
        model = model.half()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

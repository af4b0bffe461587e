"""Model loading: a FastSAM / YOLOv8-seg checkpoint from a local path or object storage.

Never from a hub: a checkpoint that is not where the manifest says is an error before the run
starts. Remote checkpoints are copied once per node into a cache keyed by their SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .offline import configure_ultralytics
from .storage import Storage, protocol_of


class CheckpointError(FileNotFoundError):
    pass


def checkpoint_sha256(uri: str, storage: Storage) -> str:
    """SHA-256 of the checkpoint bytes; raises CheckpointError when it is missing."""
    fs = storage.fs(uri)
    try:
        if not fs.isfile(uri):
            raise CheckpointError(f"model.checkpoint {uri!r}: file not found (weights are never downloaded from a hub)")
        h = hashlib.sha256()
        with fs.open(uri, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - permission, endpoint, ...: say which file
        raise CheckpointError(f"model.checkpoint {uri!r}: cannot read: {e}") from None
    return h.hexdigest()


def local_checkpoint(uri: str, storage: Storage, sha256: str) -> str:
    """A local path holding the checkpoint, verified against ``sha256``."""
    if protocol_of(uri) == "file":
        path = uri.split("://", 1)[-1]
        if not os.path.isfile(path):
            raise CheckpointError(f"model.checkpoint {uri!r}: file not found on this node")
        return path
    cache = Path(os.environ.get("FASTSAM_BATCH_CACHE", Path(tempfile.gettempdir()) / "fastsam-batch-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{sha256}{Path(uri).suffix or '.pt'}"
    if not dest.exists():
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        os.close(fd)
        h = hashlib.sha256()
        with storage.fs(uri).open(uri, "rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
        if h.hexdigest() != sha256:
            os.unlink(tmp)
            raise CheckpointError(f"model.checkpoint {uri!r} changed during the run (SHA-256 mismatch)")
        shutil.move(tmp, dest)
    return str(dest)


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

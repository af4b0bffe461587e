"""Text prompts: CLIP from a local folder or object storage, in open_clip's format.

Why open_clip: its folder format (``open_clip_config.json`` + a weights file, the layout of
open_clip models on model hubs, loaded with ``local-dir:``) is self-describing, and its CLIP BPE
tokenizer ships inside the package, so nothing is fetched at run time. (transformers' CLIP needs
tokenizer files next to the weights and pulls in a much larger dependency.) A folder whose
config names a Hugging Face tokenizer (``hf_tokenizer_name``) is refused: that tokenizer would be
downloaded.

The folder is checked on the driver before the run (config and weights present, SHA-256 of both
in the run fingerprint), copied once per node into a cache keyed by that hash, and loaded once
per segment actor. Text embeddings are computed once per distinct text per actor and cached;
an image's mask crops are embedded in batches, once per image, however many texts it has.

The crop of a mask is what ultralytics' ``FastSAMPredictor.prompt`` scores: the image inside the
mask's detection box (int-truncated), with pixels outside the mask set to black. Masks with
``min_area`` pixels or fewer are not scored (the reference's 100).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .intervals import IntervalMask, to_crop
from .storage import Storage, join_uri, protocol_of

CONFIG_NAME = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class ClipError(FileNotFoundError):
    pass


def _files(uri: str, storage: Storage) -> tuple[str, str]:
    """(config uri, weights uri) of a CLIP folder; ClipError naming what is missing."""
    fs = storage.fs(uri)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(uri.rstrip("/"), detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        raise ClipError(f"prompts.clip {uri!r}: no such folder (CLIP is never downloaded from a hub)") from None
    if CONFIG_NAME not in names:
        raise ClipError(f"prompts.clip {uri!r}: no {CONFIG_NAME} in the folder (open_clip's format)")
    weights = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ClipError(f"prompts.clip {uri!r}: no weights file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) in the folder")
    preferred = [n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                             "open_clip_pytorch_model.bin") if n in weights]
    if len(weights) > 1 and not preferred:
        raise ClipError(f"prompts.clip {uri!r}: several weights files ({weights}); keep one")
    return join_uri(uri, CONFIG_NAME), join_uri(uri, (preferred or weights)[0])


def clip_sha256(uri: str, storage: Storage) -> str:
    """Checks the folder (before the run) and returns one SHA-256 over its config and weights."""
    config_uri, weights_uri = _files(uri, storage)
    config = json.loads(storage.read_bytes(config_uri))
    text_cfg = config.get("model_cfg", config).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise ClipError(f"prompts.clip {uri!r}: the model uses a Hugging Face text tower/tokenizer, which would be "
                        "downloaded; use a CLIP with open_clip's built-in tokenizer (e.g. ViT-B-32)")
    h = hashlib.sha256()
    for u in (config_uri, weights_uri):
        with storage.fs(u).open(u, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def local_clip_dir(uri: str, storage: Storage, sha256: str) -> str:
    """A local folder holding the CLIP config and weights (copied once per node when remote)."""
    config_uri, weights_uri = _files(uri, storage)
    if protocol_of(uri) == "file":
        return uri.split("://", 1)[-1].rstrip("/")
    cache = Path(os.environ.get("FASTSAM_BATCH_CACHE", Path(tempfile.gettempdir()) / "fastsam-batch-cache"))
    dest = cache / f"clip-{sha256}"
    if not dest.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".clip-"))
        for u in (config_uri, weights_uri):
            storage.fs(u).get(u, str(tmp / u.rsplit("/", 1)[-1]))
        try:
            os.rename(tmp, dest)
        except OSError:  # another actor on this node won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


class ClipScorer:
    """CLIP loaded once; text embeddings cached per text; mask crops embedded once per image."""

    def __init__(self, path: str, device, batch_size: int = 64, min_area: int = 100):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import open_clip
        import torch

        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.min_area = min_area
        name = "local-dir:" + path
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self._text: dict[str, np.ndarray] = {}
        # Held around every use of the device: an actor sets it to its device lock, so CLIP and the
        # model never run on the accelerator at once (see segment.SegmentActor). Host work (crops,
        # preprocessing) stays outside it; CLIP's device memory is one batch of crops.
        self.device_lock = contextlib.nullcontext()

    def text_embedding(self, text: str) -> np.ndarray:
        if text not in self._text:
            torch = self.torch
            with torch.inference_mode(), self.device_lock:
                f = self.model.encode_text(self.tokenizer([text]).to(self.device)).float()
                self._text[text] = torch.nn.functional.normalize(f, dim=-1)[0].cpu().numpy()
        return self._text[text]

    def crop_embeddings(self, image: np.ndarray, masks: list[IntervalMask]) -> np.ndarray | None:
        """(n x d) normalised embeddings of each mask's masked crop, NaN rows for unscored masks;
        None when no mask can be scored."""
        from PIL import Image

        torch = self.torch
        h = image.shape[0]
        scored, crops = [], []
        for i, m in enumerate(masks):
            if m.area <= self.min_area:
                continue
            x1, y1, x2, y2 = (int(v) for v in m.box)
            if x2 <= x1 or y2 <= y1:
                continue
            crop = image[y1:y2, x1:x2] * to_crop(m.starts, m.ends, x1, y1, x2, y2, h)[:, :, None]
            crops.append(self.preprocess(Image.fromarray(crop)))
            scored.append(i)
        if not crops:
            return None
        out = np.full((len(masks), 0), np.nan, np.float32)
        with torch.inference_mode():
            for a in range(0, len(crops), self.batch_size):
                batch = torch.stack(crops[a:a + self.batch_size])
                with self.device_lock:  # one batch of crops at a time on the device
                    f = self.model.encode_image(batch.to(self.device)).float()
                    f = torch.nn.functional.normalize(f, dim=-1).cpu().numpy()
                if out.shape[1] == 0:
                    out = np.full((len(masks), f.shape[1]), np.nan, np.float32)
                out[scored[a:a + len(f)]] = f
        return out

    def similarity_fn(self, image: np.ndarray, masks: list[IntervalMask]):
        """A ``similarity(text)`` for :func:`select.select_text`, embedding the crops on first use."""
        cache: dict = {}

        def similarity(text: str) -> np.ndarray | None:
            if "emb" not in cache:
                cache["emb"] = self.crop_embeddings(image, masks)
            emb = cache["emb"]
            return None if emb is None else emb @ self.text_embedding(text)

        return similarity

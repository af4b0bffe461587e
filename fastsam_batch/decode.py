"""Decode stage: image bytes -> RGB uint8 array of the displayed image, or a reason it can't be.

Strict and robust: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF; grayscale, 16-bit, CMYK,
palette and alpha images become 3-channel RGB of the same size (alpha is dropped, as OpenCV's
``imread`` does); EXIF orientation is applied, so width and height are those of the image as
displayed. Decompression bombs are refused from the header, before any pixel is decoded.
"""

from __future__ import annotations

import functools
import io
import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Pillow's own bomb limit (about 179 MP at the time of writing) is the default; the manifest can
# change it. We check it ourselves to give a clear reason instead of Pillow's warning/exception.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 178_956_970)
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _original_pil_open():
    """Pillow's own ``Image.open``. ultralytics replaces it at import with a wrapper that, on an
    unidentified file, tries to pip-install a HEIF plugin: never wanted at run time here."""
    if Image.open.__module__ == "PIL.Image":
        return Image.open
    return sys.modules["ultralytics.utils.patches"]._image_open


_pil_open = _original_pil_open()

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"})
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF"})


class DecodeError(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-friendly category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 HxWx3 array of the displayed image. Raises :class:`DecodeError`."""
    return _decode(data, max_pixels, None)[0]


def decode_for_model(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, imgsz: int | None = None
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB array, (height, width) of the displayed image). With ``imgsz``, a JPEG much larger than
    the model's input is decoded at a reduced size by the decoder's own DCT scaling (1/2, 1/4 or
    1/8: Pillow's ``draft``), never below what the letterbox at ``imgsz`` takes from it: 3-4x less
    decode time and object store for a photo, while the masks, computed from the model's output at
    the displayed size, still cover every pixel. The model sees the image resampled from the reduced
    decode rather than from the full one, so masks are close to, not identical with, ultralytics'
    (benchmarks/RESULTS.md states the agreement). Without ``imgsz``, or for other formats: the full
    image, exactly :func:`decode_image`. Raises :class:`DecodeError`."""
    return _decode(data, max_pixels, imgsz)


# Margin over imgsz when asking for a reduced decode: the model rounds imgsz up to its stride.
_STRIDE_MARGIN = 32


def _decode(data: bytes, max_pixels: int, imgsz: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    # Pillow warns (UserWarning) of corrupt EXIF or TIFF tags it skips; the image is used as
    # stored, as OpenCV does, and the warnings would only fill the workers' logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _decode_quietly(data, max_pixels, imgsz)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read (no pixels yet), or the DecodeError its file deserves."""
    if not data:
        raise DecodeError("empty_file", "the file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _pil_open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except Image.UnidentifiedImageError:
        fmt = sniff_format(data)
        if fmt:
            raise DecodeError("corrupt_image", f"{fmt} signature but an unreadable header") from None
        raise DecodeError("not_an_image", "the bytes are not a supported image format") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not a bug here
        raise DecodeError("corrupt_image", f"cannot read header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("corrupt_image", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError("too_many_pixels", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return img


def _decode_quietly(data: bytes, max_pixels: int, imgsz: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    img = _open(data, max_pixels)
    w, h = img.size
    try:
        img.seek(0)  # first frame of a GIF / multi-page TIFF
        reduced = None
        if imgsz and img.format == "JPEG":
            r = (imgsz + _STRIDE_MARGIN) / max(w, h)
            if r < 0.5:  # a DCT scale of 1/2 or less still covers the letterbox
                reduced = img.draft(img.mode, (math.ceil(w * r), math.ceil(h * r)))
        img.load()
        turned = _exif_orientation(img) in (5, 6, 7, 8)  # shown rotated by a quarter turn
        arr = _to_rgb(ImageOps.exif_transpose(img))
        return arr, ((w, h) if turned else (h, w)) if reduced else arr.shape[:2]
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e) or type(e).__name__
        reason = "truncated_image" if "truncat" in msg.lower() else "corrupt_image"
        raise DecodeError(reason, msg) from None


# ------------------------------------------------------------------------ decoding on the device
@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG left for the model's device to decode (``input.decode: device``): its bytes, its size
    as shown and its EXIF orientation (applied after decoding: nvJPEG does not)."""

    data: bytes
    shown: tuple[int, int]
    orientation: int


def probe_for_device(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DeviceJpeg | None:
    """A :class:`DeviceJpeg` for a JPEG the device decodes as Pillow would (a baseline or progressive
    RGB or grayscale JPEG with its end marker), from its header only; None for any other file, which
    is then decoded by Pillow as always (CMYK JPEGs, other formats). A file whose header Pillow
    refuses raises the :class:`DecodeError` :func:`decode_for_model` would raise, so error rows are
    the same in every mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        img = _open(data, max_pixels)
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            return None
        orientation = _exif_orientation(img)
    w, h = img.size
    return DeviceJpeg(data, (w, h) if orientation in (5, 6, 7, 8) else (h, w), orientation)


@functools.lru_cache(maxsize=1)
def device_decode_supported() -> bool:
    """Whether torchvision here decodes batches of JPEGs on a CUDA device (``decode_jpeg`` of a list,
    torchvision 0.19 and later, built with nvJPEG): probed once per process by decoding a tiny JPEG
    on the GPU (a build can register ``decode_jpegs_cuda`` and raise when called, without nvJPEG).
    In a process that has not touched CUDA yet (a run's driver) the probe runs in a child process,
    so that this one does not keep a CUDA context (hundreds of MB of the GPU) for nothing."""
    try:
        import torch
        import torchvision  # noqa: F401
        from torchvision.io import decode_jpeg  # noqa: F401

        if not hasattr(torch.ops.image, "decode_jpegs_cuda") or not torch.cuda.is_available():
            return False
        if torch.cuda.is_initialized():
            return decodes_on_cuda()
        import os
        import subprocess
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[1])  # where this package is imported from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        probe = "import sys; from fastsam_batch.decode import decodes_on_cuda; sys.exit(0 if decodes_on_cuda() else 3)"
        return subprocess.run([sys.executable, "-c", probe], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env, timeout=300).returncode == 0
    except Exception:  # noqa: BLE001 - no torchvision, one without its image extension, no nvJPEG, no GPU
        return False


def decodes_on_cuda() -> bool:
    """A tiny JPEG (16 x 8, one colour) decoded by ``decode_jpeg`` on the GPU, in this process: true
    when it comes back of its size and colour (nvJPEG works), false when the call raises."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    b = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 100, 50)).save(b, format="JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = decode_jpeg([torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8)], mode=ImageReadMode.RGB,
                              device="cuda")[0]
        mean = out.float().mean(dim=(1, 2)).cpu()
    except Exception:  # noqa: BLE001 - registered but not built with nvJPEG, or no usable GPU
        return False
    return tuple(out.shape) == (3, 8, 16) and float((mean - torch.tensor([200.0, 100.0, 50.0])).abs().max()) < 16


def orient(image, orientation: int):
    """EXIF ``orientation`` applied to a (channels, height, width) tensor, as Pillow's
    ``ImageOps.exif_transpose`` does it (device operations; no copy to the host)."""
    import torch

    ops = {2: lambda x: x.flip(-1), 3: lambda x: x.flip(-1, -2), 4: lambda x: x.flip(-2),
           5: lambda x: x.transpose(-2, -1), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
           7: lambda x: x.transpose(-2, -1).flip(-1, -2), 8: lambda x: torch.rot90(x, 1, (-2, -1))}
    return ops[orientation](image) if orientation in ops else image


def decode_on_device(jpegs: list[DeviceJpeg], device) -> list:
    """Each JPEG decoded on ``device`` in one batched ``torchvision.io.decode_jpeg`` call (nvJPEG on
    CUDA; libjpeg-turbo on the CPU, as the tests run it), oriented, as an (height, width, 3) uint8
    tensor on the device. A JPEG the device refuses (the batch failing, then that file alone) is
    decoded by Pillow instead (a host array), and a file Pillow refuses too is its DecodeError.
    :func:`decode_jpegs_on_device` (the device's part: an actor holds its device lock for it) then
    :func:`decode_refused_on_host` (Pillow's, outside the lock)."""
    return decode_refused_on_host(jpegs, decode_jpegs_on_device(jpegs, device))


def decode_jpegs_on_device(jpegs: list[DeviceJpeg], device) -> list:
    """The device's part of :func:`decode_on_device`: each JPEG as an oriented (height, width, 3)
    uint8 tensor on ``device``, or None where the device refused it (or decoded it at another size
    than Pillow shows). On CUDA the host waits for the device once per call (below), and nvJPEG's
    batched decode waits for its own stream before it returns."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not jpegs:
        return []
    raw = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
    if torch.device(device).type == "cuda":
        # nvJPEG decodes on a stream of its own, not ordered after this one: memory this stream has
        # freed but still uses (a forward pass that raised, say) could be reused under it
        # (pytorch/vision#9606). One wait per batch; after a normal batch there is nothing left to wait for.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders for TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except Exception:  # noqa: BLE001 - some file of the batch refused: each alone
            decoded = []
            for r in raw:
                try:
                    decoded.append(decode_jpeg([r], mode=ImageReadMode.RGB, device=device)[0])
                except Exception:  # noqa: BLE001
                    decoded.append(None)
    out = []
    for j, d in zip(jpegs, decoded):
        if d is not None:
            d = orient(d, j.orientation).permute(1, 2, 0)
            if tuple(d.shape[:2]) != j.shown:
                d = None
        out.append(d)
    return out


def decode_refused_on_host(jpegs: list[DeviceJpeg], decoded: list) -> list:
    """The host's part of :func:`decode_on_device`: where the device gave None, Pillow's decode (a
    host array), as for every other file, or the :class:`DecodeError` Pillow raises."""
    out = []
    for j, d in zip(jpegs, decoded):
        if d is not None:
            out.append(d)
            continue
        try:
            out.append(decode_for_model(j.data, max_pixels=1 << 62)[0])
        except DecodeError as e:
            out.append(e)
    return out


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: shown as stored, as exif_transpose does
        return 1


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            # 16-bit grayscale: keep the high byte, as OpenCV's imread does for 8-bit colour output.
            arr = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.stack([arr] * 3, axis=-1))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([arr] * 3, axis=-1))
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "RGBa", "La"):
        img = img.convert("RGBA").convert("RGB")  # drop alpha, keep colour values
    elif img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DecodeError("corrupt_image", f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format a file's first bytes claim, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def looks_like_image(key: str) -> bool:
    """True when the key's extension is one of the image formats we decode."""
    dot = key.rfind(".")
    return dot >= 0 and key[dot:].lower() in IMAGE_EXTENSIONS

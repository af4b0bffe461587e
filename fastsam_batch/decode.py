"""Decode stage: image bytes -> RGB uint8 array of the displayed image, or a reason it can't be.

Strict and robust: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF; grayscale, 16-bit, CMYK,
palette and alpha images become 3-channel RGB of the same size (alpha is dropped, as OpenCV's
``imread`` does); EXIF orientation is applied, so width and height are those of the image as
displayed. Decompression bombs are refused from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
import sys
import warnings

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


def _decode_quietly(data: bytes, max_pixels: int, imgsz: int | None) -> tuple[np.ndarray, tuple[int, int]]:
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

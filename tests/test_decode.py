"""Decoding the images users really have, in the frame OpenCV's imread (ultralytics' reader) gives."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from fastsam_batch.decode import DecodeError, decode_image, looks_like_image


def rgb_array(w=40, h=24, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[..., 2] = rng.integers(0, 255, (h, w))
    return a


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cv2_rgb(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return bgr[..., ::-1]


LOSSLESS = {
    "png_rgb": lambda: encode(Image.fromarray(rgb_array()), "PNG"),
    "png_gray": lambda: encode(Image.fromarray(rgb_array()[..., 0]), "PNG"),
    "png_16bit": lambda: encode(Image.fromarray((rgb_array()[..., 1].astype(np.uint16) * 257 + 3)), "PNG"),
    "png_rgba": lambda: encode(Image.fromarray(np.dstack([rgb_array(), np.full((24, 40), 77, np.uint8)]), "RGBA"), "PNG"),
    "png_palette": lambda: encode(Image.fromarray(rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "bmp": lambda: encode(Image.fromarray(rgb_array()), "BMP"),
    "tiff": lambda: encode(Image.fromarray(rgb_array()), "TIFF"),
    "webp_lossless": lambda: encode(Image.fromarray(rgb_array()), "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_formats_equal_opencv(name):
    data = LOSSLESS[name]()
    ours = decode_image(data)
    ref = cv2_rgb(data)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (24, 40, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_jpeg_close_to_opencv():
    data = encode(Image.fromarray(rgb_array(64, 48)), "JPEG", quality=95)
    ours, ref = decode_image(data), cv2_rgb(data)
    assert ours.shape == ref.shape == (48, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 2


def test_cmyk_jpeg_becomes_rgb_of_same_size():
    data = encode(Image.fromarray(rgb_array(30, 20)).convert("CMYK"), "JPEG")
    out = decode_image(data)
    assert out.shape == (20, 30, 3)


def test_gif_first_frame():
    frames = [Image.fromarray(np.full((10, 16, 3), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out.shape == (10, 16, 3)
    assert abs(int(out.mean()) - 10) <= 2


@pytest.mark.parametrize("orientation,expected_hw", [(1, (24, 40)), (3, (24, 40)), (6, (40, 24)), (8, (40, 24))])
def test_exif_orientation_applied_like_opencv(orientation, expected_hw):
    img = Image.fromarray(rgb_array())
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    ours, ref = decode_image(data), cv2_rgb(data)
    assert ours.shape[:2] == ref.shape[:2] == expected_hw
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 3


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_file"),
        (b"this is a text file, not an image\n" * 10, "not_an_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt_image"),
    ],
)
def test_bad_bytes_give_reasons(data, reason):
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_truncated_image():
    data = encode(Image.fromarray(rgb_array(200, 150)), "JPEG", quality=95)
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated_image"
    png = encode(Image.fromarray(rgb_array(200, 150)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode_image(png[: len(png) // 2])
    assert e.value.reason in ("truncated_image", "corrupt_image")


def test_decompression_bomb_refused_from_header():
    data = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode_image(data, max_pixels=5_000_000)
    assert e.value.reason == "too_many_pixels" and "6000000" in str(e.value)
    assert decode_image(data, max_pixels=6_000_000).shape == (2000, 3000, 3)


def test_extension_filter():
    assert looks_like_image("a/b/C.JPG") and looks_like_image("x.tiff") and looks_like_image("x.webp")
    assert not looks_like_image("notes.txt") and not looks_like_image("README") and not looks_like_image("x.jpg.json")


def test_ultralytics_pillow_patch_is_bypassed():
    # ultralytics patches PIL.Image.open to pip-install a HEIF plugin on unidentified files.
    import ultralytics.utils.patches as patches

    from fastsam_batch.decode import _original_pil_open

    assert Image.open is patches.image_open
    assert _original_pil_open() is patches._image_open  # what decode uses when imported after ultralytics
    with pytest.raises(DecodeError) as e:
        decode_image(b"plain text, no image here\n" * 5)
    assert e.value.reason == "not_an_image"


# ----------------------------------------------------------------------------- reduced decode
def big_jpeg(w=1400, h=1000, orientation: int | None = None) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(np.resize(rgb_array(), (h, w, 3))))
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        return encode(img, "JPEG", quality=90, exif=exif)
    return encode(img, "JPEG", quality=90)


def test_reduced_decode_of_a_large_jpeg_keeps_the_shown_size():
    from fastsam_batch.decode import decode_for_model

    data = big_jpeg()
    full = decode_image(data)
    small, shown = decode_for_model(data, imgsz=320)
    assert shown == full.shape[:2] == (1000, 1400)
    assert small.shape == (500, 700, 3)  # DCT scale 1/2: still more than the 320-pixel letterbox takes
    tiny, _ = decode_for_model(big_jpeg(3200, 2400), imgsz=320)
    assert tiny.shape == (300, 400, 3)  # 1/8, the largest scale that still covers 320 + a stride
    same, shown = decode_for_model(data, imgsz=1024)  # not 2x larger than the model input: full size
    assert np.array_equal(same, full) and shown == (1000, 1400)
    same, shown = decode_for_model(data)  # no imgsz: exactly decode_image
    assert np.array_equal(same, full) and shown == (1000, 1400)


def test_reduced_decode_applies_exif_orientation_to_the_shown_size():
    from fastsam_batch.decode import decode_for_model

    for orientation in (6, 8, 3):
        data = big_jpeg(orientation=orientation)
        full = decode_image(data)
        small, shown = decode_for_model(data, imgsz=320)
        assert shown == full.shape[:2] == ((1400, 1000) if orientation in (6, 8) else (1000, 1400))
        assert small.shape[:2] == (shown[0] // 2, shown[1] // 2)


def test_reduced_decode_leaves_other_formats_whole():
    from fastsam_batch.decode import decode_for_model

    data = encode(Image.fromarray(np.ascontiguousarray(np.resize(rgb_array(), (1000, 1400, 3)))), "PNG")
    arr, shown = decode_for_model(data, imgsz=320)
    assert np.array_equal(arr, decode_image(data)) and shown == (1000, 1400)
    with pytest.raises(DecodeError) as e:
        decode_for_model(big_jpeg()[:5000], imgsz=320)
    assert e.value.reason == "truncated_image"


def test_the_read_decode_stage_imports_no_torch():
    """The read/decode workers import fastsam_batch.pipeline (ReadDecode is pickled by reference):
    torch there would cost each of them seconds of CPU and hundreds of MB at start."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import sys, fastsam_batch.pipeline, fastsam_batch.read, "
                        "fastsam_batch.decode; print(sorted(m for m in ('torch', 'ultralytics') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

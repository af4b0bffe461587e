"""Hostile files: property-based tests (hypothesis) feed the decoder mutated real photographs (bit
flips, truncations, another format's header) in every format it reads, and random bytes. Each is an
image of the right size or a DecodeError with a known reason; nothing else escapes, nothing hangs.
Then the same kinds of files through a whole run: one row each, the run finishes."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow.dataset as pads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REAL_IMAGES, run_cli, shared_or_none, write_job
from shapes import make_image
from fastsam_batch.decode import DecodeError, decode_for_model, decode_image

REASONS = {"empty_file", "not_an_image", "corrupt_image", "truncated_image", "too_many_pixels"}
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "GIF")


def _encoded() -> dict[str, bytes]:
    """A small picture in every format: a photograph when ../shared/real-images is there (CI), else
    a generated picture (a fresh clone): the decoder's contract is the same on either."""
    real = shared_or_none(REAL_IMAGES)
    photos = sorted(real.glob("*.jpg")) if real else []
    photo = (Image.open(photos[0]) if photos else make_image(1)[0]).convert("RGB").resize((96, 64))
    out = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        (photo.convert("P") if fmt == "GIF" else photo).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


ENCODED = _encoded()


def check(data: bytes) -> None:
    """The decoder's contract on any bytes: an RGB image whose shown size it reports, or a reason."""
    try:
        arr, (h, w) = decode_for_model(data, max_pixels=10_000_000, imgsz=32)
    except DecodeError as e:
        assert e.reason in REASONS, e
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert h >= arr.shape[0] > 0 and w >= arr.shape[1] > 0
    full = decode_image(data, max_pixels=10_000_000)
    assert full.shape[:2] == (h, w)


@st.composite
def mutated(draw):
    fmt = draw(st.sampled_from(FORMATS))
    data = bytearray(ENCODED[fmt])
    kind = draw(st.sampled_from(["flips", "truncate", "header", "flips+truncate"]))
    if "flips" in kind:
        for _ in range(draw(st.integers(1, 24))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    if "truncate" in kind:
        data = data[:draw(st.integers(0, len(data) - 1))]
    if kind == "header":
        other = ENCODED[draw(st.sampled_from([f for f in FORMATS if f != fmt]))]
        n = draw(st.integers(2, 64))
        data = bytearray(other[:n]) + data[n:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(mutated())
def test_mutated_real_images_decode_or_give_a_reason(data):
    check(data)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes_decode_or_give_a_reason(data):
    check(data)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FORMATS), st.binary(min_size=1, max_size=512))
def test_a_valid_header_with_random_bytes_after_it(fmt, tail):
    check(ENCODED[fmt][:32] + tail)


def test_hostile_files_through_a_run(tmp_path, checkpoint):
    """Forty mutated files of every format beside good ones: one row each, ok or error with a reason,
    the run exits 0 (the error budget is not set)."""
    rng = random.Random(7)
    images = tmp_path / "imgs"
    images.mkdir()
    expected = []
    for i in range(40):
        fmt = FORMATS[i % len(FORMATS)]
        data = bytearray(ENCODED[fmt])
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if i % 3 == 0:
            data = data[:rng.randrange(len(data))]
        name = f"{i:02d}.{ {'JPEG': 'jpg', 'TIFF': 'tif'}.get(fmt, fmt.lower()) }"
        (images / name).write_bytes(bytes(data))
        expected.append(name)
    for i, fmt in enumerate(FORMATS):
        name = f"good-{i}.{ {'JPEG': 'jpg', 'TIFF': 'tif'}.get(fmt, fmt.lower()) }"
        (images / name).write_bytes(ENCODED[fmt])
        expected.append(name)
    out = tmp_path / "out"
    m = write_job(tmp_path / "job.yaml", "hostile", str(images), str(checkpoint), str(out), 16)
    r = run_cli("run", str(m))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    for row in rows:
        if row["status"] == "ok":
            assert row["width"] > 0 and row["height"] > 0
        else:
            assert row["error"].split(":")[0] in REASONS | {"timeout"}, row["error"]
    assert all(r["status"] == "ok" for r in rows if r["image_id"].startswith("good-"))
    assert sum(r["status"] == "error" for r in rows) >= 10

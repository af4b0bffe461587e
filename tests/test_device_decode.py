"""input.decode: device, run here on the CPU (torchvision's decode_jpeg on CPU tensors, the same
code path as nvJPEG on a GPU): the decode equals Pillow's within a stated tolerance, the letterbox
made on the device within a grey level of OpenCV's, files the device cannot take are Pillow's (error
rows unchanged), and the masks agree with ultralytics' FastSAM as the reduced decode's do."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from fastsam_batch.decode import DecodeError, decode_for_model, decode_image, decode_on_device, probe_for_device
from fastsam_batch.segment import FastSAMSegmenter, SegmentActor, SegmentSettings
from fastsam_batch.storage import Storage
from shapes import make_image
from test_decode import big_jpeg, encode, rgb_array

# Tolerance of the device decode against Pillow's, in grey levels: on the CPU both are libjpeg-turbo
# (measured identical); nvJPEG's IDCT and chroma upsampling differ slightly (tests/test_cuda.py).
MEAN_TOLERANCE, MAX_TOLERANCE = 0.25, 2


def assert_close_to_pillow(got, data: bytes):
    ref = decode_image(data)
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == ref.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_equals_pillow_in_every_exif_orientation(orientation):
    data = big_jpeg(300, 200, orientation=orientation if orientation > 1 else None)
    jpeg = probe_for_device(data)
    assert jpeg is not None and jpeg.shown == decode_image(data).shape[:2]
    got, = decode_on_device([jpeg], "cpu")
    assert isinstance(got, torch.Tensor)
    assert_close_to_pillow(got, data)


def test_device_decode_of_a_batch_grayscale_and_photos():
    files = [encode(Image.fromarray(rgb_array(64, 48)[..., 0]), "JPEG"), big_jpeg(1400, 1000),
             encode(make_image(4100, size=(1400, 1100))[0], "JPEG", quality=95),
             encode(Image.fromarray(rgb_array(64, 48)), "JPEG", progressive=True)]
    got = decode_on_device([probe_for_device(d) for d in files], "cpu")
    for g, d in zip(got, files):
        assert isinstance(g, torch.Tensor)
        assert_close_to_pillow(g, d)


def test_files_the_device_does_not_take_are_pillows_with_the_same_errors():
    cmyk = encode(Image.fromarray(rgb_array(30, 20)).convert("CMYK"), "JPEG")
    png = encode(Image.fromarray(rgb_array()), "PNG")
    truncated = big_jpeg(200, 150)[:3000]  # no end marker: Pillow's truncated_image, as always
    assert probe_for_device(cmyk) is None and probe_for_device(png) is None and probe_for_device(truncated) is None
    for data, reason in [(b"", "empty_file"), (b"not an image at all\n" * 5, "not_an_image")]:
        with pytest.raises(DecodeError) as e:
            probe_for_device(data)
        assert e.value.reason == reason
    with pytest.raises(DecodeError) as e:
        probe_for_device(encode(Image.new("L", (3000, 2000)), "JPEG"), max_pixels=5_000_000)
    assert e.value.reason == "too_many_pixels"
    # A JPEG whose header is fine but whose data the decoder refuses: the batch still decodes, that
    # file gets Pillow's decode or Pillow's error, exactly as with input.decode: exact.
    good = big_jpeg(300, 200)
    bad = bytearray(big_jpeg(300, 200))
    sos = bad.index(b"\xff\xda")
    bad[sos + 2:sos + 4] = b"\x00\x01"  # a scan header of impossible length
    got = decode_on_device([probe_for_device(good), probe_for_device(bytes(bad))], "cpu")
    assert isinstance(got[0], torch.Tensor)
    try:
        expected = decode_for_model(bytes(bad))[0]
    except DecodeError as e:
        assert isinstance(got[1], DecodeError) and str(got[1]) == str(e)
    else:
        assert np.array_equal(np.asarray(got[1].cpu() if isinstance(got[1], torch.Tensor) else got[1]), expected)


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                            mask_path="batched"), Storage())


def test_letterbox_on_the_device_is_within_a_grey_level_of_opencvs(segmenter):
    for size in [(1400, 1100), (256, 224), (200, 360), (300, 320)]:
        a = np.asarray(make_image(4100, size=size)[0])
        ref = segmenter.letterboxed(a, a.shape[:2])
        got = segmenter.letterboxed_on_device(torch.from_numpy(a.copy()), a.shape[:2]).numpy()
        assert got.shape == ref.shape
        diff = np.abs(ref.astype(int) - got.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.2, (size, diff.mean())


def test_device_decoded_masks_agree_with_the_reference(checkpoint, tmp_path):
    """Through the actor, as a run gives it rows (JPEG bytes in a ``jpeg`` column, decoded on the
    device, letterboxed there): ultralytics' FastSAM on the same files matched at IoU >= 0.95 for at
    least 95% of its masks (the reduced decode's threshold), and a PNG in the batch as always."""
    from ultralytics import FastSAM

    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                         mask_path="batched", batch_size=4), Storage(), "fp")
    paths = []
    for seed in range(4):
        p = tmp_path / f"{seed}.jpg"
        make_image(4100 + seed, size=(1400, 1100) if seed % 2 else (1100, 1400))[0].save(p, quality=95)
        paths.append(p)
    png = tmp_path / "x.png"
    make_image(4200, size=(320, 256))[0].save(png)
    paths.append(png)
    jpegs = [probe_for_device(p.read_bytes()) for p in paths]
    assert [j is None for j in jpegs] == [False] * 4 + [True]
    n = len(paths)
    batch = {"image_id": [p.name for p in paths], "uri": [str(p) for p in paths], "error": [""] * n,
             "image": [np.zeros((1, 1, 3), np.uint8)] * 4 + [decode_image(png.read_bytes())],
             "height": [j.shown[0] for j in jpegs[:4]] + [256], "width": [j.shown[1] for j in jpegs[:4]] + [320],
             "jpeg": [j.data for j in jpegs[:4]] + [b""], "orientation": [1] * n, "read_ms": [0.0] * n,
             "decode_ms": [0.0] * n}
    rows = actor(batch).to_pylist()
    ref_model = FastSAM(str(checkpoint))
    matched = total = 0
    for p, row in zip(paths, rows):
        assert row["status"] == "ok" and row["decode_ms"] >= 0, row["error"]
        ref = ref_model.predict(str(p), imgsz=320, conf=0.25, iou=0.9, retina_masks=True, device="cpu", verbose=False)[0]
        h, w = ref.orig_shape
        assert (row["height"], row["width"]) == (h, w)
        refs = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in ref.masks.data.numpy()]
        ours = [{"size": [h, w], "counts": m["counts"].encode()} for m in row["masks"]]
        total += len(refs)
        if refs and ours:
            matched += int((mask_utils.iou(refs, ours, [0] * len(ours)).max(1) >= 0.95).sum())
    assert total >= 8
    assert matched >= 0.95 * total, (matched, total)


def test_a_jpeg_the_device_and_pillow_refuse_is_the_error_row_exact_decoding_gives(checkpoint):
    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu"),
                         Storage(), "fp")
    bad = bytearray(big_jpeg(300, 200))
    sos = bad.index(b"\xff\xda")
    bad[sos + 10:len(bad) - 2] = b"\xff" * (len(bad) - 2 - sos - 10)  # scan data destroyed, end marker kept
    jpeg = probe_for_device(bytes(bad))
    try:
        decode_for_model(bytes(bad))
        pytest.skip("this Pillow decodes the damaged file")
    except DecodeError as e:
        expected = str(e)
    batch = {"image_id": ["bad.jpg"], "uri": ["/x/bad.jpg"], "error": [""], "image": [np.zeros((1, 1, 3), np.uint8)],
             "height": [jpeg.shown[0]], "width": [jpeg.shown[1]], "jpeg": [jpeg.data], "orientation": [1],
             "read_ms": [0.0], "decode_ms": [0.0]}
    row, = actor(batch).to_pylist()
    assert row["status"] == "error" and row["error"] == expected
    assert row["width"] is None and row["height"] is None and row["masks"] == []


def test_manifest_decode_device_and_the_mode_chosen():
    from fastsam_batch.manifest import ManifestError, parse_manifest

    def manifest(decode):
        return parse_manifest({"name": "t", "input": {"uri": "/in", "decode": decode}, "model": {"checkpoint": "/m.pt"},
                               "output": {"uri": "/out"}})

    m = manifest("device")
    assert m.decode_mode(clip_texts=False, accelerators=False, device_decode=False) == "device"
    assert m.decode_mode(clip_texts=True, accelerators=True, device_decode=True) == "exact"
    auto = manifest("auto")
    assert auto.decode_mode(False, accelerators=True, device_decode=True) == "device"
    assert auto.decode_mode(False, accelerators=True, device_decode=False) == "reduced"
    assert auto.decode_mode(False, accelerators=False, device_decode=True) == "exact"
    with pytest.raises(ManifestError) as e:
        manifest("gpu")
    assert "input.decode" in str(e.value) and "device" in str(e.value)


def test_read_decode_leaves_jpegs_to_the_device_and_decodes_the_rest(tmp_path):
    """The read/decode stage with input.decode: device: a JPEG's bytes, orientation and shown size
    travel on (no pixels decoded); a PNG is decoded as always; a broken file is the same error row as
    with input.decode: exact."""
    from fastsam_batch.pipeline import ReadDecode

    files = {"a.jpg": big_jpeg(300, 200, orientation=6), "b.png": encode(Image.fromarray(rgb_array()), "PNG"),
             "c.jpg": b"\xff\xd8\xff" + b"\x00" * 50}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = {}
    for device in (True, False):
        stage = ReadDecode(Storage(), 10**9, device_decode=device)
        rows[device] = {name: next(iter(stage({"image_id": name, "uri": str(tmp_path / name)}))) for name in files}
    a, b, c = (rows[True][k] for k in files)
    assert a["jpeg"] == files["a.jpg"] and a["orientation"] == 6 and a["image"].shape == (1, 1, 3)
    assert (a["height"], a["width"]) == (rows[False]["a.jpg"]["height"], rows[False]["a.jpg"]["width"]) == (300, 200)
    assert b["jpeg"] == b"" and np.array_equal(b["image"], rows[False]["b.png"]["image"])
    assert c["error"] and c["error"] == rows[False]["c.jpg"]["error"] and c["jpeg"] == b""
    assert "jpeg" not in rows[False]["a.jpg"]


def test_device_decode_is_supported_only_where_a_tiny_jpeg_decodes_on_the_gpu(monkeypatch):
    """device_decode_supported probes with a real decode_jpeg(..., device="cuda") of a tiny JPEG, once
    per process: a build that registers decode_jpegs_cuda but raises (no nvJPEG) is not supported.
    Here (no GPU) it is False; then the probe itself, with decode_jpeg replaced (raising; decoding)."""
    import torchvision.io

    from fastsam_batch import decode as decode_module

    decode_module.device_decode_supported.cache_clear()
    try:
        assert decode_module.device_decode_supported() is torch.cuda.is_available() and torch.cuda.is_available() is False
        real = torchvision.io.decode_jpeg

        def refusing(data, mode=None, device="cpu"):
            raise RuntimeError("torchvision.io.decode_jpeg: not compiled with nvJPEG support")

        calls = []

        def decoding(data, mode=None, device="cpu"):
            calls.append(str(device))
            return real(data, mode=mode, device="cpu")

        monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
        assert decode_module.decodes_on_cuda() is False
        monkeypatch.setattr(torchvision.io, "decode_jpeg", decoding)
        assert decode_module.decodes_on_cuda() is True and calls == ["cuda"]
        # In a process that holds a CUDA context already, the probe runs in it, once (cached).
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        decode_module.device_decode_supported.cache_clear()
        assert decode_module.device_decode_supported() is True and decode_module.device_decode_supported() is True
        assert calls == ["cuda", "cuda"]
        monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
        decode_module.device_decode_supported.cache_clear()
        assert decode_module.device_decode_supported() is False
    finally:
        decode_module.device_decode_supported.cache_clear()


def test_pillows_decode_of_a_jpeg_the_device_refuses_runs_outside_the_device_lock(checkpoint, monkeypatch):
    """In an actor the device decode holds the device lock; Pillow's decode of the files the device
    refused (host work) runs with the lock free, and gives the same rows."""
    from fastsam_batch import decode as decode_module
    from test_segment import RecordingLock

    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu"),
                         Storage(), "fp")
    good = big_jpeg(300, 200)
    jpeg = probe_for_device(good)
    batch = {"image_id": ["a.jpg"], "uri": ["/x/a.jpg"], "error": [""], "image": [np.zeros((1, 1, 3), np.uint8)],
             "height": [jpeg.shown[0]], "width": [jpeg.shown[1]], "jpeg": [jpeg.data], "orientation": [1],
             "read_ms": [0.0], "decode_ms": [0.0]}
    expected = actor(dict(batch)).to_pylist()
    lock = actor.device_lock = RecordingLock()
    held = {"device": [], "pillow": []}
    real_device, real_pillow = decode_module.decode_jpegs_on_device, decode_module.decode_for_model

    def refused_on_device(jpegs, device):
        held["device"].append(lock.held())
        real_device(jpegs, device)
        return [None] * len(jpegs)  # as a device that refuses them

    def pillow(*a, **k):
        held["pillow"].append(lock.held())
        return real_pillow(*a, **k)

    monkeypatch.setattr(decode_module, "decode_jpegs_on_device", refused_on_device)
    monkeypatch.setattr(decode_module, "decode_for_model", pillow)
    rows = actor(dict(batch)).to_pylist()
    assert held == {"device": [True], "pillow": [False]}
    assert rows[0]["status"] == "ok" and [m["counts"] for m in rows[0]["masks"]] == [m["counts"] for m in expected[0]["masks"]]

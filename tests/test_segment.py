"""The segmenter on its own (no Ray): batching images of different sizes changes no result, and
each image's masks are ultralytics' FastSAM single-image predictions."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fastsam_batch.decode import decode_image
from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
from fastsam_batch.storage import Storage
from shapes import make_image

SIZES = [(256, 224), (384, 320), (320, 256), (256, 224), (200, 360)]


@pytest.fixture(scope="module", params=["per_mask", "batched"])
def segmenter(checkpoint, request):
    """Both mask paths, on the CPU: mask by mask (the CPU's) and the accelerator's batched one on CPU tensors."""
    return FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                            mask_path=request.param), Storage())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    paths = []
    for i, size in enumerate(SIZES):
        p = d / f"{i}.png"
        make_image(4000 + i, size=size)[0].save(p)
        paths.append(p)
    return paths


def test_mixed_sizes_in_one_batch_equal_single_image_calls(segmenter, images):
    arrays = [decode_image(p.read_bytes()) for p in images]
    batched = segmenter.segment(arrays)
    assert len(batched) == len(arrays)
    for arr, (recs, prompts, timings) in zip(arrays, batched):
        (single, _, _), = segmenter.segment([arr])
        assert prompts == []
        assert [r["counts"] for r in recs] == [r["counts"] for r in single]
        assert [r["score"] for r in recs] == pytest.approx([r["score"] for r in single], abs=1e-6)
        assert [r["stability_score"] for r in recs] == pytest.approx([r["stability_score"] for r in single], abs=1e-6)
        assert set(timings) == {"model", "masks", "select", "encode", "duplicates"}
        assert timings["duplicates"] is None  # mask_rules.max_overlap is off


def test_batched_masks_are_the_reference_predictions(segmenter, images, checkpoint):
    from ultralytics import FastSAM

    ref_model = FastSAM(str(checkpoint))
    arrays = [decode_image(p.read_bytes()) for p in images]
    total = 0
    for p, arr, (recs, _, _) in zip(images, arrays, segmenter.segment(arrays)):
        ref = ref_model.predict(str(p), imgsz=320, conf=0.25, iou=0.9, retina_masks=True, device="cpu", verbose=False)[0]
        ref_counts = [] if ref.masks is None else [
            mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in ref.masks.data.numpy()]
        assert [r["counts"] for r in recs] == ref_counts, p.name  # identical masks, same order
        assert [r["score"] for r in recs] == pytest.approx(ref.boxes.conf.tolist(), abs=1e-5)
        total += len(ref_counts)
    assert total >= 10


def _actor_batch(arrays):
    n = len(arrays)
    return {"image_id": [f"{i}.png" for i in range(n)], "uri": [f"/x/{i}.png" for i in range(n)],
            "width": [a.shape[1] for a in arrays], "height": [a.shape[0] for a in arrays], "error": [""] * n,
            "image": arrays, "read_ms": [0.0] * n, "decode_ms": [0.0] * n}


def test_out_of_memory_is_retried_with_smaller_chunks_then_becomes_an_error_row(checkpoint, images, monkeypatch):
    """An accelerator short of memory, simulated: the mask step (FastSAMSegmenter.candidates_on_device)
    raises torch.OutOfMemoryError when its chunks are above a limit: the image is redone in smaller
    pieces with the same masks; when even those run out, it is one error row naming what was tried."""
    import torch

    from fastsam_batch.segment import NORMAL_CHUNKS, SMALL_CHUNKS, FastSAMSegmenter, SegmentActor

    limit = {"pixels": None}
    on_device = FastSAMSegmenter.candidates_on_device

    def short_of_memory(self, sizes, forwards, small=False):
        chunk_pixels = (SMALL_CHUNKS if small else NORMAL_CHUNKS)[0]
        if limit["pixels"] is not None and chunk_pixels > limit["pixels"]:
            raise torch.OutOfMemoryError(f"simulated: mask chunks of {chunk_pixels} pixels > {limit['pixels']}")
        return on_device(self, sizes, forwards, small)

    monkeypatch.setattr(FastSAMSegmenter, "candidates_on_device", short_of_memory)

    settings = SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu")
    actor = SegmentActor(settings, Storage(), "fp")
    arrays = [decode_image(p.read_bytes()) for p in images[:3]]
    normal = actor(_actor_batch(arrays)).to_pylist()
    assert all(r["status"] == "ok" for r in normal) and sum(r["num_masks"] for r in normal) > 0

    limit["pixels"] = (SMALL_CHUNKS[0] + NORMAL_CHUNKS[0]) // 2
    retried = actor(_actor_batch(arrays)).to_pylist()
    assert [r["status"] for r in retried] == ["ok"] * 3
    assert [[m["counts"] for m in r["masks"]] for r in retried] == [[m["counts"] for m in r["masks"]] for r in normal]

    limit["pixels"] = SMALL_CHUNKS[0] // 2
    failed = actor(_actor_batch(arrays)).to_pylist()
    assert [r["status"] for r in failed] == ["error"] * 3
    for r in failed:
        assert r["error"].startswith("segment_failed: OutOfMemory: out of memory for this image")
        assert "as usual: OutOfMemoryError" in r["error"] and "with smaller mask chunks: OutOfMemoryError" in r["error"]
        assert r["masks"] == []


def test_two_batches_at_once_in_one_actor_give_the_sequential_results(checkpoint, images):
    """On accelerators an actor takes two batches at once (the device part of one under a lock while
    the host part of the other runs); the rows are those of one batch after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from fastsam_batch.segment import SegmentActor

    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                         mask_path="batched"), Storage(), "fp")
    arrays = [decode_image(p.read_bytes()) for p in images]
    batches = [_actor_batch(arrays[:3]), _actor_batch(arrays[3:]), _actor_batch(arrays[1:4])]
    sequential = [actor(b).to_pylist() for b in batches]
    with ThreadPoolExecutor(2) as pool:
        concurrent = [t.to_pylist() for t in pool.map(actor, batches)]
    strip = lambda rows: [(r["image_id"], r["status"], [m["counts"] for m in r["masks"]]) for r in rows]  # noqa: E731
    assert [strip(r) for r in concurrent] == [strip(r) for r in sequential]
    assert sum(r["num_masks"] for rows in sequential for r in rows) > 0


def test_reduced_decode_masks_agree_with_the_reference(segmenter, tmp_path, checkpoint):
    """Large JPEGs decoded at a reduced size (input.decode: reduced): the letterbox has the full
    image's geometry, the masks are at the full size, and they match ultralytics' FastSAM on the
    same files (decoded whole) at IoU >= 0.95 for at least 95% of its masks."""
    from ultralytics import FastSAM

    from fastsam_batch.decode import decode_for_model

    ref_model = FastSAM(str(checkpoint))
    matched = total = 0
    for seed in range(4):
        p = tmp_path / f"{seed}.jpg"
        make_image(4100 + seed, size=(1400, 1100))[0].save(p, quality=95)
        full = decode_image(p.read_bytes())
        small, shown = decode_for_model(p.read_bytes(), imgsz=320)
        assert shown == full.shape[:2] and small.shape[0] < full.shape[0]
        assert segmenter.letterboxed(small, shown).shape == segmenter.letterbox(image=full).shape
        (recs, _, _), = segmenter.segment([small], sizes=[shown])
        ref = ref_model.predict(str(p), imgsz=320, conf=0.25, iou=0.9, retina_masks=True, device="cpu", verbose=False)[0]
        h, w = shown
        refs = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in ref.masks.data.numpy()]
        ours = [{"size": [h, w], "counts": r["counts"].encode()} for r in recs]
        total += len(refs)
        if refs and ours:
            matched += int((mask_utils.iou(refs, ours, [0] * len(ours)).max(1) >= 0.95).sum())
    assert total >= 8
    assert matched >= 0.95 * total, (matched, total)


def test_an_actor_call_groups_rows_by_letterboxed_shape_into_forward_passes(checkpoint, images):
    """Bucketing: a call's rows are grouped by letterboxed shape (computed from the size alone) and
    cut into forward passes of at most settings.batch_size; rows are those of one image at a time."""
    from fastsam_batch.segment import SegmentActor

    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                         mask_path="batched", batch_size=2), Storage(), "fp")
    arrays = [decode_image(p.read_bytes()) for p in images] * 2
    sizes = [a.shape[:2] for a in arrays]
    seg = actor.segmenter
    for (h, w) in [*sizes, (1500, 2250), (17, 5), (3000, 100)]:
        assert seg.letterbox_shape((h, w)) == seg.letterbox(image=np.zeros((h, w, 3), np.uint8)).shape[:2]
    parts = actor.buckets(list(range(len(arrays))), sizes)
    assert sorted(i for p in parts for i in p) == list(range(len(arrays)))
    assert all(len(p) <= 2 and len({seg.letterbox_shape(sizes[i]) for i in p}) == 1 for p in parts)
    assert len(parts) == 5  # 10 images of 3 letterboxed shapes (4, 4, 2) in passes of 2
    assert any(p[-1] - p[0] >= len(p) for p in parts)  # equal shapes share a pass, wherever they are in the call
    rows = actor(_actor_batch(arrays)).to_pylist()
    alone = [actor(_actor_batch([a])).to_pylist()[0] for a in arrays]
    assert [[m["counts"] for m in r["masks"]] for r in rows] == [[m["counts"] for m in r["masks"]] for r in alone]
    assert sum(r["num_masks"] for r in rows) > 0


class RecordingLock:
    """A ``threading.Lock`` that says whether it is held (by anyone), for the test below."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.entered = 0

    def __enter__(self):
        self.lock.acquire()
        self.entered += 1
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def held(self) -> bool:
        return self.lock.locked()


def test_the_device_lock_is_free_while_the_host_sorts_the_mask_transitions(checkpoint, images, monkeypatch):
    """An actor holds its device lock for the launches and the copies back only: the host's part of the
    mask intervals (collect_box_masks: sorting and splitting the transitions, after the one copy back;
    then each image's IntervalMask list) runs with the lock free, so a second call in flight can use
    the device meanwhile; the rare second pass takes the lock again, and the masks are unchanged."""
    from fastsam_batch import masks as masks_module
    from fastsam_batch import segment as segment_module
    from fastsam_batch.segment import SegmentActor

    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                         mask_path="batched"), Storage(), "fp")
    arrays = [decode_image(p.read_bytes()) for p in images]
    expected = actor(_actor_batch(arrays)).to_pylist()
    lock = actor.device_lock = RecordingLock()  # the real attribute, replaced by a lock that reports itself
    seen = {"launch": [], "fetch": [], "collect": [], "sort": [], "intervals": [], "second_pass": []}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapped(*a, **k):
            seen[key].append(lock.held())
            return real(*a, **k)
        monkeypatch.setattr(module, name, wrapped)

    spy(segment_module, "launch_box_masks", "launch")
    spy(segment_module, "fetch_box_masks", "fetch")
    spy(segment_module, "collect_box_masks", "collect")
    spy(masks_module, "stability_score", "sort")  # inside collect_box_masks, after the sort: its host part
    spy(segment_module, "IntervalMask", "intervals")  # each image's masks, made on the host
    spy(masks_module, "_chunk_transitions", "second_pass")
    rows = actor(_actor_batch(arrays)).to_pylist()
    assert [[m["counts"] for m in r["masks"]] for r in rows] == [[m["counts"] for m in r["masks"]] for r in expected]
    assert sum(r["num_masks"] for r in rows) > 0
    assert seen["launch"] and all(seen["launch"])  # device work: under the lock
    assert seen["collect"] and not any(seen["collect"])  # host work: the lock free
    assert seen["sort"] and not any(seen["sort"])
    assert seen["intervals"] and not any(seen["intervals"])
    assert seen["fetch"] and all(seen["fetch"])  # the one copy back: under the lock
    assert seen["second_pass"] and all(seen["second_pass"])  # launches (first pass and any second one): under the lock
    # A chunk with more transitions than guessed: the second pass takes the lock again, the sort does not.
    monkeypatch.setattr(masks_module, "GUESS_PER_COLUMN", 0)
    for k in seen:
        seen[k].clear()
    before = lock.entered
    again = actor(_actor_batch(arrays)).to_pylist()
    assert [[m["counts"] for m in r["masks"]] for r in again] == [[m["counts"] for m in r["masks"]] for r in expected]
    assert seen["second_pass"] and all(seen["second_pass"])
    assert seen["sort"] and not any(seen["sort"]) and not any(seen["collect"])
    assert lock.entered - before >= 2  # the launch, then the second pass

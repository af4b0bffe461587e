"""Text prompts with the committed tiny CLIP (tests/fixtures/clip-fixture, made by make_clip.py).

On held-out generated images, the text "red circle" must select the red circle's mask among all
of the image's masks, far above chance. The CLIP folder must be found offline, and a missing one
must be a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fastsam_batch.clip_text import ClipError, ClipScorer, clip_sha256
from fastsam_batch.rle import runs_from_intervals, runs_to_rle
from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
from fastsam_batch.select import PromptError, select_text
from fastsam_batch.storage import Storage
from shapes import make_image

from conftest import FIXTURES

CLIP_DIR = FIXTURES / "clip-fixture"


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return FastSAMSegmenter(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu"), Storage())


@pytest.fixture(scope="module")
def scorer():
    import torch

    return ClipScorer(str(CLIP_DIR), torch.device("cpu"))


def test_text_prompts_pick_the_named_shape_far_above_chance(segmenter, scorer):
    hits = chance = n = 0
    for seed in range(600_000, 600_030):  # never used for training the model or CLIP
        img, shapes = make_image(seed)
        arr = np.array(img)
        h, w = arr.shape[:2]
        masks = segmenter.segment_on_device([arr])[1][0]
        if not masks:
            continue
        sim = scorer.similarity_fn(arr, masks)
        gts = [mask_utils.encode(np.asfortranarray(s.mask.astype(np.uint8))) for s in shapes]
        scorable = sum(m.area > scorer.min_area for m in masks)
        for s in shapes:
            sel = select_text(masks, s.caption, sim)
            m = masks[sel.masks[0]]
            rle = runs_to_rle(runs_from_intervals(m.starts, m.ends, h * w), h, w)
            # Right when the mask is a shape with that caption (two shapes may share one).
            right = [g for g, t in zip(gts, shapes) if t.caption == s.caption]
            hits += float(mask_utils.iou([rle], right, [0] * len(right)).max()) > 0.5
            chance += len(right) / scorable
            n += 1
    accuracy, chance = hits / n, chance / n
    print(f"text prompts: {hits}/{n} = {accuracy:.3f} right (chance {chance:.3f})")
    assert n >= 60
    assert accuracy >= 0.85 and accuracy >= 2.5 * chance


def test_text_embeddings_are_cached_per_text(scorer):
    a = scorer.text_embedding("blue square")
    b = scorer.text_embedding("blue square")
    assert a is b  # computed once, then reused
    assert abs(float(np.linalg.norm(a)) - 1) < 1e-5


def test_small_masks_are_not_scored(segmenter, scorer):
    img, _ = make_image(600_100)
    arr = np.array(img)
    masks = segmenter.segment_on_device([arr])[1][0]
    big = ClipScorer.__new__(ClipScorer)
    big.__dict__.update(scorer.__dict__)
    big.min_area = 10**9  # every mask "too small"
    with pytest.raises(PromptError, match="no_scorable_mask"):
        select_text(masks, "red circle", big.similarity_fn(arr, masks))


def test_clip_folder_checks(tmp_path):
    storage = Storage()
    assert len(clip_sha256(str(CLIP_DIR), storage)) == 64
    with pytest.raises(ClipError, match="no such folder"):
        clip_sha256(str(tmp_path / "nope"), storage)
    (tmp_path / "open_clip_config.json").write_text((CLIP_DIR / "open_clip_config.json").read_text())
    with pytest.raises(ClipError, match="no weights file"):
        clip_sha256(str(tmp_path), storage)
    (tmp_path / "open_clip_config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ClipError, match="no open_clip_config.json"):
        clip_sha256(str(tmp_path), storage)


def test_clip_uses_the_device_only_under_the_actors_lock(checkpoint):
    """CLIP's device work (text and crop embeddings) runs under the segmentation actor's device lock,
    as the model's does: never two threads on an accelerator at once."""
    import threading

    from fastsam_batch.segment import SegmentActor

    actor = SegmentActor(SegmentSettings(str(checkpoint), "unused", imgsz=320, conf=0.25, iou=0.9, device="cpu",
                                         prompted=True, clip_uri=str(CLIP_DIR), clip_sha256=clip_sha256(str(CLIP_DIR), Storage())),
                         Storage(), "fp")
    clip = actor.segmenter.clip
    assert clip.device_lock is actor.device_lock
    held = []
    for name in ("encode_text", "encode_image"):
        real = getattr(clip.model, name)

        def watched(*a, _real=real, _name=name, **k):
            held.append((_name, actor.device_lock.locked()))
            return _real(*a, **k)

        setattr(clip.model, name, watched)
    img, _ = make_image(600_100)
    arr = np.array(img)
    masks = actor.segmenter.segment_on_device([arr])[1][0]
    sim = clip.similarity_fn(arr, masks)
    sim("red circle")
    assert {n for n, _ in held} == {"encode_text", "encode_image"} and all(locked for _, locked in held)
    assert not actor.device_lock.locked() and isinstance(actor.device_lock, type(threading.Lock()))

"""RLE from box crops must be byte-identical to pycocotools.mask.encode of the full mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from fastsam_batch.rle import (
    _crop_intervals_torch,
    crop_intervals,
    crop_run_lengths,
    encode_mask,
    rle_fields,
    runs_to_rle,
)


def encode_via_crop(full: np.ndarray) -> dict:
    """What the segmenter does: find the mask's box, encode only the crop placed there."""
    h, w = full.shape
    ys, xs = np.nonzero(full)
    if ys.size == 0:
        crop, x0, y0 = torch.zeros((0, 0), dtype=torch.bool), 0, 0
    else:
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = torch.from_numpy(full[y0:y1, x0:x1].astype(bool))
    return runs_to_rle(crop_run_lengths(crop, int(x0), int(y0), h, w), h, w)


@st.composite
def masks(draw):
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["random", "empty", "full", "blob"]))
    if kind == "empty":
        return np.zeros((h, w), dtype=bool)
    if kind == "full":
        return np.ones((h, w), dtype=bool)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((h, w)) < draw(st.floats(0.05, 0.95))
    m = np.zeros((h, w), dtype=bool)
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    m[y0 : rng.integers(y0, h) + 1, x0 : rng.integers(x0, w) + 1] = True
    return m


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks())
def test_crop_rle_matches_pycocotools(full):
    ours = encode_via_crop(full)
    ref = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    assert ours["counts"] == ref["counts"]
    assert list(ours["size"]) == list(ref["size"])
    np.testing.assert_array_equal(mask_utils.decode(ours).astype(bool), full)
    counts, area, bbox = rle_fields(ours)
    assert area == int(full.sum()) == int(mask_utils.area(ref))
    np.testing.assert_allclose(bbox, mask_utils.toBbox(ref))
    if full.any():
        ys, xs = np.nonzero(full)
        assert bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


@pytest.mark.parametrize("shape", [(1, 1), (1, 57), (57, 1), (3, 200), (200, 3)])
@pytest.mark.parametrize("fill", ["empty", "full", "stripes"])
def test_degenerate_shapes(shape, fill):
    h, w = shape
    full = np.zeros(shape, dtype=bool)
    if fill == "full":
        full[:] = True
    elif fill == "stripes":
        full[::2, ::3] = True
    ours = encode_via_crop(full)
    assert ours["counts"] == mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))["counts"]
    np.testing.assert_array_equal(mask_utils.decode(ours).astype(bool), full)


def test_full_height_crop_merges_runs_across_columns():
    # A crop spanning the whole height: a run ending at the bottom of one column continues at the
    # top of the next, which COCO RLE counts as one run.
    full = np.zeros((5, 6), dtype=bool)
    full[:, 1:4] = True
    full[2, 2] = False
    runs = crop_run_lengths(torch.from_numpy(full[:, 1:4]), 1, 0, 5, 6)
    assert runs.tolist() == [5, 7, 1, 7, 10]
    assert encode_via_crop(full)["counts"] == encode_mask(full)["counts"].encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks(), st.integers(0, 30), st.integers(0, 30))
def test_accelerator_path_finds_the_same_intervals(crop, x0, y0):
    # The branch used for crops on a GPU (torch ops there, positions to the host) must agree with
    # the CPU branch; it is called directly since CI has no accelerator.
    t = torch.from_numpy(crop)
    height = crop.shape[0] + y0 + 3
    cpu_s, cpu_e = crop_intervals(t, x0, y0, height)
    acc_s, acc_e = _crop_intervals_torch(t, x0, y0, height)
    np.testing.assert_array_equal(cpu_s, acc_s)
    np.testing.assert_array_equal(cpu_e, acc_e)

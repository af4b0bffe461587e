"""How often the accelerator path would make the host wait for a GPU, counted on CPU tensors.

Runs ``segment_on_device`` (the fixture model, imgsz 224, the batched mask path) on batches of 1
and 32 images and of three letterboxed shapes, and ``batched_box_mask_intervals`` on 10 and 3,000
masks and 32 images, under ``tests/sync_counter.py``'s counter; prints a table and writes JSON.
The numbers in benchmarks/RESULTS.md (issue 22) come from it (and from the same counter on the
code before, main at b582bfd).

    .venv/bin/python benchmarks/syncs.py [--out benchmarks/out/syncs.json] [--code DIR]

``--code DIR``: import ``fastsam_batch`` from DIR instead (e.g. an older commit's, from
``git archive COMMIT fastsam_batch | tar -x -C DIR``), counted by this tree's counter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures"), str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "syncs.json"))
    ap.add_argument("--code", help="a folder holding the fastsam_batch package to count")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))

    import numpy as np
    import torch

    from fastsam_batch.offline import configure_ultralytics

    configure_ultralytics()
    from fastsam_batch.masks import batched_box_mask_intervals
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage
    from shapes import make_image
    from sync_counter import SyncCounter
    from test_syncs import smooth_job

    def count(fn) -> dict:
        with SyncCounter() as c:
            fn()
        return {"syncs": c.syncs, "uploads": c.uploads, "by_kind": dict(c.where)}

    rows = {}
    gen = torch.Generator().manual_seed(1)
    for name, jobs, kw in [("masks: 10 masks", [smooth_job(10, 300, 400, gen)], {}),
                           ("masks: 3,000 masks, 64 K-pixel chunks", [smooth_job(3000, 300, 400, gen)],
                            {"budget_pixels": 1 << 16}),
                           ("masks: 32 images x 10 masks", [smooth_job(10, 300, 400, gen) for _ in range(32)], {})]:
        rows[name] = count(lambda: batched_box_mask_intervals(jobs, **kw))
    seg = FastSAMSegmenter(SegmentSettings(str(ROOT / "tests" / "fixtures" / "fastsam-fixture.pt"), "bench", imgsz=224,
                                           conf=0.25, device="cpu", mask_path="batched"), Storage())
    same = [np.asarray(make_image(7000 + i, size=(256, 224))[0]) for i in range(32)]
    mixed = [np.asarray(make_image(7100 + i, size=s)[0]) for i, s in enumerate([(256, 224), (200, 360), (320, 256)] * 2)]
    for name, images in [("segment_on_device: 1 image", same[:1]), ("segment_on_device: 32 images", same),
                         ("segment_on_device: 6 images, 3 shapes", mixed)]:
        rows[name] = count(lambda: seg.segment_on_device(images))
    print(f"{'batch':42s} {'syncs':>6s} {'uploads':>8s}  by kind")
    for name, r in rows.items():
        print(f"{name:42s} {r['syncs']:6d} {r['uploads']:8d}  {r['by_kind']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import fastsam_batch

    out.write_text(json.dumps({"torch": torch.__version__, "code": str(Path(fastsam_batch.__file__).parent),
                               "rows": rows}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()

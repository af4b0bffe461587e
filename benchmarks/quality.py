"""The cost of the quality scores per image (issue 24): mask pixels with and without each mask's
stability score, on both mask paths, and the duplicate-mask rule, at a photo's load.

A photo: 2250 x 1500 (the benchmarks' usual size), imgsz 1024 (prototypes 32 x 176 x 256, as the
letterbox gives), 100 masks in boxes of log-uniform sizes from 24 to 900 px over blob-like
prototypes (a few runs a column, like real masks); the duplicate-mask rule also on 1,000 masks of
one such photo (``max_det`` allows 10,000). Each path runs with and without the score,
alternately, in the same process (``--repeats`` times each; the median is reported), one torch
thread (an actor's on the CPU). The batched path runs on CPU tensors here (no GPU lent): its cost
on an accelerator is not measured. Prints a table and writes JSON.

    .venv/bin/python benchmarks/quality.py [--repeats 7] [--out benchmarks/out/quality.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def photo(seed: int, n: int = 100, h: int = 1500, w: int = 2250):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    mh, mw = 176, 256
    protos = torch.nn.functional.interpolate(torch.randn(1, 32, 12, 16, generator=gen), size=(mh, mw),
                                             mode="bilinear")[0] * 3
    coeffs = torch.randn(n, 32, generator=gen)
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(24), np.log(900), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([w, h]) - size)
    boxes = np.concatenate([xy, xy + size], 1).astype(np.float32)
    return coeffs, protos, torch.from_numpy(boxes), h, w


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "quality.json"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from fastsam_batch.masks import collect_box_masks, iter_box_mask_intervals, launch_box_masks
    from fastsam_batch.quality import duplicate_masks

    torch.set_num_threads(1)
    photos = [photo(1000 + i) for i in range(args.images)]
    runs = {k: [] for k in ("per_mask_off", "per_mask_on", "batched_off", "batched_on", "duplicates",
                            "duplicates_1000")}
    coeffs, protos, boxes, h, w = photo(2000, n=1000)
    many = [(s, e) for _, s, e in iter_box_mask_intervals(coeffs, protos, boxes, h, w) if s.size]
    many_score = [float(i) for i in range(len(many), 0, -1)]
    masks_per_photo, scores = [], []
    for rep in range(args.repeats):
        for coeffs, protos, boxes, h, w in photos:
            for on in ((False, True) if rep % 2 == 0 else (True, False)):  # alternate which goes first
                key = "per_mask_" + ("on" if on else "off")
                runs[key].append(timed(lambda: list(iter_box_mask_intervals(coeffs, protos, boxes, h, w,
                                                                            stability=on))))
                key = "batched_" + ("on" if on else "off")
                runs[key].append(timed(lambda: collect_box_masks(launch_box_masks([(coeffs, protos, boxes.numpy(), h, w)],
                                                                                  stability=on))))
            found = [(s, e, q) for _, s, e, q in iter_box_mask_intervals(coeffs, protos, boxes, h, w, stability=True)]
            kept = [(s, e) for s, e, _ in found if s.size]
            if rep == 0:
                masks_per_photo.append(len(kept))
                scores += [float(q) for s, _, q in found if s.size]
            score = [float(i) for i in range(len(kept), 0, -1)]
            runs["duplicates"].append(timed(lambda: duplicate_masks(kept, score, 0.9, height=h)))
        runs["duplicates_1000"].append(timed(lambda: duplicate_masks(many, many_score, 0.9, height=h)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "what": "ms per photo (2250x1500, 100 boxes), median of repeats; one torch thread; batched path on CPU tensors",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "non_empty_masks_per_photo": masks_per_photo,
        "duplicates_1000_masks": len(many),
        "stability_score": {"mean": round(float(np.mean(scores)), 3), "p10": round(float(np.percentile(scores, 10)), 3),
                            "p90": round(float(np.percentile(scores, 90)), 3)},
        "repeats": args.repeats, "photos": args.images,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "stability_cost_ms": {"per_mask": round(med["per_mask_on"] - med["per_mask_off"], 2),
                              "batched": round(med["batched_on"] - med["batched_off"], 2)},
        "stability_cost_percent": {"per_mask": round(100 * (med["per_mask_on"] / med["per_mask_off"] - 1), 1),
                                   "batched": round(100 * (med["batched_on"] / med["batched_off"] - 1), 1)},
        "all_ms": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }
    print(f"non-empty masks per photo: {masks_per_photo}")
    print(f"{'ms per photo (median)':<28}{'without':>10}{'with':>10}{'cost':>10}")
    for path in ("per_mask", "batched"):
        print(f"  {path + ' mask path':<26}{med[path + '_off']:>10.1f}{med[path + '_on']:>10.1f}"
              f"{result['stability_cost_percent'][path]:>9.1f}%")
    print(f"  duplicate_masks (max_overlap 0.9): {med['duplicates']:.1f} ms; on {len(many)} masks: "
          f"{med['duplicates_1000']:.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Write the prompt files of the example jobs from the generator's ground truth for jobs/demo-images.

    python jobs/make_demo_prompts.py

The demo images are ``shapes.make_image(900 + i)`` (``shapes-<i>.png|jpg``). Writes
``demo-coco.json`` (COCO instances: one box per shape, categories circle/square/triangle) and
``demo-prompts.jsonl`` (a prompt table: a box, a point and a text per image), both committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))

from shapes import KINDS, make_image  # noqa: E402


def main() -> None:
    images, anns, rows = [], [], []
    for i in range(6):
        name = f"shapes-{i}.{'png' if i % 2 == 0 else 'jpg'}"
        img, shapes = make_image(900 + i)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for s in shapes:
            x1, y1, x2, y2 = s.box_xyxy
            anns.append({"id": 100 + len(anns), "image_id": i + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "category_id": KINDS.index(s.kind) + 1, "area": int(s.mask.sum()), "iscrowd": 0})
        first = shapes[0]
        ys, xs = np.nonzero(first.mask)
        k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        rows += [
            {"image_id": name, "box": list(first.box_xyxy), "prompt_id": f"{name}:box"},
            {"image_id": name, "points": [[int(xs[k]), int(ys[k])]], "labels": [1], "prompt_id": f"{name}:point"},
            {"image_id": name, "text": first.caption, "prompt_id": f"{name}:text"},
        ]
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": j + 1, "name": kind} for j, kind in enumerate(KINDS)]}
    (HERE / "demo-coco.json").write_text(json.dumps(coco, indent=1) + "\n")
    (HERE / "demo-prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {HERE / 'demo-coco.json'} ({len(anns)} boxes) and {HERE / 'demo-prompts.jsonl'} ({len(rows)} prompts)")


if __name__ == "__main__":
    main()

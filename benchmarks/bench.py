"""Throughput benchmark: the plain ultralytics loop users write today vs `fastsam-batch run`.

    .venv/bin/python benchmarks/bench.py                 # everything (about 20-30 min on 2 cores)
    .venv/bin/python benchmarks/bench.py --quick         # small sizes, to check it runs

Same images, model and settings for every contender, in one run. Prints a table and writes
benchmarks/out/results.json. Workloads:
  1. the real photographs in ../shared/real-images, repeated to --photos images, with a
     FastSAM-s-architecture checkpoint (yolov8s-seg, one class, seeded random weights) at
     imgsz 1024, conf 0.01 (about 70-100 masks per image);
  2. the fixture model on generated images (--small and --large of them) at imgsz 320,
     fastsam-batch only, to show how cost and peak memory grow with the run.
For each contender: images/s in steady state (start-up reported apart), milliseconds per stage,
CPU seconds per image, peak RSS of the driver and of the workers, masks per image; plus the mask
agreement with the baseline, and a mask-to-RLE micro-benchmark on the baseline's own masks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from fastsam_batch.offline import configure_ultralytics  # noqa: E402

configure_ultralytics()
REAL = ROOT.parent / "shared" / "real-images"
FIXTURE = ROOT / "tests" / "fixtures" / "fastsam-fixture.pt"
EXE = Path(sys.executable).with_name("fastsam-batch")


# ----------------------------------------------------------------------------- measuring
class TreeSampler:
    """Samples memory and CPU times of a process and all its descendants (the Ray workers included).

    Memory is PSS (proportional set size): a page shared by several processes (Ray's object store,
    shared libraries) is split among them, so the sum over processes is the memory the run really
    holds; summing RSS would count shared pages once per process that maps them. The peak of each
    process (by its title) is kept too, to see what grows."""

    def __init__(self, root_pid: int, interval: float = 0.25):
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.peak_driver = 0
        self.peak_workers = 0
        self.peak_by_process: dict[str, int] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            workers = 0
            for p in procs:
                try:
                    mem = p.memory_full_info().pss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    cmd = " ".join(p.cmdline())
                    if cmd.startswith("ray::"):  # Ray's titles: ray::Name(...).method, padded
                        first = cmd.split()[0]
                        cmd = first.split(").")[0] + ")" if ")." in first else first
                    title = f"{p.pid} {cmd[:60]}"
                except psutil.Error:
                    continue
                self.peak_by_process[title] = max(self.peak_by_process.get(title, 0), mem)
                if p.pid == self.root.pid:
                    self.peak_driver = max(self.peak_driver, mem)
                else:
                    workers += mem
            self.peak_workers = max(self.peak_workers, workers)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._t.join()

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def run_tool(manifest: Path, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EXE), "run", str(manifest), "--overwrite"], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"fastsam-batch failed:\n{out[-3000:]}")
    return {"wall_s": wall, "cpu_s": sampler.cpu_seconds, "peak_driver_mb": sampler.peak_driver / 2**20,
            "peak_workers_mb": sampler.peak_workers / 2**20, "log": out,
            "peak_mb_by_process": {k: round(v / 2**20) for k, v in sorted(sampler.peak_by_process.items(),
                                                                         key=lambda kv: -kv[1])[:12]}}


def tool_stats(table, run: dict) -> dict:
    import pyarrow.compute as pc

    n = table.num_rows
    done = np.sort(table.column("segmented_at").cast("int64").to_numpy()) / 1000.0
    batches = np.unique(done)
    # Steady state: everything after the first batch left the model, over the time it took.
    first = batches[0]
    steady_n = int((done > first).sum())
    steady = steady_n / (batches[-1] - first) if len(batches) > 1 and batches[-1] > first else float("nan")
    stage = {c: float(pc.mean(table.column(c)).as_py() or 0.0) for c in ("read_ms", "decode_ms", "model_ms", "masks_ms", "encode_ms")}
    summary = json.loads(run["summary"]).get("last_run_summary", {}) if "summary" in run else {}
    stage["write_ms"] = 1000 * summary.get("write_s", 0.0) / max(n, 1)
    return {
        "images": n, "ok": int(pc.sum(pc.equal(table.column("status"), "ok")).as_py()),
        "wall_s": run["wall_s"], "images_per_s_total": n / run["wall_s"], "images_per_s_steady": steady,
        "startup_s": run["wall_s"] - (batches[-1] - first) if len(batches) > 1 else run["wall_s"],
        "cpu_s_per_image": run["cpu_s"] / n, "peak_driver_mb": run["peak_driver_mb"],
        "peak_workers_mb": run["peak_workers_mb"], "masks_per_image": float(pc.mean(table.column("num_masks")).as_py()),
        "stage_ms": stage, "peak_mb_by_process": run.get("peak_mb_by_process", {}),
    }


# ----------------------------------------------------------------------------- contenders
def baseline_loop(paths: list[Path], ckpt: Path, imgsz: int, conf: float, iou: float, out_dir: Path,
                  device: str = "cpu", half: bool = False) -> tuple[dict, dict]:
    """What users write today: ultralytics FastSAM per image, pycocotools per mask, Parquet at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pycocotools import mask as mask_utils
    from ultralytics import FastSAM

    proc = psutil.Process()
    cpu0 = sum(proc.cpu_times()[:2])
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_full_info().pss)
            stop.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    model = FastSAM(str(ckpt))
    rows, done_at, stages, rles = [], [], {"read_decode_preprocess_ms": [], "model_ms": [], "postprocess_ms": [], "encode_ms": []}, {}
    for p in paths:
        r = model.predict(str(p), imgsz=imgsz, conf=conf, iou=iou, retina_masks=True, device=device, half=half,
                          verbose=False)[0]
        t_enc = time.perf_counter()
        masks = []
        if r.masks is not None:
            for m, s in zip(r.masks.data, r.boxes.conf.tolist()):
                rle = mask_utils.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))
                masks.append({"counts": rle["counts"].decode(), "area": int(mask_utils.area(rle)),
                              "bbox": [float(v) for v in mask_utils.toBbox(rle)], "score": float(s)})
        stages["encode_ms"].append((time.perf_counter() - t_enc) * 1000)
        stages["read_decode_preprocess_ms"].append(r.speed["preprocess"])
        stages["model_ms"].append(r.speed["inference"])
        stages["postprocess_ms"].append(r.speed["postprocess"])
        rows.append({"image_id": p.name, "height": r.orig_shape[0], "width": r.orig_shape[1], "masks": masks})
        rles[p.name] = (r.orig_shape, [m["counts"] for m in masks])
        done_at.append(time.perf_counter())
    t_w = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "baseline.parquet")
    write_ms = (time.perf_counter() - t_w) * 1000 / len(paths)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    n = len(paths)
    steady = (n - 1) / (done_at[-1] - done_at[0]) if n > 1 else float("nan")
    stats = {
        "images": n, "wall_s": wall, "images_per_s_total": n / wall, "images_per_s_steady": steady,
        "startup_s": done_at[0] - t0, "cpu_s_per_image": (sum(proc.cpu_times()[:2]) - cpu0) / n,
        "peak_driver_mb": peak[0] / 2**20, "peak_workers_mb": 0.0,
        "masks_per_image": float(np.mean([len(r["masks"]) for r in rows])),
        "stage_ms": {k: float(np.mean(v)) for k, v in stages.items()} | {"write_ms": write_ms},
    }
    return stats, rles


def agreement(baseline_rles: dict, table) -> dict:
    """Share of the baseline's masks matched by ours at IoU >= 0.99 and >= 0.95 (pycocotools IoU on RLE)."""
    from pycocotools import mask as mask_utils

    ours = {r["image_id"].rsplit("/", 1)[-1]: r for r in table.select(["image_id", "masks"]).to_pylist()}
    matched = matched95 = total = 0
    worst = 1.0
    for name, ((h, w), counts) in baseline_rles.items():
        ref = [{"size": [h, w], "counts": c.encode()} for c in counts]
        mine = [{"size": [h, w], "counts": m["counts"].encode()} for m in ours[name]["masks"]]
        total += len(ref)
        if ref and mine:
            best = mask_utils.iou(ref, mine, [0] * len(mine)).max(1)
            matched += int((best >= 0.99).sum())
            matched95 += int((best >= 0.95).sum())
            worst = min(worst, float(best.min()))
    return {"baseline_masks": total, "matched_iou_0_99": matched, "fraction": matched / max(total, 1),
            "matched_iou_0_95": matched95, "fraction_0_95": matched95 / max(total, 1), "worst_best_iou": worst,
            "masks_ours": sum(len(r["masks"]) for r in ours.values())}


def rle_micro(paths: list[Path], ckpt: Path, imgsz: int, conf: float, iou: float) -> dict:
    """CPU time of mask -> RLE: baseline (to numpy, Fortran order, encode) vs ours (box crop ->
    run lengths -> pycocotools compress), on the same ultralytics masks; strings must be equal."""
    import torch
    from pycocotools import mask as mask_utils
    from ultralytics import FastSAM

    from fastsam_batch.masks import box_pixel_span
    from fastsam_batch.rle import crop_run_lengths, runs_to_rle

    model = FastSAM(str(ckpt))
    base_cpu = ours_cpu = 0.0
    n_masks = 0
    for p in paths:
        r = model.predict(str(p), imgsz=imgsz, conf=conf, iou=iou, retina_masks=True, device="cpu", verbose=False)[0]
        if r.masks is None:
            continue
        masks = r.masks.data  # (N, H, W) uint8 torch, as ultralytics returns them
        h, w = masks.shape[1:]
        t = time.process_time()
        base = [mask_utils.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))["counts"] for m in masks]
        base_cpu += time.process_time() - t
        boxes = r.boxes.xyxy.tolist()
        t = time.process_time()
        ours = []
        for m, (x1, y1, x2, y2) in zip(masks, boxes):  # a mask is zero outside its box
            c0, c1 = box_pixel_span(x1, x2, w)
            r0, r1 = box_pixel_span(y1, y2, h)
            ours.append(runs_to_rle(crop_run_lengths(m[r0:r1, c0:c1], c0, r0, h, w), h, w)["counts"])
        ours_cpu += time.process_time() - t
        assert ours == base, f"RLE strings differ on {p}"
        n_masks += len(base)
    del torch
    return {"masks": n_masks, "baseline_cpu_ms_per_mask": 1000 * base_cpu / n_masks,
            "ours_cpu_ms_per_mask": 1000 * ours_cpu / n_masks, "speedup": base_cpu / ours_cpu, "identical_strings": True}


def reduced_decode_agreement(work: Path, n: int = 30, device: str = "cpu", files: list[Path] | None = None) -> dict:
    """How close `input.decode: reduced` and `input.decode: device` stay to the reference, with a
    trained model: the fixture checkpoint on n generated 1400x1100 JPEGs (imgsz 320, so they are
    decoded at 1/2 size), or on ``files`` (JPEGs: the GPU report passes the carried photos), our masks
    from the reduced decode, from the device decode (decode.decode_on_device on ``device``: nvJPEG on
    CUDA, letterboxed there) and from the exact decode, each against ultralytics' FastSAM on the same
    files (Pillow's decode)."""
    from pycocotools import mask as mask_utils
    from shapes import make_image
    from ultralytics import FastSAM

    from fastsam_batch.decode import decode_for_model, decode_image, decode_on_device, probe_for_device
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage

    seg = FastSAMSegmenter(SegmentSettings(str(FIXTURE), "bench", imgsz=320, conf=0.4, iou=0.9, device=device), Storage())
    ref_model = FastSAM(str(FIXTURE))
    d = work / "reduced"
    d.mkdir(exist_ok=True)
    labels = ("reduced", "device", "exact")
    out = {"images": len(files) if files else n, "files": "given JPEGs" if files else "generated 1400x1100",
           "reference_masks": 0, **{label: {"masks": 0, "iou_0_95": 0, "iou_0_99": 0} for label in labels}}
    out["device"]["refused"] = 0  # files the device decode left to Pillow (then the exact decode's masks)
    for i in range(len(files) if files else n):
        if files:
            p = files[i]
        else:
            p = d / f"{i}.jpg"
            make_image(20_000 + i, size=(1400, 1100))[0].save(p, quality=90)
        data = p.read_bytes()
        small, shown = decode_for_model(data, imgsz=320)
        assert files or small.shape[:2] != shown
        jpeg = probe_for_device(data)
        on_device = decode_on_device([jpeg], device)[0] if jpeg is not None else decode_image(data)
        out["device"]["refused"] += int(isinstance(on_device, np.ndarray))
        ref = ref_model.predict(str(p), imgsz=320, conf=0.4, iou=0.9, retina_masks=True, device=device, verbose=False)[0]
        refs = [] if ref.masks is None else [mask_utils.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))
                                             for m in ref.masks.data]
        out["reference_masks"] += len(refs)
        h, w = shown
        for label, (image, size) in (("reduced", (small, shown)), ("device", (on_device, shown)),
                                     ("exact", (decode_image(data), shown))):
            (recs, _, _), = seg.segment([image], sizes=[size])
            ours = [{"size": [h, w], "counts": r["counts"].encode()} for r in recs]
            out[label]["masks"] += len(ours)
            if refs and ours:
                best = mask_utils.iou(refs, ours, [0] * len(ours)).max(1)
                out[label]["iou_0_95"] += int((best >= 0.95).sum())
                out[label]["iou_0_99"] += int((best >= 0.99).sum())
    for label in labels:
        for k in ("iou_0_95", "iou_0_99"):
            out[label][f"fraction_{k}"] = out[label][k] / max(out["reference_masks"], 1)
    return out


def nms_micro(paths: list[Path], ckpt: Path, imgsz: int, conf: float, iou: float) -> dict:
    """NMS per photo on the model's own outputs: ultralytics' pure-torch fallback (what ran when
    torchvision was not imported), ultralytics with torchvision, and ours (one call per batch)."""
    import torch
    from ultralytics.utils import nms

    from fastsam_batch.decode import decode_image
    from fastsam_batch.nms import batched_nms
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage

    seg = FastSAMSegmenter(SegmentSettings(str(ckpt), "bench", imgsz=imgsz, conf=conf, iou=iou, device="cpu"), Storage())
    preds = []
    with torch.inference_mode():
        for p in paths:
            x = torch.from_numpy(seg.letterbox(image=decode_image(p.read_bytes()))).permute(2, 0, 1)[None].float() / 255
            y = seg.model(x)
            preds.append((y[0] if isinstance(y[0], tuple) else y)[0])
    times = {"ultralytics_fallback_ms": 0.0, "ultralytics_torchvision_ms": 0.0, "ours_ms": 0.0}
    candidates = 0
    for pred in preds:
        candidates += int((pred[0, 4] > conf).sum())
        tv = sys.modules.pop("torchvision")
        try:
            t = time.perf_counter()
            nms.non_max_suppression(pred, conf, iou, agnostic=True, max_det=300, nc=1)
            times["ultralytics_fallback_ms"] += time.perf_counter() - t
        finally:
            sys.modules["torchvision"] = tv
        t = time.perf_counter()
        ref = nms.non_max_suppression(pred, conf, iou, agnostic=True, max_det=300, nc=1)
        times["ultralytics_torchvision_ms"] += time.perf_counter() - t
        t = time.perf_counter()
        ours = batched_nms(pred, conf, iou, 300, 1)
        times["ours_ms"] += time.perf_counter() - t
        assert torch.equal(ours[0], ref[0])
    return {k: 1000 * v / len(preds) for k, v in times.items()} | {"photos": len(preds),
                                                                  "candidates_per_photo": candidates / len(preds)}


def model_only(paths: list[Path], ckpt: Path, imgsz: int, device: str, half: bool, batch_size: int,
               sweep: tuple[int, ...] = ()) -> dict:
    """Images/s of the model alone: batched forward passes (letterboxed uint8 batches moved to the
    device, normalised, forward, synchronised), no decode, NMS, masks or writing. ``sweep``: other
    batch sizes timed the same way on the same letterboxed images (decoded once), in
    ``by_batch_size`` (images/s per batch size; a few seconds of device time)."""
    import torch

    from fastsam_batch.decode import decode_image
    from fastsam_batch.segment import FastSAMSegmenter, SegmentSettings
    from fastsam_batch.storage import Storage

    seg = FastSAMSegmenter(SegmentSettings(str(ckpt), "bench", imgsz=imgsz, conf=0.01, iou=0.9, device=device,
                                           half=half), Storage())
    by_shape: dict[tuple, list] = {}
    for p in paths:
        b = seg.letterbox(image=decode_image(p.read_bytes()))
        by_shape.setdefault(b.shape, []).append(b)

    def timed(n: int) -> float:
        batches = [np.stack(v[i:i + n]) for v in by_shape.values() for i in range(0, len(v), n)]

        def run_all():
            for b in batches:
                x = torch.from_numpy(b).to(seg.device).permute(0, 3, 1, 2)
                x = (x.half() if seg.fp16 else x.float()).div_(255)
                with torch.inference_mode():
                    seg.model(x)
            if seg.device.type == "cuda":
                torch.cuda.synchronize()

        run_all()  # warm-up (cuDNN autotuning, allocator)
        t0 = time.perf_counter()
        run_all()
        return len(paths) / (time.perf_counter() - t0)

    out = {"images": len(paths), "batch_size": batch_size, "images_per_s": timed(batch_size), "threads": seg.threads}
    if sweep:
        out["by_batch_size"] = {n: (out["images_per_s"] if n == batch_size else timed(n)) for n in sweep}
    return out


# ----------------------------------------------------------------------------- workloads
def random_fastsam(path: Path, arch: str = "s") -> Path:
    """A FastSAM-s (yolov8s-seg) or FastSAM-x (yolov8x-seg) architecture checkpoint, one class,
    seeded random weights."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    m = SegmentationModel(f"yolov8{arch}-seg.yaml", nc=1, verbose=False)
    # Freshly initialised, every anchor gets exactly the same score, and which boxes survive NMS
    # is down to tie-breaking: no implementation can be compared with another on that. A little
    # seeded noise in the classification branch spreads the scores (about 80-90 masks per photo
    # at conf 0.01) and makes the comparison meaningful.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.model[-1].cv3.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    torch.save({"model": m.half(), "train_args": {"task": "segment", "imgsz": 1024}}, path)
    return path


def realistic_fastsam(path: Path, photos: list[Path], arch: str = "s", conf: float = 0.4, iou: float = 0.9,
                      target: int = 100, imgsz: int = 1024) -> tuple[Path, dict]:
    """A FastSAM-s / FastSAM-x architecture checkpoint with seeded random weights, calibrated so that on
    ``photos`` at ``conf`` it gives about ``target`` non-empty masks per photo, as real FastSAM weights
    do (30-150 at conf 0.4), rather than thousands of near-tied candidates and empty masks.

    How: the prototype branch's kernels are made uniform over their windows (smooth masks, see
    below). A freshly initialised network passes almost nothing through (activations shrink layer by
    layer, so every photo gives nearly the same near-tied outputs). First every batch norm's running
    statistics are set, in one forward pass over a photo, to those of its own input there (a
    data-dependent initialisation): activations keep unit scale and outputs depend on the image.
    Then from one forward pass over each of up to ten photos, with the classification branch's last bias
    at zero, (1) its last weights are scaled so that the score logits spread with a standard deviation
    of 1 over the anchors (scores apart, so NMS decisions are not float ties); (2) one bias is added to
    every mask coefficient so that a kept box's mask logits are positive on about 40% of its pixels
    (the median over boxes); (3) the classification bias is set, by bisection, so that the candidates
    above ``conf`` that survive NMS (class-agnostic, ``iou``) average ``target`` per photo. All three
    are linear in the head's last layers, so the calibration needs that one pass. Returns the
    checkpoint and what it was calibrated to."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel
    from ultralytics.utils import ops

    from fastsam_batch.decode import decode_image
    from fastsam_batch.nms import batched_nms

    torch.manual_seed(0)
    m = SegmentationModel(f"yolov8{arch}-seg.yaml", nc=1, verbose=False).eval()
    head = m.model[-1]
    from ultralytics.data.augment import LetterBox

    lb = LetterBox(imgsz, auto=True, stride=32)

    def normalise(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)) + module.eps)

    with torch.no_grad():
        # Smooth prototypes: random 3x3 kernels make prototypes (and so masks) noise at the pixel
        # scale, with about 6 runs per column of a mask and 35x the run lengths of real masks; each
        # kernel of the prototype branch made uniform over its window (its channel mixing kept)
        # gives blobs a few tens of pixels across, like real masks' outlines.
        proto = head.proto
        for conv in (proto.cv1.conv, proto.upsample, proto.cv2.conv):
            conv.weight.copy_(conv.weight.mean((2, 3), keepdim=True).expand_as(conv.weight))
        hooks = [b.register_forward_pre_hook(normalise) for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        m(torch.from_numpy(lb(image=decode_image(photos[-1].read_bytes()))).permute(2, 0, 1)[None].float() / 255)
        for h in hooks:
            h.remove()
        for branch in head.cv3:
            branch[-1].bias.zero_()
        outs = []
        for p in photos[:10]:
            x = torch.from_numpy(lb(image=decode_image(p.read_bytes()))).permute(2, 0, 1)[None].float() / 255
            y = m(x)
            y = y[0] if isinstance(y[0], tuple) else y
            outs.append((x.shape[2:], y[0], y[1], decode_image(p.read_bytes()).shape[:2]))
        z = torch.cat([torch.logit(pred[0, 4].clamp(1e-7, 1 - 1e-7)) for _, pred, _, _ in outs])
        scale = 1.0 / float(z.std())
        for branch in head.cv3:
            branch[-1].weight.mul_(scale)

        def kept(bias: float) -> list[torch.Tensor]:
            res = []
            for _, pred, _, _ in outs:
                p2 = pred.clone()
                p2[:, 4] = torch.sigmoid(torch.logit(pred[:, 4].clamp(1e-7, 1 - 1e-7)) * scale + bias)
                res.append(batched_nms(p2, conf, iou, 300, 1)[0])
            return res

        # Mask coefficient bias: about 40% of each kept box's pixels positive (median over boxes).
        lo, hi = -50.0, 50.0
        cand = kept(float(torch.logit(torch.tensor(conf))) - float(torch.quantile(z[:10000] * scale, 0.99)))

        def positive_share(delta: float) -> float:
            shares = []
            for (in_shape, _, proto, _), k in zip(outs, cand):
                for row in k[:50]:
                    x1, y1, x2, y2 = (int(v / 4) for v in row[:4].clamp(min=0).tolist())
                    coeff = row[6:] + delta
                    logits = torch.einsum("c,chw->hw", coeff, proto[0][:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)])
                    shares.append(float((logits > 0).float().mean()))
            return float(np.median(shares)) if shares else 0.0

        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if positive_share(mid) < 0.4 else (lo, mid)
        delta = (lo + hi) / 2
        for branch in head.cv4:
            branch[-1].bias.add_(delta)
        # Classification bias: about `target` boxes per photo after NMS.
        lo, hi = -30.0, 30.0
        for _ in range(40):
            mid = (lo + hi) / 2
            n = np.mean([k.shape[0] for k in kept(mid)])
            lo, hi = (mid, hi) if n < target else (lo, mid)
        bias = (lo + hi) / 2
        for branch in head.cv3:
            branch[-1].bias.fill_(bias)
    torch.save({"model": m.half(), "train_args": {"task": "segment", "imgsz": imgsz}}, path)
    del ops
    return path, {"arch": arch, "conf": conf, "target_masks": target, "score_weight_scale": scale,
                  "mask_coefficient_bias": delta, "score_bias": bias}


def load_checkpoint(args, work: Path, photos: list[Path], arch: str, results: dict) -> tuple[Path, float]:
    """The workload-1 checkpoint of ``args.load`` for ``arch``, and the conf it is run at."""
    if args.load == "legacy":
        return random_fastsam(work / f"fastsam-{arch}-random.pt", arch), 0.01
    ckpt, info = realistic_fastsam(work / f"fastsam-{arch}-realistic.pt", photos, arch)
    results.setdefault("calibration", {})[arch] = info
    return ckpt, info["conf"]


DECODE = "auto"  # input.decode of the benchmark's runs (--decode)


def write_manifest(path: Path, input_uri: str, output_uri: str, ckpt: str, imgsz: int, conf: float,
                   device: str = "cpu", half: bool = False, **runtime) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": "bench", "input": {"uri": input_uri, "decode": DECODE},
        "model": {"checkpoint": ckpt, "imgsz": imgsz, "conf": conf, "iou": 0.9, "device": device, "half": half},
        "output": {"uri": output_uri, "rows_per_file": 500}, "runtime": {"batch_size": 4, **runtime},
    }))
    return path


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=50)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--large", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="photos=6, small=20, large=60")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU report")
    ap.add_argument("--half", action="store_true", help="fp16 on CUDA")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gpu-report", action="store_true",
                    help="only: FastSAM-s and FastSAM-x architectures on workload 1 from a local folder, model alone "
                         "(batched forward) vs end to end; use with --device cuda --half")
    ap.add_argument("--sweep", action="store_true",
                    help="only: workload 1 end to end over batch size, actors and decode CPUs (to choose defaults)")
    ap.add_argument("--photo-dir", default=str(REAL), help="folder of JPEG photographs for workload 1")
    ap.add_argument("--archs", default="s,x", help="with --gpu-report: FastSAM architectures, s and/or x")
    ap.add_argument("--baseline-photos", type=int, default=40, help="with --gpu-report: photos for the plain loop")
    ap.add_argument("--load", choices=("realistic", "legacy"), default="realistic",
                    help="realistic: random-weight checkpoints calibrated to about 100 non-empty masks per photo at "
                         "conf 0.4 (realistic_fastsam); legacy: the earlier seeded random weights at conf 0.01")
    ap.add_argument("--decode", choices=("auto", "reduced", "exact", "device"), default="auto", help="input.decode of the runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "results.json"))
    args = ap.parse_args()
    if args.quick:
        args.photos, args.small, args.large = 6, 20, 60
    global DECODE
    DECODE = args.decode
    import pyarrow.dataset as pads

    work = Path(tempfile.mkdtemp(prefix="fastsam-bench-"))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "device": args.device,
                     "args": vars(args)}
    if args.device.startswith("cuda"):
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    try:
        # Workload 1: real photographs, FastSAM-s architecture, imgsz 1024.
        photos = work / "photos"
        photos.mkdir()
        src = sorted(Path(args.photo_dir).glob("*.jpg"))
        paths = []
        for i in range(args.photos):
            p = photos / f"{i:04d}-{src[i % len(src)].name}"
            shutil.copy(src[i % len(src)], p)
            paths.append(p)
        if args.gpu_report or args.sweep:
            (gpu_report if args.gpu_report else sweep)(args, work, photos, paths, results)
            return finish(args, results)
        ckpt, conf = load_checkpoint(args, work, src, "s", results)
        print(f"workload 1: {len(paths)} photos, FastSAM-s architecture ({args.load} load), imgsz 1024, conf {conf}",
              flush=True)
        base, base_rles = baseline_loop(paths, ckpt, 1024, conf, 0.9, work / "baseline")
        results["w1_baseline"] = base
        print(f"  baseline: {base['images_per_s_steady']:.3f} images/s steady", flush=True)
        m = write_manifest(work / "w1-local.yaml", str(photos), str(work / "w1-out"), str(ckpt), 1024, conf)
        run = run_tool(m)
        table = pads.dataset(str(work / "w1-out"), format="parquet").to_table()
        run["summary"] = (work / "w1-out" / "_run.json").read_text()
        results["w1_fastsam_batch_local"] = tool_stats(table, run) | {"agreement": agreement(base_rles, table)}
        print(f"  fastsam-batch local: {results['w1_fastsam_batch_local']['images_per_s_steady']:.3f} images/s", flush=True)

        moto, endpoint = moto_server()
        try:
            import s3fs

            env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_REGION": "us-east-1"}
            fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint)
            import boto3

            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                         region_name="us-east-1").create_bucket(Bucket="bench")
            fs.put(str(photos) + "/", "bench/photos/", recursive=True)
            fs.put_file(str(ckpt), "bench/models/fastsam-s-random.pt")
            m = write_manifest(work / "w1-s3.yaml", "s3://bench/photos/", "s3://bench/out/",
                               "s3://bench/models/fastsam-s-random.pt", 1024, conf)
            run = run_tool(m, env)
            fs.invalidate_cache()
            table = pads.dataset("bench/out/", format="parquet", filesystem=fs).to_table()
            run["summary"] = fs.cat_file("bench/out/_run.json").decode()
            results["w1_fastsam_batch_s3"] = tool_stats(table, run) | {"agreement": agreement(base_rles, table)}
            print(f"  fastsam-batch s3: {results['w1_fastsam_batch_s3']['images_per_s_steady']:.3f} images/s", flush=True)
        finally:
            moto.terminate()
        results["w1_rle_micro"] = rle_micro(paths[: min(len(paths), len(src))], ckpt, 1024, conf, 0.9)
        results["w1_nms_micro"] = nms_micro(paths[: min(len(paths), len(src))], ckpt, 1024, conf, 0.9)
        print(f"  NMS per photo: {json.dumps({k: round(v, 1) for k, v in results['w1_nms_micro'].items()})}", flush=True)
        results["reduced_decode_agreement"] = reduced_decode_agreement(work)
        print(f"  reduced decode vs reference (trained fixture model): "
              f"{json.dumps(results['reduced_decode_agreement'])}", flush=True)
        print(f"  mask->RLE CPU speed-up: {results['w1_rle_micro']['speedup']:.1f}x", flush=True)

        # Workload 2: generated images, fixture model, growing run.
        from shapes import make_image

        for label, n in (("small", args.small), ("large", args.large)):
            d = work / f"gen-{n}"
            d.mkdir()
            for i in range(n):
                make_image(10_000 + i)[0].save(d / f"{i:05d}.png")
            m = write_manifest(work / f"w2-{n}.yaml", str(d), str(work / f"w2-out-{n}"), str(FIXTURE), 320, 0.4)
            run = run_tool(m)
            table = pads.dataset(str(work / f"w2-out-{n}"), format="parquet").to_table()
            run["summary"] = (work / f"w2-out-{n}" / "_run.json").read_text()
            results[f"w2_fastsam_batch_{label}"] = tool_stats(table, run)
            print(f"  workload 2, {n} images: {results[f'w2_fastsam_batch_{label}']['images_per_s_steady']:.2f} images/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    w1b, w1l = results["w1_baseline"], results["w1_fastsam_batch_local"]
    results["claims"] = {
        "end_to_end_speedup_local": w1l["images_per_s_steady"] / w1b["images_per_s_steady"],
        "end_to_end_speedup_s3": results["w1_fastsam_batch_s3"]["images_per_s_steady"] / w1b["images_per_s_steady"],
        "masks_matched_iou_0_99": w1l["agreement"]["fraction"],
        "rle_cpu_speedup": results["w1_rle_micro"]["speedup"],
        "peak_memory_growth_large_vs_small": (
            (results["w2_fastsam_batch_large"]["peak_driver_mb"] + results["w2_fastsam_batch_large"]["peak_workers_mb"])
            / (results["w2_fastsam_batch_small"]["peak_driver_mb"] + results["w2_fastsam_batch_small"]["peak_workers_mb"]) - 1
        ),
    }
    finish(args, results)


def finish(args, results: dict, quiet: bool = False) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if quiet:
        return
    if "claims" in results:
        print_table(results)
    print(f"\nwrote {args.out}")


class GpuSampler:
    """GPU utilisation and memory in use, sampled by ``nvidia-smi`` every 250 ms while a run lasts."""

    def __init__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "250"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate()
        rows = [[float(v) for v in line.split(",")[:2]] for line in out.splitlines() if line.count(",") >= 1]
        busy = [u for u, _ in rows]
        # Utilisation while the run works: from the first busy sample to the last.
        first = next((i for i, u in enumerate(busy) if u > 0), 0)
        last = len(busy) - next((i for i, u in enumerate(reversed(busy)) if u > 0), 0)
        return {"gpu_busy_pct_mean": float(np.mean(busy[first:last])) if last > first else 0.0,
                "gpu_memory_peak_mb": max((m for _, m in rows), default=0.0), "samples": len(rows)}


def segmentation_line(log: str) -> str:
    """The run's "segmentation: N actors (why), G GPU each; ..." line (how many actors per GPU, and why)."""
    return next((line.strip() for line in log.splitlines() if line.strip().startswith("segmentation:")), "")


def gpu_report(args, work: Path, photos: Path, paths: list[Path], results: dict) -> None:
    """FastSAM-s and -x architectures, realistic load: the model alone (batched forward), the plain
    ultralytics loop on the same device, and `fastsam-batch run` end to end with GPU utilisation,
    stage times and mask agreement with the loop; then host and GPU memory at len(paths) and 10x,
    and (FastSAM-x) the 10x run again with one actor per GPU (`gpus_per_actor: 1`, the old default)
    against the default of several per GPU (sizing.actors_per_gpu)."""
    import pyarrow.dataset as pads

    src = sorted(Path(args.photo_dir).glob("*.jpg"))

    def free():
        if args.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def end_to_end(ckpt, conf, folder, out, **runtime):
        m = write_manifest(work / f"{out.name}.yaml", str(folder), str(out), str(ckpt), 1024, conf, device=args.device,
                           half=args.half, batch_size=args.batch_size, **runtime)
        gpu = GpuSampler()
        run = run_tool(m)
        run["summary"] = (out / "_run.json").read_text()
        table = pads.dataset(str(out), format="parquet").to_table()
        return tool_stats(table, run) | gpu.stop() | {"segmentation": segmentation_line(run["log"])}, table

    for arch in args.archs.split(","):
        ckpt, conf = load_checkpoint(args, work, src, arch, results)
        # the model alone at --batch-size, and a short sweep of batch sizes (a few seconds of device time)
        alone = model_only(paths, ckpt, 1024, args.device, args.half, args.batch_size,
                           sweep=tuple(sorted({8, 16, 32, args.batch_size})))
        print(f"FastSAM-{arch}: model alone by batch size (images/s): "
              f"{json.dumps({k: round(v, 1) for k, v in alone['by_batch_size'].items()})}", flush=True)
        free()
        base, base_rles = baseline_loop(paths[:args.baseline_photos], ckpt, 1024, conf, 0.9, work / f"base-{arch}",
                                        device=args.device, half=args.half)
        free()
        e2e, table = end_to_end(ckpt, conf, photos, work / f"gpu-{arch}-out")
        r = results[f"fastsam_{arch}"] = {
            "model_only": alone, "baseline_loop": base, "end_to_end": e2e,
            "end_to_end_over_model_only": e2e["images_per_s_steady"] / alone["images_per_s"],
            "end_to_end_over_baseline": e2e["images_per_s_steady"] / base["images_per_s_steady"],
            "agreement_with_baseline": agreement(base_rles, table)}
        print(f"FastSAM-{arch}: model alone {alone['images_per_s']:.1f} images/s, plain loop "
              f"{base['images_per_s_steady']:.1f}, end to end {e2e['images_per_s_steady']:.1f} images/s "
              f"({r['end_to_end_over_model_only']:.0%} of the model, {r['end_to_end_over_baseline']:.1f}x the loop), "
              f"GPU busy {e2e.get('gpu_busy_pct_mean', float('nan')):.0f}%, {e2e['masks_per_image']:.1f} masks/img; "
              f"matched IoU>=0.95 {r['agreement_with_baseline']['fraction_0_95']:.3f}, >=0.99 "
              f"{r['agreement_with_baseline']['fraction']:.3f}; stages ms/img "
              f"{json.dumps({k: round(v, 1) for k, v in e2e['stage_ms'].items()})}; {e2e['segmentation']}", flush=True)
        finish(args, results, quiet=True)  # after each architecture: a later failure keeps these
    results["reduced_decode_agreement"] = reduced_decode_agreement(work, device=args.device)
    print(f"reduced and device decode vs reference (trained fixture model): "
          f"{json.dumps(results['reduced_decode_agreement'])}", flush=True)
    results["decode_agreement_photos"] = reduced_decode_agreement(work, device=args.device, files=src[:10])
    print(f"reduced and device decode vs reference on the carried photos (trained fixture model): "
          f"{json.dumps(results['decode_agreement_photos'])}", flush=True)
    finish(args, results, quiet=True)
    # Flat memory: the same job over len(paths) and 10x as many images (the last architecture).
    big = work / "photos-10x"
    big.mkdir()
    for k in range(10):
        for p in paths:
            os.link(p, big / f"{k}-{p.name}")
    for label, folder in (("small", photos), ("large", big)):
        e2e, _ = end_to_end(ckpt, conf, folder, work / f"gpu-mem-{label}")
        results[f"memory_{label}"] = {k: e2e.get(k) for k in ("images", "images_per_s_steady", "peak_driver_mb",
                                                              "peak_workers_mb", "gpu_memory_peak_mb", "gpu_busy_pct_mean",
                                                              "segmentation")}
        print(f"memory, {e2e['images']} images: host {e2e['peak_driver_mb'] + e2e['peak_workers_mb']:.0f} MB, "
              f"GPU {e2e.get('gpu_memory_peak_mb', float('nan')):.0f} MB, {e2e['images_per_s_steady']:.1f} images/s "
              f"({e2e['segmentation']})", flush=True)
        finish(args, results, quiet=True)
    # Several actors per GPU (the default) against one (the old default), FastSAM-x on the 10x images
    # (enough batches for a steady state with several actors): does running finish()'s host work in
    # several processes per GPU lift the one-actor cap (benchmarks/RESULTS.md, issue 22)? Both runs
    # on FastSAM-x: the memory runs above used the last architecture's checkpoint, so when that is
    # not x, the default run is made again on x's checkpoint.
    archs = args.archs.split(",")
    if "x" not in archs:
        results["end_to_end_one_actor_per_gpu"] = {"skipped": "FastSAM-x not in --archs"}
        return
    keys = ("images", "images_per_s_steady", "startup_s", "gpu_busy_pct_mean", "gpu_memory_peak_mb", "stage_ms",
            "segmentation")
    if archs[-1] == "x":  # the 10x memory run was x's, with the defaults: the comparison's default run
        x_ckpt, x_conf = ckpt, conf
        several = results["memory_large"]
    else:
        x_ckpt, x_conf = load_checkpoint(args, work, src, "x", results)
        free()
        several_run, _ = end_to_end(x_ckpt, x_conf, big, work / "gpu-several-actors-per-gpu")
        several = results["end_to_end_several_actors_per_gpu"] = {k: several_run.get(k) for k in keys}
        finish(args, results, quiet=True)
    free()
    one, _ = end_to_end(x_ckpt, x_conf, big, work / "gpu-one-actor-per-gpu", gpus_per_actor=1.0)
    results["end_to_end_one_actor_per_gpu"] = {k: one.get(k) for k in keys} | {
        "default_over_one_actor_per_gpu": several["images_per_s_steady"] / one["images_per_s_steady"]}
    print(f"FastSAM-x, {one['images']} images: one actor per GPU {one['images_per_s_steady']:.1f} images/s "
          f"(GPU busy {one.get('gpu_busy_pct_mean', float('nan')):.0f}%), the default {several['images_per_s_steady']:.1f} "
          f"(GPU busy {several.get('gpu_busy_pct_mean', float('nan')):.0f}%; {several['segmentation']}): "
          f"{results['end_to_end_one_actor_per_gpu']['default_over_one_actor_per_gpu']:.2f}x", flush=True)


SWEEP = [  # (label, runtime settings); the first is the default
    ("defaults: batch 4, one actor per core", {}),
    ("1 actor x all cores as threads", {"num_actors": 1}),
    ("1 actor x 1 thread (ultralytics' default here)", {"num_actors": 1, "torch_threads": 1}),
    ("actors = cores + 1", {"num_actors": (os.cpu_count() or 1) + 1}),
    ("batch 1", {"batch_size": 1}),
    ("batch 2", {"batch_size": 2}),
    ("batch 8", {"batch_size": 8}),
    ("decode_cpus 0.5", {"decode_cpus": 0.5}),
]
GPU_SWEEP = [  # with --device cuda: fp16, batch size, actors per GPU, read/decode workers per GPU
    # sizing.GPU_BATCH; actors per GPU by its memory and the CPUs (sizing.actors_per_gpu: 4 on an 80 GB GPU)
    ("defaults: batch 16, up to 4 actors per GPU by its memory, decoders on every free CPU", {"batch_size": 16}),
    ("1 actor per GPU (the old default), batch 16", {"gpus_per_actor": 1.0, "batch_size": 16}),
    ("fp32 (model.half off)", {"half": False, "batch_size": 16}),
    ("batch 4", {"batch_size": 4}),
    ("batch 8", {"batch_size": 8}),
    ("batch 32", {"batch_size": 32}),
    ("2 actors per GPU, batch 8", {"gpus_per_actor": 0.5, "batch_size": 8}),
    ("2 decode workers", {"decode_workers": 2, "batch_size": 16}),
    ("4 decode workers", {"decode_workers": 4, "batch_size": 16}),
    ("8 decode workers", {"decode_workers": 8, "batch_size": 16}),
]


def sweep(args, work: Path, photos: Path, paths: list[Path], results: dict) -> None:
    """Workload 1 end to end with each of SWEEP's (GPU_SWEEP's on CUDA) runtime settings, to choose
    the defaults. ``half`` in an entry is ``model.half``; the other entries take ``--half``."""
    import pyarrow.dataset as pads

    ckpt, conf = load_checkpoint(args, work, sorted(Path(args.photo_dir).glob("*.jpg")), "s", results)
    rows = []
    for i, (label, runtime) in enumerate(GPU_SWEEP if args.device.startswith("cuda") else SWEEP):
        out = work / f"sweep-{i}"
        settings = {k: v for k, v in runtime.items() if k != "half"}
        m = write_manifest(work / f"sweep-{i}.yaml", str(photos), str(out), str(ckpt), 1024, conf, device=args.device,
                           half=runtime.get("half", args.half), **settings)
        run = run_tool(m)
        run["summary"] = (out / "_run.json").read_text()
        st = tool_stats(pads.dataset(str(out), format="parquet").to_table(), run)
        rows.append({"label": label, "runtime": runtime, **{k: st[k] for k in (
            "images_per_s_steady", "startup_s", "cpu_s_per_image", "peak_driver_mb", "peak_workers_mb")}})
        print(f"  {label}: {st['images_per_s_steady']:.3f} images/s, workers {st['peak_workers_mb']:.0f} MB", flush=True)
    results["sweep"] = rows


def print_table(results: dict) -> None:
    keys = [k for k in results if k.startswith(("w1_baseline", "w1_fastsam", "w2_"))]
    print(f"\n{'contender':30} {'img/s':>7} {'start s':>8} {'CPU s/img':>9} {'drv MB':>7} {'wrk MB':>7} {'masks':>6}  stages (ms/img)")
    for k in keys:
        r = results[k]
        st = " ".join(f"{s.replace('_ms', '')}={v:.0f}" for s, v in r["stage_ms"].items())
        print(f"{k:30} {r['images_per_s_steady']:7.3f} {r['startup_s']:8.1f} {r['cpu_s_per_image']:9.2f} "
              f"{r['peak_driver_mb']:7.0f} {r['peak_workers_mb']:7.0f} {r['masks_per_image']:6.1f}  {st}")
    print("\nclaims:", json.dumps(results["claims"], indent=2))


if __name__ == "__main__":
    main()

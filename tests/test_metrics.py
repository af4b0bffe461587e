"""The run's metrics, read back from the node's Prometheus endpoint (Ray's metrics agent) while the
run works, equal what the output holds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import yaml

from conftest import CHECKPOINT, free_port, save_shapes

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')


def scrape(port: int) -> list[tuple[str, dict, float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in body.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group("labels") or ""))
            out.append((m.group("name"), labels, float(m.group("value"))))
    return out


def total(samples, name: str, **labels) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == want for k, want in labels.items()))


def test_counters_read_back_from_the_metrics_endpoint(tmp_path):
    images = tmp_path / "imgs"
    save_shapes(images, range(9100, 9106))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    save_shapes(images, [9199])
    (images / "9199.png").rename(images / "zz-slow.png")  # keeps the run (and its metrics endpoint) alive
    out = tmp_path / "out"
    port = free_port()
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({
        "name": "metered", "input": {"uri": str(images)},
        "model": {"checkpoint": str(CHECKPOINT), "imgsz": 320, "conf": 0.4, "device": "cpu"},
        "output": {"uri": str(out), "commit_interval_s": 1},
        "runtime": {"batch_size": 2, "metrics_export_port": port, "num_actors": 1},
    }))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"FASTSAM_BATCH_TEST_SLOW": "decode:zz-slow:600"}
    exe = Path(sys.executable).with_name("fastsam-batch")
    proc = subprocess.Popen([str(exe), "run", str(m)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sizes = {p.name: p.stat().st_size for p in images.iterdir()}
    try:
        deadline = time.time() + 300
        while True:  # Ray's agents export every few seconds: wait until they agree with the output
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the metrics never agreed with the output"
            time.sleep(1)
            if not list(out.glob("part-*.parquet")):
                continue
            rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
            ok = sum(r["status"] == "ok" for r in rows)
            reasons: dict = {}
            for r in rows:
                if r["status"] != "ok":
                    reasons[r["error"].split(":")[0]] = reasons.get(r["error"].split(":")[0], 0) + 1
            samples = scrape(port)
            got = (total(samples, "ray_fastsam_batch_images_total", status="ok", job="metered"),
                   {reason: total(samples, "ray_fastsam_batch_images_total", status="error", reason=reason)
                    for reason in reasons},
                   total(samples, "ray_fastsam_batch_masks_total", job="metered"),
                   total(samples, "ray_fastsam_batch_stage_ms_count", stage="model"),
                   total(samples, "ray_fastsam_batch_files_total"))
            want = (ok, reasons, sum(r["num_masks"] for r in rows), ok, len(list(out.glob("part-*.parquet"))))
            read = total(samples, "ray_fastsam_batch_bytes_read_total")
            # Bytes: at least those of the committed images, at most every file's (some are read
            # and waiting, the slow one is read before its decode stalls).
            if got == want and sum(sizes[r["image_id"]] for r in rows) <= read <= sum(sizes.values()) and ok >= 2:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)


def test_the_grafana_dashboard_charts_the_metrics_the_run_exports():
    import json

    from conftest import ROOT

    dash = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"ray_fastsam_batch_\w+", e)}
    source = (ROOT / "fastsam_batch" / "metrics.py").read_text()
    defined = {"ray_" + n for n in re.findall(r'(?:Counter|Histogram)\("(fastsam_batch_\w+)"', source)}
    assert used == defined  # every metric charted, and only those that exist
    assert {p["gridPos"]["y"] for p in dash["panels"]} and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])

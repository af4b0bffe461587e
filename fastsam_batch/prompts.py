"""Prompt sources: a prompt table (Parquet, JSONL, CSV), a COCO annotations JSON, global prompts.

Everything here runs on the driver before any work starts and is pure apart from reading the
source file. The result is, per image key, an ordered list of prompts as small dicts that travel
with the image's plan item (a JSON string), so the segment actors never look anything up.

A prompt dict: ``{"kind": "box"|"points"|"text", "id": str|None, "category_id": int|None,
"box": [x1, y1, x2, y2], "points": [[x, y], ...], "labels": [1|0, ...], "text": str,
"error": str|None}``. A table row that cannot become a prompt still becomes one, with ``error``
set (``bad_prompt: ...``), so it is recorded in the image's output row instead of vanishing.
Geometry against the image (zero-area boxes, points outside) is checked later, in
:mod:`.select`, where the image size is known.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .storage import Storage

TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
KINDS = ("box", "points", "text")


class PromptSourceError(ValueError):
    """A prompt source that cannot be used at all (missing, unreadable, no key column)."""


@dataclass
class PromptIndex:
    by_key: dict[str, list[dict]] = field(default_factory=dict)
    rows: int = 0  # rows / annotations read
    rows_without_key: int = 0  # rows with an empty image key: counted, not usable
    bad_rows: Counter = field(default_factory=Counter)  # reason -> rows turned into error prompts
    sha256: str = ""  # of the source bytes, part of the run fingerprint
    has_texts: bool = False


def table_format(uri: str, declared: str | None = None) -> str:
    if declared:
        return declared
    for ext, fmt in TABLE_FORMATS.items():
        if uri.lower().endswith(ext):
            return fmt
    raise PromptSourceError(
        f"prompts.table {uri!r}: cannot tell the format from the extension; name it with prompts.table_format "
        "(parquet, jsonl or csv)"
    )


def _number_list(value: Any, n: int | None, what: str) -> list[float]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v for v in value.replace(",", " ").split() if v]
    if value is None or not hasattr(value, "__len__"):
        raise ValueError(f"{what} must be a list of numbers")
    out = []
    for v in list(value):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be numbers, got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{what} must be finite numbers, got {v!r}")
        out.append(f)
    if n is not None and len(out) != n:
        raise ValueError(f"{what} must have {n} numbers, got {len(out)}")
    return out


def _points(value: Any) -> list[list[float]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("points must be a JSON list of [x, y] pairs") from None
    if value is None or not hasattr(value, "__len__") or len(value) == 0:
        raise ValueError("points must be a non-empty list of [x, y] pairs")
    value = list(value)
    if all(isinstance(v, (int, float)) for v in value) and len(value) == 2:
        value = [value]  # a single point given flat
    return [_number_list(p, 2, "each point") for p in value]


def make_prompt(row: dict, *, kind: str | None = None) -> dict:
    """One prompt dict from a table row / manifest entry; problems become ``error``, never exceptions."""
    pid = row.get("prompt_id")
    prompt: dict = {"kind": None, "id": None if _missing(pid) else str(pid), "category_id": None, "error": None}
    cat = row.get("category_id")
    if not _missing(cat):
        try:
            prompt["category_id"] = int(cat)
        except (TypeError, ValueError):
            prompt["error"] = f"bad_prompt: category_id must be an integer, got {cat!r}"
    kind = kind or (None if _missing(row.get("kind")) else str(row["kind"]).strip().lower())
    present = [k for k, col in (("box", "box"), ("points", "points"), ("text", "text")) if not _missing(row.get(col))]
    if kind is None:
        if len(present) != 1:
            prompt["error"] = prompt["error"] or (
                "bad_prompt: a row needs exactly one of box, points, text (or a kind column)"
                if present else "bad_prompt: the row has no box, points or text")
            prompt["kind"] = present[0] if present else None
            return prompt
        kind = present[0]
    prompt["kind"] = kind
    if kind not in KINDS:
        prompt["error"] = f"bad_prompt: kind must be one of {', '.join(KINDS)}, got {kind!r}"
        return prompt
    try:
        if kind == "box":
            prompt["box"] = _number_list(row.get("box"), 4, "box [x1, y1, x2, y2]")
        elif kind == "points":
            prompt["points"] = _points(row.get("points"))
            labels = row.get("labels")
            if _missing(labels):
                prompt["labels"] = [1] * len(prompt["points"])
            else:
                lab = _number_list(labels, len(prompt["points"]), "labels (one per point)")
                if any(v not in (0.0, 1.0) for v in lab):
                    raise ValueError("labels must be 1 (foreground) or 0 (background)")
                prompt["labels"] = [int(v) for v in lab]
        else:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("text must be a non-empty string")
            prompt["text"] = text.strip()
    except ValueError as e:
        prompt["error"] = prompt["error"] or f"bad_prompt: {e}"
    return prompt


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return False


def _read_rows(data: bytes, fmt: str) -> list[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    elif fmt == "csv":
        # Every cell as text: ids stay ids ("007" is not 7) and list cells stay parseable JSON.
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    else:
        rows = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"bad_prompt: line {n} is not JSON ({e.msg})"})
                continue
            rows.append(obj if isinstance(obj, dict) else {"__error__": f"bad_prompt: line {n} is not a JSON object"})
        return rows
    return table.to_pylist()


def load_prompt_table(uri: str, storage: Storage, key: str, fmt: str | None = None) -> PromptIndex:
    """Read a prompt table: one row per prompt, keyed by ``key`` (``image_id`` or ``uri``)."""
    fmt = table_format(uri, fmt)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise PromptSourceError(f"prompts.table {uri!r}: no such file") from None
    try:
        rows = _read_rows(data, fmt)
    except Exception as e:  # noqa: BLE001 - any reader error means an unreadable table
        raise PromptSourceError(f"prompts.table {uri!r}: cannot read it as {fmt}: {e}") from None
    if rows and not any(key in r for r in rows if "__error__" not in r):
        cols = sorted({c for r in rows for c in r if c != "__error__"})
        raise PromptSourceError(f"prompts.table {uri!r}: no {key!r} column (prompts.key); columns are {cols}")
    index = PromptIndex(sha256=hashlib.sha256(data).hexdigest())
    for r in rows:
        index.rows += 1
        k = r.get(key)
        if _missing(k) or "__error__" in r:
            index.rows_without_key += 1
            continue
        p = make_prompt(r) if "__error__" not in r else {"kind": None, "id": None, "category_id": None, "error": r["__error__"]}
        if p["error"]:
            index.bad_rows["bad_prompt"] += 1
        index.has_texts |= p["kind"] == "text"
        index.by_key.setdefault(str(k), []).append(p)
    return index


def load_coco(uri: str, storage: Storage, include_crowd: bool = False) -> PromptIndex:
    """Box prompts from a COCO annotations JSON, keyed by each image's ``file_name``.

    ``bbox`` [x, y, w, h] becomes the box [x, y, x + w, y + h]; the prompt id is the annotation
    id and the category id is carried to the output mask. Crowd annotations are left out unless
    ``include_crowd``.
    """
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise PromptSourceError(f"prompts.coco {uri!r}: no such file") from None
    try:
        doc = json.loads(data)
        images = {im["id"]: im["file_name"] for im in doc["images"]}
        annotations = doc["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PromptSourceError(f"prompts.coco {uri!r}: not a COCO annotations file ({type(e).__name__}: {e})") from None
    index = PromptIndex(sha256=hashlib.sha256(data).hexdigest())
    for ann in annotations:
        index.rows += 1
        if not include_crowd and ann.get("iscrowd"):
            continue
        name = images.get(ann.get("image_id"))
        if name is None:
            index.rows_without_key += 1
            continue
        row: dict = {"prompt_id": ann.get("id"), "category_id": ann.get("category_id")}
        try:
            x, y, w, h = _number_list(ann.get("bbox"), 4, "bbox [x, y, w, h]")
            row["box"] = [x, y, x + w, y + h]
        except ValueError as e:
            row["box"] = None
            p = make_prompt(row, kind="box")
            p["error"] = f"bad_prompt: {e}"
        else:
            p = make_prompt(row, kind="box")
        if p["error"]:
            index.bad_rows["bad_prompt"] += 1
        index.by_key.setdefault(str(name), []).append(p)
    return index


def global_prompts(boxes: list, points: list | None, labels: list | None, texts: list[str]) -> list[dict]:
    """The manifest's prompts for every image: each box, the points as one point prompt, each text."""
    out = [make_prompt({"box": b}, kind="box") for b in boxes]
    if points:
        out.append(make_prompt({"points": points, "labels": labels}, kind="points"))
    out += [make_prompt({"text": t}, kind="text") for t in texts]
    return out

"""Plan stage: list the inputs under ``input.uri`` into work items with stable ids.

``image_id`` is the object's key relative to the listed folder/prefix (or to the part of a glob
before its first wildcard), so the same input always gets the same id, on any machine.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from .decode import looks_like_image
from .storage import Storage, protocol_of, strip_protocol, to_uri

GLOB_CHARS = set("*?[")


@dataclass
class Plan:
    items: list[dict] = field(default_factory=list)  # image_id, uri, size, etag
    skipped: list[str] = field(default_factory=list)  # keys skipped as not images, by extension


def _glob_base(path: str) -> str:
    parts = path.split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return "/".join(parts[:i])
    return posixpath.dirname(path)


def list_inputs(uri: str, storage: Storage, skip_non_images: bool = True) -> Plan:
    protocol = protocol_of(uri)
    fs = storage.fs(uri)
    path = strip_protocol(uri)
    if protocol == "file":
        path = path if path.startswith("/") else posixpath.abspath(path)
    if GLOB_CHARS & set(path):
        base = _glob_base(path)
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
    elif path.endswith("/") or fs.isdir(path):
        base = path.rstrip("/")
        found = fs.find(path.rstrip("/"), detail=True)
    elif fs.isfile(path):
        base = posixpath.dirname(path)
        found = {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"input.uri {uri!r}: no such file, folder or prefix")
    plan = Plan()
    for p in sorted(found):
        info = found[p]
        rel = posixpath.relpath(p, base) if base else p
        if rel.startswith("../") or rel == ".":
            rel = p
        if skip_non_images and not looks_like_image(rel):
            plan.skipped.append(rel)
            continue
        # What changes when the object does: S3's ETag; for local files the modification time.
        etag = info.get("ETag") or info.get("etag") or (f"mtime:{info['mtime']}" if info.get("mtime") else "")
        plan.items.append(
            {
                "image_id": rel,
                "uri": to_uri(protocol, p),
                "size": int(info.get("size") or 0),
                "etag": str(etag).strip('"'),
            }
        )
    return plan

"""Job manifest: YAML, validated completely before any work starts.

Every section forbids unknown keys; every error names the field (``model.conf``) and what is
wrong with it. See the README's manifest reference for the meaning of each field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .decode import DEFAULT_MAX_PIXELS
MAX_WRITERS = 256  # output.writers


class ManifestError(ValueError):
    """A manifest that cannot be run; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class InputConfig(_Strict):
    uri: str = Field(min_length=1, description="folder, prefix (recursive), glob or single file; local or s3://")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="images with more pixels are refused before decode")
    skip_non_images: bool = Field(default=True, description="skip keys whose extension is not an image format (counted)")
    decode: Literal["auto", "reduced", "exact", "device"] = Field(
        default="auto", description="reduced: JPEGs much larger than the model input decoded at 1/2-1/8 size by "
        "DCT scaling (masks still at full size); exact: always full size, as ultralytics; device: JPEGs decoded "
        "in batches on the model's device (torchvision decode_jpeg: nvJPEG on GPUs), letterboxed there, other "
        "files as exact; auto: device when the model runs on GPUs and torchvision can (else reduced), exact on "
        "the CPU")
    format: Literal["files", "list", "s3_inventory", "tar", "parquet_images"] = Field(
        default="files", description="what input.uri holds: files (images as objects: folder, prefix, glob or one "
        "file); list (Parquet/CSV/JSONL files of image URIs); s3_inventory (an S3 Inventory manifest.json); tar "
        "(tar shards of images, WebDataset / SA-1B); parquet_images (Parquet files with image bytes)")
    uri_column: str = Field(default="uri", min_length=1, description="list: the column of image URIs")
    id_column: str | None = Field(default=None, min_length=1, description="list: the column of image ids (default: "
                                  "image_id when present, else the URI); parquet_images: a column naming each image "
                                  "within its file (default: the row number)")
    image_column: str = Field(default="image", min_length=1, description="parquet_images: the column of image bytes "
                              "(binary, or a Hugging Face Image struct of bytes and path)")
    list_format: Literal["parquet", "csv", "jsonl"] | None = Field(default=None, description="list: default from "
                                                                   "each file's extension")
    carry: list[str] | None = Field(default=None, description="list and parquet_images: the columns carried into "
                                    "the output (default: every other column of a list; none of a Parquet of images)")
    list_workers: int = Field(default=16, ge=1, le=256, description="files, tar, parquet_images on S3: LIST requests in "
                              "flight at once (sub-prefixes and key ranges listed in parallel); 1: one page after another")

    @model_validator(mode="after")
    def _fields_of_format(self) -> "InputConfig":
        only = {"uri_column": ("list",), "list_format": ("list",), "id_column": ("list", "parquet_images"),
                "image_column": ("parquet_images",), "carry": ("list", "parquet_images"),
                "list_workers": ("files", "tar", "parquet_images")}
        for name, formats in only.items():
            if name in self.model_fields_set and self.format not in formats:
                raise ValueError(f"input.{name} applies to input.format {' / '.join(formats)}, not {self.format!r}")
        return self


class ModelConfig(_Strict):
    checkpoint: str = Field(min_length=1, description="FastSAM / YOLOv8-seg .pt checkpoint, local path or s3:// URI")
    imgsz: int = Field(default=1024, ge=32, le=8192)
    conf: float = Field(default=0.4, ge=0.0, le=1.0)
    iou: float = Field(default=0.9, ge=0.0, le=1.0)
    max_det: int = Field(default=300, ge=1, le=10000)
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    half: bool = Field(default=False, description="fp16 inference (CUDA only)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


class PromptsConfig(_Strict):
    mode: Literal["everything", "prompts"] | None = Field(
        default=None, description="everything: all masks; prompts: masks selected by prompts. Default: prompts when any are given")
    table: str | None = Field(default=None, min_length=1, description="prompt table (Parquet, JSONL or CSV), one row per prompt")
    table_format: Literal["parquet", "jsonl", "csv"] | None = Field(default=None, description="default: from the extension")
    key: Literal["image_id", "uri"] = Field(default="image_id", description="the table column naming each prompt's image")
    coco: str | None = Field(default=None, min_length=1, description="COCO annotations JSON: its boxes become box prompts")
    coco_include_crowd: bool = False
    boxes: list[list[float]] = Field(default_factory=list, description="global box prompts [x1, y1, x2, y2] for every image")
    points: list[list[float]] = Field(default_factory=list, description="global points [x, y]: one point prompt for every image")
    point_labels: list[int] | None = Field(default=None, description="1 foreground, 0 background, one per point; default all 1")
    texts: list[str] = Field(default_factory=list, description="global text prompts for every image")
    merge_points: bool = Field(default=False, description="merge the masks a point prompt selects into one mask")
    keep_everything: bool = Field(default=False, description="also keep every mask (prompt fields null) after the prompted ones")
    clip: str | None = Field(default=None, min_length=1, description="open_clip model folder (local or s3://), needed for texts")
    text_min_area: int = Field(default=100, ge=0, description="masks with this many pixels or fewer are not scored for texts")

    @field_validator("boxes")
    @classmethod
    def _boxes(cls, v: list[list[float]]) -> list[list[float]]:
        for i, b in enumerate(v):
            if len(b) != 4:
                raise ValueError(f"box {i} must be [x1, y1, x2, y2], got {len(b)} numbers")
        return v

    @field_validator("points")
    @classmethod
    def _points(cls, v: list[list[float]]) -> list[list[float]]:
        for i, p in enumerate(v):
            if len(p) != 2:
                raise ValueError(f"point {i} must be [x, y], got {len(p)} numbers")
        return v

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("texts must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PromptsConfig":
        if self.table and self.coco:
            raise ValueError("give either prompts.table or prompts.coco, not both")
        if self.point_labels is not None:
            if len(self.point_labels) != len(self.points):
                raise ValueError(f"prompts.point_labels has {len(self.point_labels)} labels for {len(self.points)} points")
            if any(x not in (0, 1) for x in self.point_labels):
                raise ValueError("prompts.point_labels must be 1 (foreground) or 0 (background)")
        if self.texts and not self.clip:
            raise ValueError("prompts.clip is required for text prompts (prompts.texts)")
        if self.mode == "everything" and self.has_sources:
            raise ValueError("prompts.mode is 'everything' but prompts are given (table, coco, boxes, points or texts)")
        if self.mode == "prompts" and not self.has_sources:
            raise ValueError("prompts.mode is 'prompts' but no prompts are given (table, coco, boxes, points or texts)")
        return self

    @property
    def has_sources(self) -> bool:
        return bool(self.table or self.coco or self.boxes or self.points or self.texts)

    @property
    def prompted(self) -> bool:
        return self.has_sources


class MaskRulesConfig(_Strict):
    """Global mask rules; see fastsam_batch/mask_rules.py and the README for their exact semantics."""

    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    min_stability: float | None = Field(default=None, ge=0.0, le=1.0, description="drop masks whose stability "
                                        "score (SAM's, logits > +1 over > -1 in the box) is below it (SAM: 0.95)")
    min_area: int | None = Field(default=None, ge=0, description="pixels")
    max_area: int | None = Field(default=None, ge=0, description="pixels")
    min_area_fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="of the image's pixels")
    max_area_fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="of the image's pixels")
    drop_full_image: bool = Field(default=False, description="drop the masks FastSAM treats as the whole image")
    max_overlap: float | None = Field(default=None, ge=0.0, lt=1.0, description="drop a mask whose IoU with a "
                                      "higher-scored kept mask is above it (duplicates; e.g. 0.9)")
    containment: float | None = Field(default=None, gt=0.0, le=1.0, description="drop masks this much inside a larger one (FastSAM: 0.8)")
    top_k: int | None = Field(default=None, ge=1)
    top_k_by: Literal["score", "area"] = "score"
    clean_up_kernel: int | None = Field(default=None, ge=2, le=101, description="opening + closing with this kernel (px)")

    @model_validator(mode="after")
    def _bounds(self) -> "MaskRulesConfig":
        if self.min_area is not None and self.max_area is not None and self.min_area > self.max_area:
            raise ValueError(f"mask_rules.min_area ({self.min_area}) is above mask_rules.max_area ({self.max_area})")
        if (self.min_area_fraction is not None and self.max_area_fraction is not None
                and self.min_area_fraction > self.max_area_fraction):
            raise ValueError("mask_rules.min_area_fraction is above mask_rules.max_area_fraction")
        return self


class OutputConfig(_Strict):
    uri: str = Field(min_length=1, description="folder or prefix for the Parquet dataset")
    target_file_mb: float = Field(default=128, gt=0, description="Parquet files are cut at about this size, in MiB, "
                                  "never above it (a single larger row is a file of its own). Reached only when the "
                                  "writer receives that much within commit_interval_s (128 MiB in 10 s: about "
                                  "440-640 images/s in all); below that the interval cuts the files (raise "
                                  "commit_interval_s for bigger ones, losing more to a kill). 128: with ~100-mask "
                                  "photos (~20-40 KB a row) ~3,000-6,000 images a full file, ~170,000-350,000 files "
                                  "for a billion images. The driver holds the rows waiting (Arrow, ~1.5-3x their "
                                  "Parquet size with zstd; a cut is forced above 4x this) and the file's bytes: a few "
                                  "times this at its peak (about 6x at most). A repair or retry rewrites whole files: "
                                  "a smaller target suits outputs often repaired or retried")
    rows_per_file: int | None = Field(default=None, ge=1, description="most images per Parquet file; default: no "
                                      "cap (files are cut by target_file_mb and commit_interval_s)")
    commit_interval_s: float = Field(default=10.0, gt=0, description="rows waiting this long are committed in a "
                                     "file of their own, even if smaller than target_file_mb: a kill or Ctrl-C loses "
                                     "about this much work (plus blocks on their way to the writer); at low "
                                     "throughput it, not the size, cuts the files")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    writers: int | Literal["auto"] = Field(default="auto", description="writer actors that encode and stage the "
                                           "output files (the driver only publishes them): a number from 1 to 256, "
                                           "or auto: one per 4 GPUs of the cluster plus one, at most 16; a local "
                                           "output at most half the driver node's cores (sizing.plan_writers)")

    @field_validator("writers", mode="before")
    @classmethod
    def _writers(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WRITERS):
            return v
        raise ValueError(f"must be 'auto' or a whole number from 1 to {MAX_WRITERS}, not {v!r}")


class RuntimeConfig(_Strict):
    batch_size: int | None = Field(default=None, ge=1, description="images per model forward; default: 16 with the "
                                   "model on GPUs, 4 on the CPU (sizing.py)")
    num_actors: int | None = Field(default=None, ge=1, description="segmentation actors (model replicas); default: on GPUs up to 4 per GPU as its memory and the CPUs allow, on CPU one per core within memory (sizing.py)")
    gpus_per_actor: float | None = Field(default=None, ge=0, description="GPUs per actor (1: one actor per GPU, 0.5: two); default: with CUDA 1/k for k actors per GPU (up to 4, one per 10 GiB of its memory, within the CPUs; sizing.py), else 0")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads per actor; default: on CPU the node's cores / num_actors, on GPU cpus_per_actor")
    decode_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per read/decode worker")
    decode_workers: int | None = Field(default=None, ge=1, description="most read/decode workers; default: on CPU 2 per actor, on GPUs every CPU the actors leave, at least 2 per GPU (sizing.py)")
    in_flight_mb: int | None = Field(default=None, ge=16, description="cap on Ray's object store use by the run (decoded images queued ahead of the model), in MiB; default 64 per actor on CPU, 1024 per GPU on GPUs")
    plan_part_rows: int = Field(default=1000, ge=1, description="planned images per plan part (above one part, parts go to files under output.uri/_plan/)")
    max_error_fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="fail the run above this share of error rows")
    ray_address: str | None = Field(default=None, description="join this cluster; default RAY_ADDRESS, else an embedded local Ray")
    image_timeout_s: float | None = Field(default=600.0, gt=0, description="most time to decode one image, or to segment one (a batch: this times its images); over it the image is a `timeout` error row (watchdog.py); null: no limit")
    lease_stale_s: float = Field(default=120.0, gt=0, description="a lease on output.uri without a heartbeat for this long is taken over by the next run")
    lease_heartbeat_s: float = Field(default=15.0, gt=0, description="how often a run renews its lease on output.uri")
    metrics_export_port: int | None = Field(default=None, ge=1, le=65535, description="an embedded local Ray "
                                            "exports its metrics (and this run's, metrics.py) for Prometheus on this "
                                            "port; a joined cluster exports them as it is set up to")
    progress_interval_s: float = Field(default=30.0, gt=0, description="without a terminal, a progress line this "
                                       "often (on a terminal a live line is redrawn instead)")
    index_save_interval_s: float | None = Field(default=600.0, gt=0, description="during a run, the files it "
                                                "published are read back and saved in the committed index under "
                                                "output.uri/_index/ this often (sooner past 2^21 rows), so that a run "
                                                "killed has its next start read only the files since; null: the index "
                                                "is saved at a run's end only")

    @model_validator(mode="after")
    def _heartbeat_within_stale(self) -> "RuntimeConfig":
        if self.lease_heartbeat_s * 2 > self.lease_stale_s:
            raise ValueError(f"runtime.lease_heartbeat_s ({self.lease_heartbeat_s:g}) must be at most half of "
                             f"runtime.lease_stale_s ({self.lease_stale_s:g})")
        return self


class Manifest(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    input: InputConfig
    model: ModelConfig
    prompts: PromptsConfig = PromptsConfig()
    mask_rules: MaskRulesConfig = MaskRulesConfig()
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec/s3fs options, e.g. endpoint_url, anon")

    def decode_mode(self, clip_texts: bool, accelerators: bool, device_decode: bool) -> str:
        """How images are decoded: ``exact``, ``reduced`` or ``device`` (``input.decode``; ``auto``: on
        accelerators, where decoding must keep up with them, ``device`` when torchvision decodes JPEGs
        on CUDA (``device_decode``), else ``reduced``; ``exact`` on the CPU). Always ``exact`` with CLIP
        text prompts, whose crops need the full image on the host."""
        mode = self.input.decode
        if clip_texts:
            return "exact"
        if mode == "auto":
            return ("device" if device_decode else "reduced") if accelerators else "exact"
        return mode

    @model_validator(mode="after")
    def _distinct_io(self) -> "Manifest":
        if self.input.uri.rstrip("/") == self.output.uri.rstrip("/"):
            raise ValueError("output.uri must differ from input.uri")
        if self.input.format in ("tar", "parquet_images") and (self.prompts.table or self.prompts.coco):
            raise ValueError(f"prompts.{'table' if self.prompts.table else 'coco'}: per-image prompts are joined to "
                             "images listed one by one; with input.format "
                             f"{self.input.format} only prompts for every image (boxes, points, texts) are supported")
        if output_inside_input(self.input.uri, self.output.uri):
            raise ValueError(f"output.uri {self.output.uri!r} is inside input.uri {self.input.uri!r}: the next run "
                             "would list its own output as input; choose an output outside the input")
        return self


# Files a run writes under output.uri, one of each kind (see write.py, summary, plan, lease).
_OUTPUT_SAMPLES = ("part-0.parquet", "_run.json", "_runs/0.json", "_manifest.json", "_lease.json",
                   "_plan/0/part-0.parquet", "_units/0.json", "_index/0.json", "_index/0.rows")


def output_inside_input(input_uri: str, output_uri: str) -> bool:
    """Whether listing ``input_uri`` could list files the run writes under ``output_uri`` (a folder or
    prefix containing it; a glob only when its pattern matches such files)."""
    input_uri, output_uri = _real_local(input_uri), _real_local(output_uri)
    out = output_uri.rstrip("/")
    if any(c in input_uri for c in "*?["):
        import re

        from fsspec.utils import glob_translate

        pattern = re.compile(glob_translate(input_uri.split("://", 1)[-1]))
        return any(pattern.match(f"{out.split('://', 1)[-1]}/{name}") for name in _OUTPUT_SAMPLES)
    base = input_uri.rstrip("/")
    return out.startswith(base + "/")


def _real_local(uri: str) -> str:
    """A local path as the filesystem sees it (``..``, ``.`` and symlinks resolved, as far as they
    exist; a glob up to its first wildcard); other URIs as they are."""
    import os

    if "://" in uri and not uri.startswith("file://"):
        return uri
    path = uri.split("://", 1)[-1]
    parts = path.split("/")
    wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    base = "/".join(parts[:wild]) or ("/" if path.startswith("/") else ".")
    real = os.path.realpath(base)
    rest = "/".join(parts[wild:])
    return real + ("/" + rest if rest else "/" if path.endswith("/") else "")


def manifest_json_schema() -> dict:
    """The manifest's JSON Schema (from the pydantic models), for editors: with
    ``# yaml-language-server: $schema=<file>`` on a job file's first line they complete and check it."""
    schema = Manifest.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "fastsam-batch job manifest"}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(manifest)"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if "input" in e and kind not in ("value_error",) and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "invalid manifest:\n" + "\n".join(lines)


def parse_manifest(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError("invalid manifest: the top level must be a mapping of keys (name, input, model, ...)")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_format_errors(e)) from None


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"manifest {p} is not valid YAML: {e}") from None
    m = parse_manifest(data)
    _refuse_output_in_a_copy(m.output.uri, p.parent)
    m = _resolve_relative_paths(m, p.parent)
    if output_inside_input(m.input.uri, m.output.uri):  # relative paths, resolved
        raise ManifestError(f"invalid manifest:\n  output.uri: {m.output.uri!r} is inside input.uri {m.input.uri!r}: "
                            "the next run would list its own output as input; choose an output outside the input")
    return m


# Where Ray unpacks a job's --working-dir (a runtime env): a temporary copy, removed with the session.
RAY_WORKING_DIR_COPY = "/runtime_resources/working_dir_files/"


def _refuse_output_in_a_copy(output_uri: str, base: Path) -> None:
    """A relative output.uri in a manifest that Ray runs from its temporary copy of ``ray job submit
    --working-dir``: the output would be written into that copy and lost with it."""
    if "://" in output_uri or output_uri.startswith("/"):
        return
    folder = str(base.resolve()) + "/"
    if RAY_WORKING_DIR_COPY in folder:
        raise ManifestError(
            f"output.uri {output_uri!r} is relative to the manifest, which this job reads from Ray's temporary copy "
            f"of --working-dir ({folder.rstrip('/')}): the output would be written into that copy and lost with it; "
            "give output.uri as an absolute path or s3:// URI, or submit without --working-dir, naming the manifest "
            "by its path on the head (cluster/README.md, step 5)")


def _resolve_relative_paths(m: Manifest, base: Path) -> Manifest:
    """Relative local paths in a manifest are relative to the manifest file's folder."""

    def fix(uri: str) -> str:
        if "://" in uri or uri.startswith("/"):
            return uri
        return str((base / uri).resolve()) + ("/" if uri.endswith("/") else "")

    def fix_opt(uri: str | None) -> str | None:
        return None if uri is None else fix(uri)

    p = m.prompts
    return m.model_copy(
        update={
            "input": m.input.model_copy(update={"uri": fix(m.input.uri)}),
            "model": m.model.model_copy(update={"checkpoint": fix(m.model.checkpoint)}),
            "output": m.output.model_copy(update={"uri": fix(m.output.uri)}),
            "prompts": p.model_copy(update={"table": fix_opt(p.table), "coco": fix_opt(p.coco), "clip": fix_opt(p.clip)}),
        }
    )

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


class ManifestError(ValueError):
    """A manifest that cannot be run; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class InputConfig(_Strict):
    uri: str = Field(min_length=1, description="folder, prefix (recursive), glob or single file; local or s3://")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="images with more pixels are refused before decode")
    skip_non_images: bool = Field(default=True, description="skip keys whose extension is not an image format (counted)")


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
    mode: Literal["everything"] = "everything"


class OutputConfig(_Strict):
    uri: str = Field(min_length=1, description="folder or prefix for the Parquet dataset")
    rows_per_file: int = Field(default=1000, ge=1, description="images per Parquet file")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class RuntimeConfig(_Strict):
    batch_size: int = Field(default=4, ge=1, description="images per model forward")
    num_actors: int = Field(default=1, ge=1, description="segmentation actors (model replicas)")
    gpus_per_actor: float | None = Field(default=None, ge=0, description="default: 1 when CUDA is used, else 0")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    decode_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per read/decode task")
    max_error_fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="fail the run above this share of error rows")
    ray_address: str | None = Field(default=None, description="join this cluster; default RAY_ADDRESS, else an embedded local Ray")


class Manifest(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    input: InputConfig
    model: ModelConfig
    prompts: PromptsConfig = PromptsConfig()
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec/s3fs options, e.g. endpoint_url, anon")

    @model_validator(mode="after")
    def _distinct_io(self) -> "Manifest":
        if self.input.uri.rstrip("/") == self.output.uri.rstrip("/"):
            raise ValueError("output.uri must differ from input.uri")
        return self


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
    return _resolve_relative_paths(m, p.parent)


def _resolve_relative_paths(m: Manifest, base: Path) -> Manifest:
    """Relative local paths in a manifest are relative to the manifest file's folder."""

    def fix(uri: str) -> str:
        if "://" in uri or uri.startswith("/"):
            return uri
        return str((base / uri).resolve()) + ("/" if uri.endswith("/") else "")

    return m.model_copy(
        update={
            "input": m.input.model_copy(update={"uri": fix(m.input.uri)}),
            "model": m.model.model_copy(update={"checkpoint": fix(m.model.checkpoint)}),
            "output": m.output.model_copy(update={"uri": fix(m.output.uri)}),
        }
    )

"""The output contract: one Parquet row per input image. Documented in the README."""

from __future__ import annotations

import pyarrow as pa

MASK_TYPE = pa.struct(
    [
        pa.field("counts", pa.string(), nullable=False),  # COCO compressed RLE, size [height, width]
        pa.field("bbox", pa.list_(pa.float64(), 4), nullable=False),  # [x, y, w, h], COCO convention
        pa.field("area", pa.int64(), nullable=False),  # pixels in the mask
        pa.field("score", pa.float32(), nullable=False),  # detection confidence (the largest, for merged masks)
        # SAM's stability score: #(logit > 1) / #(logit > -1) inside the box (the lowest, for merged masks)
        pa.field("stability_score", pa.float32(), nullable=False),
        # The prompt that selected the mask; all null for everything-mode masks.
        pa.field("prompt_index", pa.int32()),  # position in the image's `prompts` list
        pa.field("prompt_kind", pa.string()),  # "box" | "points" | "text"
        pa.field("prompt_id", pa.string()),  # the id carried from the prompt table / COCO annotation id
        pa.field("category_id", pa.int64()),  # COCO category of the annotation, when given
        pa.field("prompt_score", pa.float32()),  # box: IoU of mask and box; text: CLIP similarity; points: null
    ]
)

PROMPT_TYPE = pa.struct(
    [
        pa.field("index", pa.int32(), nullable=False),
        pa.field("kind", pa.string()),  # null when the row could not tell
        pa.field("id", pa.string()),
        pa.field("category_id", pa.int64()),
        pa.field("text", pa.string()),  # a text prompt's text (manifest or table); null for other kinds
        pa.field("box", pa.list_(pa.float64())),  # a box prompt's [x1, y1, x2, y2]; null for other kinds
        pa.field("points", pa.list_(pa.list_(pa.float64()))),  # a points prompt's [[x, y], ...]
        pa.field("labels", pa.list_(pa.int32())),  # its labels, 1 foreground / 0 background
        pa.field("num_masks", pa.int32(), nullable=False),  # masks this prompt added to `masks`
        pa.field("error", pa.string()),  # "<reason>: <detail>", null when the prompt selected its mask(s)
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),  # tar member: tar://<member>::<shard>; Parquet row: <file>#row=<n>
        pa.field("shard", pa.string()),  # the tar shard or Parquet file holding the image; null for an object of its own
        pa.field("source_version", pa.string()),  # "<S3 ETag or local mtime>/<size>" of the object read
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # "<reason>: <detail>", null when ok
        pa.field("masks", pa.list_(MASK_TYPE), nullable=False),
        pa.field("num_masks", pa.int32(), nullable=False),
        pa.field("num_duplicates", pa.int32()),  # masks dropped by mask_rules.max_overlap; null when off, error, or never segmented (prompted, no prompt)
        pa.field("prompts", pa.list_(PROMPT_TYPE), nullable=False),  # every prompt of the image, with its outcome
        pa.field("num_prompt_errors", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # checkpoint file name
        pa.field("checkpoint_sha256", pa.string(), nullable=False),
        pa.field("run_fingerprint", pa.string(), nullable=False),  # hash of checkpoint, settings, rules, version
        # Stage timings of this image, in milliseconds (null where the stage did not run).
        pa.field("read_retries", pa.int32()),  # reads of this image retried after transient storage errors
        pa.field("read_ms", pa.float32()),
        pa.field("decode_ms", pa.float32()),
        pa.field("model_ms", pa.float32()),  # its share of its batch's letterbox + forward + NMS
        pa.field("masks_ms", pa.float32()),  # mask pixels inside boxes + run lengths
        pa.field("select_ms", pa.float32()),  # mask rules, prompt selection (CLIP included), clean-up
        pa.field("encode_ms", pa.float32()),  # RLE compression, area, bbox
        pa.field("segmented_at", pa.timestamp("ms", tz="UTC")),  # when its batch left the model actor
    ]
)


# The per-image stage timings of OUTPUT_SCHEMA (stats, metrics).
STAGE_COLUMNS = ("read_ms", "decode_ms", "model_ms", "masks_ms", "select_ms", "encode_ms")

# The reasons of error rows (the part of ``error`` before the first colon): decode.py, read.py,
# segment.py, the watchdog. Documented in the README's output schema.
ERROR_REASONS = ("empty_file", "not_an_image", "corrupt_image", "truncated_image", "too_many_pixels", "read_failed",
                 "segment_failed", "timeout")


def error_reason(error: str | None) -> str | None:
    """The short category of an error string (the part before the first colon)."""
    if error is None:
        return None
    return error.split(":", 1)[0].strip()


# Columns a row carries through the pipeline to the writer, never written (see write.Committer).
UNIT_END = "_unit_end"  # >= 0 on a container's end-of-unit row: the rows it gave this run
UNIT_SKIPPED = "_unit_skipped"  # on that row: members that were not images
INTERNAL_COLUMNS = (UNIT_END, UNIT_SKIPPED)


def output_schema(carried: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """OUTPUT_SCHEMA and the columns carried from the input (lists, Parquet of images), as text."""
    return pa.schema([*OUTPUT_SCHEMA, *(pa.field(c, pa.string()) for c in carried)])

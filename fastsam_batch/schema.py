"""The output contract: one Parquet row per input image. Documented in the README."""

from __future__ import annotations

import pyarrow as pa

MASK_TYPE = pa.struct(
    [
        pa.field("counts", pa.string(), nullable=False),  # COCO compressed RLE, size [height, width]
        pa.field("bbox", pa.list_(pa.float64(), 4), nullable=False),  # [x, y, w, h], COCO convention
        pa.field("area", pa.int64(), nullable=False),  # pixels in the mask
        pa.field("score", pa.float32(), nullable=False),  # detection confidence
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # "<reason>: <detail>", null when ok
        pa.field("masks", pa.list_(MASK_TYPE), nullable=False),
        pa.field("num_masks", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # checkpoint file name
        pa.field("checkpoint_sha256", pa.string(), nullable=False),
        pa.field("run_fingerprint", pa.string(), nullable=False),  # hash of checkpoint, settings, rules, version
        # Stage timings of this image, in milliseconds (null where the stage did not run).
        pa.field("read_ms", pa.float32()),
        pa.field("decode_ms", pa.float32()),
        pa.field("model_ms", pa.float32()),  # its share of its batch's letterbox + forward + NMS
        pa.field("masks_ms", pa.float32()),  # mask pixels inside boxes + run lengths
        pa.field("encode_ms", pa.float32()),  # RLE compression, area, bbox
        pa.field("segmented_at", pa.timestamp("ms", tz="UTC")),  # when its batch left the model actor
    ]
)


def error_reason(error: str | None) -> str | None:
    """The short category of an error string (the part before the first colon)."""
    if error is None:
        return None
    return error.split(":", 1)[0].strip()

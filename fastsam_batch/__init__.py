"""fastsam-batch: offline FastSAM segmentation of image collections on Ray, to COCO RLE in Parquet."""

__version__ = "0.2.0"

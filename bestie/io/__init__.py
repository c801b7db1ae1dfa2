"""bestie.io: how stage artifacts are written and read (atomic files, HDF5 stores, COCO JSON, palette PNGs)."""

from bestie.io.atomic import atomic_path, atomic_write, write_json_atomic
from bestie.io.coco_json import (
    category_ids,
    decode_rle,
    encode_mask,
    encode_masks,
    instances_to_coco_results,
    make_annotation,
    mask_to_bbox,
    write_coco_dataset,
    write_coco_results,
)
from bestie.io.h5store import H5Reader, H5Writer
from bestie.io.palette import png_name, voc_palette, write_palette_png

__all__ = [
    "atomic_write",
    "atomic_path",
    "write_json_atomic",
    "H5Writer",
    "H5Reader",
    "encode_mask",
    "encode_masks",
    "decode_rle",
    "mask_to_bbox",
    "instances_to_coco_results",
    "make_annotation",
    "write_coco_dataset",
    "write_coco_results",
    "category_ids",
    "voc_palette",
    "write_palette_png",
    "png_name",
]

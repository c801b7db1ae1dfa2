"""bestie.io: how stage artifacts are written and read (atomic files, HDF5 stores, COCO JSON, palette PNGs).

The package re-exports the whole COCO JSON API (the ``__all__`` of :mod:`bestie.io.coco_json`, so that a
function added there needs no second list here) and the main names of the other modules.
"""

from bestie.io import coco_json
from bestie.io.atomic import atomic_path, atomic_write, write_json_atomic
from bestie.io.coco_json import *  # noqa: F401,F403 (its __all__, listed once there)
from bestie.io.h5store import H5Reader, H5Writer
from bestie.io.palette import png_name, voc_palette, write_palette_png

__all__ = [
    "atomic_write",
    "atomic_path",
    "write_json_atomic",
    "H5Writer",
    "H5Reader",
    *coco_json.__all__,
    "voc_palette",
    "write_palette_png",
    "png_name",
]

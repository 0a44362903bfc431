"""A cache of decoded training images: each cropped to its box, shrunk, and kept as uint8 pixels (``loader.cache``).

Decoding a JPEG and shrinking it is most of what a DataLoader process does per image; for a dataset
that fits on disk (or in the page cache) as small uint8 arrays, doing it once instead of every epoch
frees the CPUs for augmentation. The driver builds the cache before any worker starts, in parallel
with Ray Data tasks, like ``check_images``; the workers read it through ``np.memmap`` (the OS shares
the pages between every DataLoader process of a node), and the augmentation starts from the cached
image as it would from the decoded one.

What a cached image is: the RGB image of the row (cropped to its bbox), resized so that its shorter
side is ``loader.cache_size`` pixels (never enlarged; the aspect ratio kept). Augmentations that crop a
small part of the image and enlarge it see fewer pixels than in the original: choose ``cache_size``
above the training ``im_size`` when they do. Validation always decodes the files (its metrics stay
those of ``jobs/validate.py``).

Layout of ``<loader.cache_dir or <ray.storage_path>/.image_cache>/<key>/``: ``pixels.u8`` (every image's
pixels, one after another), ``index.npz`` (``offset``, ``height``, ``width`` per row; height 0 marks an
unreadable image) and ``meta.json`` (sizes, unreadable rows' errors; written last: a folder without it
is incomplete and is rebuilt). The key hashes the rows' paths, boxes and the size: another dataset or
size gets another folder; a file changed in place under the same path is not noticed (delete the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import numpy as np
import pandas as pd
from PIL import Image

from raymetric.data.check_images import record_box, row_blocks
from raymetric.data.csv import BBOX_COLUMNS
from raymetric.data.dataset import ImageReadError, read_image

PIXELS_FILE = "pixels.u8"
INDEX_FILE = "index.npz"
META_FILE = "meta.json"


def shrink(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized so that its shorter side is ``size`` (never enlarged), aspect ratio kept.

    >>> shrink(Image.new("RGB", (300, 200)), 100).size, shrink(Image.new("RGB", (50, 40)), 100).size
    ((150, 100), (50, 40))
    """
    width, height = image.size
    short = min(width, height)
    if short <= size:
        return image
    scale = size / short
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)


def cache_key(frame: pd.DataFrame, size: int) -> str:
    """A hash of the rows' paths and boxes, in order, and the size (the cache folder's name)."""
    digest = hashlib.sha1(f"raymetric-image-cache-v1 size={size}\n".encode())
    digest.update("\n".join(frame["path"].astype(str)).encode())
    for column in BBOX_COLUMNS:
        if column in frame:
            digest.update(column.encode() + np.asarray(frame[column].astype("float64").fillna(-1)).tobytes())
    return digest.hexdigest()[:20]


def _shrink_rows(rows: pd.DataFrame, size: int) -> pd.DataFrame:
    """Ray Data task: ``pos``, ``height``, ``width``, ``pixels`` (bytes) or ``error`` for each row."""
    has_bbox = all(c in rows.columns for c in BBOX_COLUMNS)
    out = []
    for record in rows.to_dict("records"):
        try:
            image = shrink(read_image(record["path"], record_box(record, has_bbox)), size)
        except ImageReadError as err:
            out.append({"pos": record["pos"], "height": 0, "width": 0, "pixels": b"", "error": str(err)})
            continue
        pixels = np.asarray(image, dtype=np.uint8)
        out.append({"pos": record["pos"], "height": pixels.shape[0], "width": pixels.shape[1],
                    "pixels": pixels.tobytes(), "error": ""})
    return pd.DataFrame(out, columns=["pos", "height", "width", "pixels", "error"])


def build_image_cache(frame: pd.DataFrame, size: int, root: str, *, rows_per_task: int = 256) -> str:
    """The cache folder of ``frame``'s images at ``size``, built with Ray Data tasks unless it exists.

    Args:
        frame: rows with ``path`` (absolute) and optionally the bbox columns; row ``i`` of the cache is
            row ``i`` of the frame.
        size: the shorter side of a cached image.
        root: the folder that holds cache folders.

    Returns:
        The cache folder (``<root>/<key>``).
    """
    target = os.path.join(os.path.abspath(root), cache_key(frame, size))
    if os.path.isfile(os.path.join(target, META_FILE)):
        return target
    os.makedirs(root, exist_ok=True)
    building = f"{target}.building-{uuid.uuid4().hex[:8]}"  # a crash leaves no folder that looks complete
    os.makedirs(building)
    n = len(frame)
    ds = row_blocks(frame, np.arange(n), "pos", rows_per_task)
    shrunk = ds.map_batches(_shrink_rows, fn_kwargs={"size": size}, batch_format="pandas", batch_size=None)
    offset = np.zeros(n, np.int64)
    height = np.zeros(n, np.int32)
    width = np.zeros(n, np.int32)
    errors: dict[str, str] = {}
    written = 0
    with open(os.path.join(building, PIXELS_FILE), "wb") as f:
        for batch in shrunk.iter_batches(batch_format="pandas", batch_size=None):  # streamed: bounded memory
            for record in batch.to_dict("records"):
                pos = int(record["pos"])
                if record["error"]:
                    errors[str(pos)] = record["error"]
                    continue
                offset[pos], height[pos], width[pos] = written, record["height"], record["width"]
                f.write(record["pixels"])
                written += len(record["pixels"])
    np.savez(os.path.join(building, INDEX_FILE), offset=offset, height=height, width=width)
    with open(os.path.join(building, META_FILE), "w") as f:
        json.dump({"size": size, "n_images": n, "bytes": written, "errors": errors}, f)
    try:
        os.replace(building, target)
    except OSError:  # another process (a parallel Tune trial) finished the same cache first
        shutil.rmtree(building, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, META_FILE)):
            raise
    return target


class ImageCache:
    """The cached images of a cache folder, read through a memory map opened lazily (once per process)."""

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, META_FILE)) as f:
            meta = json.load(f)
        self.size, self.errors = meta["size"], {int(k): v for k, v in meta["errors"].items()}
        index = np.load(os.path.join(folder, INDEX_FILE))
        self.offset, self.height, self.width = index["offset"], index["height"], index["width"]
        self._pixels = None

    def __len__(self) -> int:
        return len(self.offset)

    def __getstate__(self) -> dict:  # a DataLoader process opens its own map
        return {**self.__dict__, "_pixels": None}

    def image(self, pos: int) -> Image.Image:
        """The cached RGB image of row ``pos``; ImageReadError (the original message) for an unreadable one."""
        if self.height[pos] == 0:
            raise ImageReadError(self.errors.get(pos, f"cache {self.folder}: no image for row {pos}"))
        if self._pixels is None:
            self._pixels = np.memmap(os.path.join(self.folder, PIXELS_FILE), dtype=np.uint8, mode="r")
        h, w = int(self.height[pos]), int(self.width[pos])
        start = int(self.offset[pos])
        return Image.fromarray(np.array(self._pixels[start:start + h * w * 3]).reshape(h, w, 3))

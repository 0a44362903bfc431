"""Images of a dataset frame as a torch ``Dataset``.

Decoding is exact (Pillow, full resolution). An idea for later: JPEG draft mode (``Image.draft``) decodes
at 1/2, 1/4 or 1/8 scale for free when the transform shrinks the image anyway; it changes pixel values
slightly, so it needs a measured speed-up and a check on the metrics before it becomes an option.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from raymetric.data.csv import BBOX_COLUMNS

logger = logging.getLogger(__name__)
BAD_IMAGE_POLICIES = ("error", "skip")


class ImageReadError(RuntimeError):
    """An image could not be read or cropped; the message names the file (and the row, from a dataset).

    A policy that skips unreadable images can catch this one class.
    """


class BBoxError(ImageReadError):
    """A row's bbox does not fit inside its image."""


def check_box(bbox: Sequence[int], width: int, height: int, image: str, row: int | None = None
              ) -> tuple[int, int, int, int]:
    """``bbox`` ``(x_1, y_1, x_2, y_2)`` as ints, if it fits ``image`` of that size; else BBoxError.

    >>> check_box([1, 0, 3, 2], 6, 4, "its image")
    (1, 0, 3, 2)
    """
    x_1, y_1, x_2, y_2 = (int(v) for v in bbox)
    if not (0 <= x_1 < x_2 <= width and 0 <= y_1 < y_2 <= height):
        raise BBoxError(f"{'' if row is None else f'row {row}: '}bbox (x_1={x_1}, y_1={y_1}, x_2={x_2}, y_2={y_2}) "
                        f"does not fit in {image} of size {width}x{height} (width x height)")
    return x_1, y_1, x_2, y_2


def read_image(path: str | os.PathLike, bbox: Sequence[int] | None = None) -> Image.Image:
    """Reads an image as RGB, cropped to ``bbox`` if given.

    Args:
        path: The image file.
        bbox: ``(x_1, y_1, x_2, y_2)`` = left, top, right, bottom in pixels, right and bottom exclusive
            (Pillow's crop box).

    Returns:
        The RGB image. An alpha channel is dropped, not blended; EXIF orientation is not applied, so
        bboxes refer to the pixels as stored.

    Raises:
        BBoxError: The box reaches beyond the image.
        ImageReadError: The file is missing or cannot be decoded.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            if bbox is not None:
                # Pillow pads a crop beyond the image with black; that hides a wrong box, so refuse it.
                box = check_box(bbox, *image.size, f"image {path!r}")
                # Cropping before converting converts fewer pixels; the result is the same.
                image = image.crop(box)
            return image.convert("RGB")
    except ImageReadError:
        raise
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, ... for broken files.
        raise ImageReadError(f"cannot read image {path!r}: {type(error).__name__}: {error}") from error


class ImageDataset(torch.utils.data.Dataset):
    """The images of a dataset frame (from :func:`raymetric.data.csv.load_dataset_csv`).

    Each item is ``{"image": ..., "label": int, "index": i}``: the image is ``transform(rgb_image)``, or
    without a transform a uint8 tensor ``[3, H, W]``. Rows with a bbox are cropped to it first.

    The frame is stored as flat numpy arrays, not Python objects: DataLoader workers forked from the
    main process then share its memory instead of copying it page by page as reference counts change
    (pytorch#13246), and the dataset pickles small for spawned workers.

    Args:
        df: Rows with ``path`` and ``label``, optionally the four bbox columns (all ``<NA>`` = no box).
            Its index names rows in error messages.
        transform: Called on the RGB PIL image.
        labels: One label per row overriding ``df["label"]`` (e.g. codes from ``remap_labels``).
        cache: A :class:`raymetric.data.cache.ImageCache` of these rows, in order (``loader.cache``): images
            come from it instead of the files (already cropped to their boxes).
        on_bad_image: ``error`` raises :class:`ImageReadError` naming the file and row; ``skip`` logs a
            warning naming them and returns the item with ``image=None`` for the collate function to
            deal with (:func:`collate_substituting` in training, :func:`collate_dropping` in validation).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        transform: Callable[[Image.Image], Any] | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        on_bad_image: str = "error",
        cache=None,
    ):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.transform = transform
        self._paths = _PackedStrings(df["path"].tolist())
        self._rows = df.index.to_numpy()
        labels = df["label"] if labels is None else labels
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (len(df),):
            raise ValueError(f"labels must hold one label per row: {len(df)} rows, labels of shape {self.labels.shape}")
        self._bboxes = _bbox_array(df)  # [N, 4] as (x_1, y_1, x_2, y_2), -1 = no box
        if cache is not None and len(cache) != len(df):
            raise ValueError(f"the image cache {cache.folder} holds {len(cache)} images, the rows are {len(df)}")
        self.cache = cache

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            # Also ends plain iteration (``for item in dataset``), which stops at IndexError.
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        path = self._paths[i]
        box = self._bboxes[i]
        try:
            if self.cache is not None:
                image = self.cache.image(i)
            else:
                image = read_image(path, None if box[0] < 0 else box.tolist())
        except ImageReadError as error:
            message = f"row {self._rows[i]}: {error}"
            if self.on_bad_image == "error":
                raise type(error)(message) from error
            logger.warning("skipping an unreadable image (on_bad_image: skip): %s", message)
            return {"image": None, "label": int(self.labels[i]), "index": int(i)}
        image = F.pil_to_tensor(image) if self.transform is None else self.transform(image)
        return {"image": image, "label": int(self.labels[i]), "index": int(i)}


def collate_substituting(items: list[dict]) -> dict:
    """Collate a training batch, replacing each unreadable item by a readable one of the same label.

    The batch keeps its size and its P x K structure (every worker must gather tensors of the same
    shape), and ``batch["n_bad_images"]`` counts the substitutions so that they are logged, not
    silent. A label none of whose items could be read borrows another label's item.

    >>> ok = lambda i, y: {"image": torch.full((1,), float(i)), "label": y, "index": i}
    >>> bad = lambda i, y: {"image": None, "label": y, "index": i}
    >>> b = collate_substituting([ok(0, 7), bad(1, 7), ok(2, 8), ok(3, 8)])
    >>> b["image"].flatten().tolist(), b["label"].tolist(), b["n_bad_images"]
    ([0.0, 0.0, 2.0, 3.0], [7, 7, 8, 8], 1)
    """
    good = [item for item in items if item["image"] is not None]
    if not good:
        indices = [item["index"] for item in items]
        raise ImageReadError(f"no image of a whole batch could be read (dataset indices {indices[:10]})")
    by_label = {}
    for item in good:
        by_label.setdefault(item["label"], item)
    filled = [item if item["image"] is not None else by_label.get(item["label"], good[0]) for item in items]
    batch = torch.utils.data.default_collate(filled)
    batch["n_bad_images"] = len(items) - len(good)
    return batch


def collate_dropping(items: list[dict]) -> dict:
    """Collate a validation batch without its unreadable items (``batch["n_bad_images"]`` counts them).

    >>> b = collate_dropping([{"image": None, "label": 1, "index": 0}, {"image": torch.ones(2), "label": 1, "index": 1}])
    >>> b["index"].tolist(), b["n_bad_images"]
    ([1], 1)
    >>> collate_dropping([{"image": None, "label": 1, "index": 0}])["image"].shape[0]
    0
    """
    good = [item for item in items if item["image"] is not None]
    if good:
        batch = torch.utils.data.default_collate(good)
    else:  # an empty batch keeps the loop simple
        batch = {"image": torch.zeros((0,)), "label": torch.zeros(0, dtype=torch.int64), "index": torch.zeros(0, dtype=torch.int64)}
    batch["n_bad_images"] = len(items) - len(good)
    return batch


def _bbox_array(df: pd.DataFrame) -> np.ndarray:
    """The boxes as int64 ``[N, 4]`` in Pillow's order ``(x_1, y_1, x_2, y_2)``; ``-1`` where a row has none."""
    boxes = np.full((len(df), 4), -1, dtype=np.int64)
    if not all(column in df.columns for column in BBOX_COLUMNS):
        return boxes
    cells = df[["x_1", "y_1", "x_2", "y_2"]].astype("Int64")
    present = cells.notna().to_numpy()
    partial = present.any(axis=1) & ~present.all(axis=1)
    if partial.any():
        rows = df.index[partial][:10].tolist()
        raise ValueError(f"rows {rows} set only some of the bbox columns {list(BBOX_COLUMNS)}; validate the frame")
    has_box = present.all(axis=1)
    boxes[has_box] = cells[has_box].to_numpy(dtype=np.int64)
    return boxes


class _PackedStrings:
    """Strings in one byte buffer plus offsets: a few numpy arrays however many strings there are."""

    def __init__(self, strings: Sequence[str]):
        # fsencode keeps undecodable file names (surrogate escapes) round-tripping.
        encoded = [os.fsencode(s) for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buffer[self._offsets[i] : self._offsets[i + 1]].tobytes())

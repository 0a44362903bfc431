"""DeepFashion In-shop Clothes Retrieval: 52,712 images of 7,982 clothing items, with query and gallery sets."""

from __future__ import annotations

import logging
import os

import pandas as pd

from raymetric.converters.common import ConverterError, finish_frame, read_rows, require_files, to_int

log = logging.getLogger(__name__)

LAYOUT = """\
DeepFashion_InShop/
    list_eval_partition.txt   a count line, header "image_name item_id evaluation_status", then rows:
                              img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train|query|gallery
    list_bbox_inshop.txt      a count line, header "image_name clothes_type pose_type x_1 y_1 x_2 y_2", then rows
    img_highres/WOMEN/Dresses/id_00000002/02_1_front.jpg ...   and/or   img/WOMEN/... (the 256 px images)"""


def convert_inshop(dataset_root: str, *, images: str | None = None, bboxes: bool | None = None) -> pd.DataFrame:
    """DeepFashion In-shop's official layout as an OML frame (paths relative to ``dataset_root``).

    The split is the dataset's own (``list_eval_partition.txt``), by item: train items, and query and
    gallery images of the other items. ``label`` is the item number (``id_00000002`` -> 2),
    ``category`` the clothes type folder (``Dresses``, as OML). Train items with a single image are
    dropped (as OML does): a P x K batch cannot use them.

    Args:
        dataset_root: the ``DeepFashion_InShop`` folder.
        images: the image folder, ``img_highres`` (as OML) or ``img``; None: ``img_highres`` when it
            exists, else ``img``.
        bboxes: add the boxes of ``list_bbox_inshop.txt``. Their coordinates are those of the
            ``img`` images, so they are refused with ``img_highres`` (OML's converter applies them
            to the high-resolution images, where they frame the wrong region). None: with ``img`` only.
    """
    if images is None:
        images = "img_highres" if os.path.isdir(os.path.join(dataset_root, "img_highres")) else "img"
    if images not in ("img", "img_highres"):
        raise ConverterError(f"images={images!r}: expected 'img' or 'img_highres'")
    if bboxes is None:
        bboxes = images == "img"
        if not bboxes:
            log.info("no boxes: list_bbox_inshop.txt's coordinates are those of img/, not img_highres/")
    elif bboxes and images != "img":
        raise ConverterError(
            "bboxes with images='img_highres': list_bbox_inshop.txt's coordinates are those of the "
            "img/ images; convert with images='img' to use the boxes"
        )
    require_files(dataset_root, ["list_eval_partition.txt"] + (["list_bbox_inshop.txt"] if bboxes else []), LAYOUT)

    path = os.path.join(dataset_root, "list_eval_partition.txt")
    rows = read_rows(path, 3, skip=2)  # a count line, a header line
    status = [r[2] for r in rows]
    unknown = sorted(set(status) - {"train", "query", "gallery"})
    if unknown:
        raise ConverterError(f"{path}: evaluation_status {unknown}; expected train, query or gallery")
    if any(not r[1].startswith("id_") for r in rows):
        bad = next(r[1] for r in rows if not r[1].startswith("id_"))
        raise ConverterError(f"{path}: item_id {bad!r} is not of the form id_<number>")
    df = pd.DataFrame({
        "label": to_int([r[1][3:] for r in rows], path, "item number"),
        "path": [_in_folder(r[0], images) for r in rows],
        "split": ["train" if s == "train" else "validation" for s in status],
        "is_query": [s == "query" for s in status],
        "is_gallery": [s == "gallery" for s in status],
        "category": [r[0].split("/")[-3] for r in rows],
    })
    if bboxes:
        box_path = os.path.join(dataset_root, "list_bbox_inshop.txt")
        boxes = {r[0]: r[3:] for r in read_rows(box_path, 7, skip=2)}
        missing = [r[0] for r in rows if r[0] not in boxes]
        if missing:
            raise ConverterError(f"{box_path}: no box for {len(missing)} image(s), e.g. {missing[:3]}")
        for k, column in enumerate(("x_1", "y_1", "x_2", "y_2")):
            df[column] = to_int([boxes[r[0]][k] for r in rows], box_path, "box")
    return finish_frame(df, one_vs_rest=False)


def _in_folder(image_name: str, images: str) -> str:
    """``img/WOMEN/...`` in the chosen image folder.

    >>> _in_folder("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "img_highres")
    'img_highres/WOMEN/Dresses/id_00000002/02_1_front.jpg'
    """
    first, rest = image_name.split("/", 1)
    return f"{images}/{rest}" if first == "img" else image_name

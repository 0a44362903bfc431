"""Stanford Online Products: 120,053 images of 22,634 products in 12 categories (bicycle, chair, ...)."""

from __future__ import annotations

import os

import pandas as pd

from raymetric.converters.common import finish_frame, read_rows, require_files, to_int

LAYOUT = """\
Stanford_Online_Products/
    Ebay_train.txt     header "image_id class_id super_class_id path", then one row per image
    Ebay_test.txt      the same for the test products
    bicycle_final/111085122871_0.JPG ...
    cabinet_final/110715681235_0.JPG ..."""


def convert_sop(dataset_root: str) -> pd.DataFrame:
    """Stanford Online Products' official layout as an OML frame (paths relative to ``dataset_root``).

    The split is the dataset's own, and it is by class: ``Ebay_train.txt`` holds products 1-11,318
    (train), ``Ebay_test.txt`` products 11,319-22,634 (validation, each image a query and in the
    gallery). ``category`` is the product's folder without its ``_final`` suffix (``bicycle``; OML
    keeps ``bicycle_final``), so metrics are also reported per category.

    Args:
        dataset_root: the ``Stanford_Online_Products`` folder.
    """
    require_files(dataset_root, ["Ebay_train.txt", "Ebay_test.txt"], LAYOUT)
    parts = []
    for name, split in (("Ebay_train.txt", "train"), ("Ebay_test.txt", "validation")):
        path = os.path.join(dataset_root, name)
        rows = read_rows(path, 4, skip=1)  # image_id class_id super_class_id path
        parts.append(pd.DataFrame({
            "label": to_int([r[1] for r in rows], path, "class_id"),
            "path": [r[3] for r in rows],
            "split": split,
            "category": [_category(r[3]) for r in rows],
        }))
    return finish_frame(pd.concat(parts, ignore_index=True), one_vs_rest=True)


def _category(path: str) -> str:
    """``bicycle_final/1.JPG`` -> ``bicycle``.

    >>> _category("coffee_maker_final/111265328556_0.JPG")
    'coffee_maker'
    """
    folder = path.split("/")[0]
    return folder.removesuffix("_final")

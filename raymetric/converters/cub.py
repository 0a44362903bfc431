"""CUB-200-2011 (Caltech-UCSD Birds): 11,788 images of 200 species, with one bounding box each."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from raymetric.converters.common import ConverterError, finish_frame, read_rows, require_files, split_by_class, to_int

LAYOUT = """\
CUB_200_2011/
    images.txt              <image_id> <path under images/>
    image_class_labels.txt  <image_id> <class_id 1..200>
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>
    train_test_split.txt    <image_id> <is_training_image>   (read with split=official only)
    images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ..."""


def convert_cub(dataset_root: str, *, bboxes: bool = True, split: str = "classes", train_classes: int | None = None) -> pd.DataFrame:
    """CUB-200-2011's official layout as an OML frame (paths relative to ``dataset_root``).

    Args:
        dataset_root: the ``CUB_200_2011`` folder.
        bboxes: add each image's box (``x_1 = int(x)``, ``x_2 = int(x + width)``, as OML's converter).
        split: ``classes``: the metric-learning split, classes 1-100 train, 101-200 validation;
            ``official``: the dataset's ``train_test_split.txt`` (OML's converter), whose train and
            validation share all 200 classes.
        train_classes: with ``split=classes``, how many classes train (None: the first half).

    Validation rows are queries and gallery items at once (1 vs rest).
    """
    files = ["images.txt", "image_class_labels.txt"] + (["bounding_boxes.txt"] if bboxes else [])
    if split == "official":
        files.append("train_test_split.txt")
    elif split != "classes":
        raise ConverterError(f"split={split!r}: expected 'classes' or 'official'")
    require_files(dataset_root, files, LAYOUT)

    def table(name: str, n_fields: int) -> tuple[str, dict[str, list[str]]]:
        path = os.path.join(dataset_root, name)
        return path, {image_id: rest for image_id, *rest in read_rows(path, n_fields)}

    images_path, images = table("images.txt", 2)
    labels_path, labels = table("image_class_labels.txt", 2)
    ids = list(images)
    _require_same_ids(ids, labels, labels_path)
    df = pd.DataFrame({
        "label": to_int([labels[i][0] for i in ids], labels_path, "class id"),
        "path": [os.path.join("images", images[i][0]) for i in ids],
    })
    if split == "classes":
        df["split"] = split_by_class(df["label"].to_numpy(), train_classes)
    else:
        split_path, is_train = table("train_test_split.txt", 2)
        _require_same_ids(ids, is_train, split_path)
        df["split"] = np.where(to_int([is_train[i][0] for i in ids], split_path, "flag") == 1, "train", "validation")
    if bboxes:
        boxes_path, boxes = table("bounding_boxes.txt", 5)
        _require_same_ids(ids, boxes, boxes_path)
        x, y, w, h = (np.array([float(boxes[i][k]) for i in ids]) for k in range(4))
        df["x_1"] = to_int(x, boxes_path, "box")
        df["x_2"] = to_int(x + w, boxes_path, "box")
        df["y_1"] = to_int(y, boxes_path, "box")
        df["y_2"] = to_int(y + h, boxes_path, "box")
    return finish_frame(df, one_vs_rest=True)


def _require_same_ids(ids: list[str], table: dict, path: str) -> None:
    missing = [i for i in ids if i not in table]
    if missing:
        raise ConverterError(f"{path}: no row for image id(s) {missing[:10]} of images.txt")

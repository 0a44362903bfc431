"""Stanford Cars (Cars196): 16,185 images of 196 car models, with one bounding box each.

Two official layouts are read: the split archives with the devkit (what OML's converter reads), and
the all-images archive ``car_ims`` with ``cars_annos.mat`` (what most metric-learning code reads).
The annotations are MATLAB files, read with SciPy (``pip install 'raymetric[converters]'``).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from raymetric.converters.common import ConverterError, finish_frame, require_files, split_by_class

LAYOUT = """\
either the split archives with the devkit:
    cars_test_annos_withlabels.mat
    devkit/cars_train_annos.mat       annotations: bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
    cars_train/00001.jpg ...
    cars_test/00001.jpg ...
or the all-images archive:
    cars_annos.mat                    annotations: relative_im_path bbox_x1 bbox_y1 bbox_x2 bbox_y2 class test
    car_ims/000001.jpg ..."""

SPLIT_FILES = ("devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat")
ALL_IMAGES_FILE = "cars_annos.mat"


def convert_cars(dataset_root: str, *, bboxes: bool = True, split: str = "classes", train_classes: int | None = None) -> pd.DataFrame:
    """Stanford Cars' official layout as an OML frame (paths relative to ``dataset_root``).

    Args:
        dataset_root: the dataset folder (either layout, see the module docstring).
        bboxes: add each image's box (the annotation's ``bbox_x1``, ``bbox_x2``, ``bbox_y1``, ``bbox_y2``).
        split: ``classes``: the metric-learning split, classes 1-98 train, 99-196 validation;
            ``official``: the dataset's own train/test images (OML's converter), which share all
            196 classes.
        train_classes: with ``split=classes``, how many classes train (None: the first half).

    Validation rows are queries and gallery items at once (1 vs rest).
    """
    if split not in ("classes", "official"):
        raise ConverterError(f"split={split!r}: expected 'classes' or 'official'")
    if os.path.exists(os.path.join(dataset_root, ALL_IMAGES_FILE)):
        path = os.path.join(dataset_root, ALL_IMAGES_FILE)
        ann = _annotations(path)
        paths = [str(p) for p in ann["relative_im_path"]]
        official = np.where(_ints(ann, "test", path) == 1, "validation", "train")
    else:
        require_files(dataset_root, SPLIT_FILES, LAYOUT)
        parts, official_parts = [], []
        for name, folder, which in ((SPLIT_FILES[0], "cars_train", "train"), (SPLIT_FILES[1], "cars_test", "validation")):
            part = _annotations(os.path.join(dataset_root, name))
            part["relative_im_path"] = np.array([os.path.join(folder, str(f)) for f in part["fname"]], dtype=object)
            parts.append(part)
            official_parts.append(np.full(len(part["class"]), which))
        ann = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        paths, official = list(ann["relative_im_path"]), np.concatenate(official_parts)
        path = os.path.join(dataset_root, SPLIT_FILES[0])

    df = pd.DataFrame({"label": _ints(ann, "class", path), "path": paths})
    df["split"] = split_by_class(df["label"].to_numpy(), train_classes) if split == "classes" else official
    if bboxes:
        for column, field in (("x_1", "bbox_x1"), ("x_2", "bbox_x2"), ("y_1", "bbox_y1"), ("y_2", "bbox_y2")):
            df[column] = _ints(ann, field, path)
    return finish_frame(df, one_vs_rest=True)


def _annotations(path: str) -> dict[str, np.ndarray]:
    """The ``annotations`` struct array of a Cars ``.mat`` file, one array per field."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ConverterError(
            "the Stanford Cars annotations are MATLAB files, read with SciPy, which is not installed: "
            "pip install 'raymetric[converters]'"
        ) from None
    try:
        annotations = loadmat(path, squeeze_me=True)["annotations"]
    except KeyError:
        raise ConverterError(f"{path}: no 'annotations' struct array") from None
    annotations = np.atleast_1d(annotations)  # squeeze_me makes a single record 0-d
    return {name: np.atleast_1d(annotations[name]) for name in annotations.dtype.names}


def _ints(ann: dict[str, np.ndarray], field: str, path: str) -> np.ndarray:
    if field not in ann:
        raise ConverterError(f"{path}: the annotations have no field {field!r}; fields: {sorted(ann)}")
    return ann[field].astype(np.int64)

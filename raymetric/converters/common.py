"""What the four converters share: reading the datasets' text tables, the split by class, the output frame."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Column order of every converter's output (OML's CSV; optional columns only when the dataset has them).
COLUMNS = ("label", "path", "split", "is_query", "is_gallery", "category", "x_1", "x_2", "y_1", "y_2")


class ConverterError(ValueError):
    """The dataset folder does not look like the official layout; the message names the file and line."""


def require_files(root: str, names: Sequence[str], layout: str) -> None:
    """Raise naming every missing file, with the layout that was expected."""
    missing = [name for name in names if not os.path.exists(os.path.join(root, name))]
    if missing:
        raise ConverterError(f"{root}: missing {', '.join(missing)}; expected the official layout:\n{layout}")


def read_rows(path: str, n_fields: int, *, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a text table, each with exactly ``n_fields`` fields.

    Args:
        path: the file.
        n_fields: fields per row; a row with another count is an error naming its line.
        skip: lines to skip first (a count line, a header line).
    """
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) != n_fields:
                raise ConverterError(f"{path}, line {number}: expected {n_fields} fields, got {len(fields)}: {line.strip()!r}")
            rows.append(fields)
    if not rows:
        raise ConverterError(f"{path}: no rows")
    return rows


def to_int(values: Sequence[str], path: str, what: str) -> np.ndarray:
    """Integers from text cells (``"7"`` or ``"60.0"``: CUB writes its boxes as floats, truncated here as OML does)."""
    try:
        return np.array([int(float(v)) for v in values], dtype=np.int64)
    except ValueError as err:
        raise ConverterError(f"{path}: a {what} is not a number ({err})") from None


def split_by_class(class_ids: np.ndarray, train_classes: int | None) -> np.ndarray:
    """``"train"`` for the first ``train_classes`` class ids in sorted order, ``"validation"`` for the rest.

    The metric-learning split of CUB and Cars (Song et al., 2016): train and validation classes are
    disjoint. ``train_classes=None`` takes the first half (100 of CUB's 200, 98 of Cars' 196).

    >>> split_by_class(np.array([1, 2, 3, 4, 1]), None).tolist()
    ['train', 'train', 'validation', 'validation', 'train']
    """
    classes = np.unique(class_ids)
    n_train = len(classes) // 2 if train_classes is None else train_classes
    if not 0 < n_train < len(classes):
        raise ConverterError(f"train_classes={train_classes}: must be between 1 and {len(classes) - 1} (the dataset has {len(classes)} classes)")
    return np.where(np.isin(class_ids, classes[:n_train]), "train", "validation")


def finish_frame(df: pd.DataFrame, *, one_vs_rest: bool) -> pd.DataFrame:
    """The OML frame: flags set, train labels with one image dropped, columns in order.

    Args:
        df: ``label``, ``path``, ``split``, optional ``category`` and box columns; with
            ``one_vs_rest=False`` also ``is_query``/``is_gallery`` on validation rows.
        one_vs_rest: every validation row is a query and in the gallery (CUB, Cars, SOP).
    """
    df = df.copy()
    train = df["split"] == "train"
    if one_vs_rest:
        df["is_query"] = True
        df["is_gallery"] = True
    # Empty flags on train rows, as the format asks; pandas writes <NA> as an empty cell.
    for column in ("is_query", "is_gallery"):
        df[column] = df[column].astype("boolean")
        df.loc[train, column] = pd.NA
    # A P x K batch needs at least 2 images of a label; one-image train labels cannot be sampled.
    counts = df.loc[train, "label"].value_counts()
    single = set(counts.index[counts < 2])
    if single:
        log.warning("dropped %d train label(s) with a single image (%d rows)", len(single), len(single))
        df = df[~(train & df["label"].isin(single))]
    return df[[c for c in COLUMNS if c in df.columns]].reset_index(drop=True)

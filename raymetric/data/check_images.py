"""Decode every image of a dataset once, in parallel with Ray Data, before training starts (``check_images: true``).

A file that exists can still be truncated, not an image, or smaller than its bbox; without this
check such a file stops training when a worker first reaches it, possibly hours in, or (with
``on_bad_image: skip``) is skipped then. The check reports every such row at once, on the driver.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raymetric.data.csv import BBOX_COLUMNS, DatasetError
from raymetric.data.dataset import ImageReadError, read_image

MAX_LISTED = 10


def record_box(record: dict, has_bbox: bool) -> list[int] | None:
    """The ``(x_1, y_1, x_2, y_2)`` box of a row record (bbox columns as floats, NaN = none), or None."""
    if not has_bbox or pd.isna(record["x_1"]):
        return None
    return [int(record[c]) for c in ("x_1", "y_1", "x_2", "y_2")]


def row_blocks(frame: pd.DataFrame, ids: np.ndarray, id_column: str, rows_per_task: int):
    """A Ray Dataset of ``frame``'s ``path`` and bbox columns plus ``id_column``, one block per task.

    Blocks are built here, with no repartition (../shared/RAY_NOTES.md section 5); a function passed to
    ``map_batches`` then runs as Ray tasks, one per block.
    """
    import ray.data

    columns = ["path", *[c for c in BBOX_COLUMNS if c in frame.columns]]
    rows = frame[columns].reset_index(drop=True).copy()
    rows.insert(0, id_column, ids)
    for c in BBOX_COLUMNS:
        if c in rows:  # Arrow wants plain floats: nullable Int64 becomes float with NaN
            rows[c] = rows[c].astype("float64")
    n_blocks = max(1, -(-len(rows) // rows_per_task))
    return ray.data.from_pandas([rows.iloc[i] for i in np.array_split(np.arange(len(rows)), n_blocks)])


def find_unreadable(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose image cannot be decoded (or cropped to its bbox), with the error.

    Args:
        rows: ``row``, ``path`` and optionally the bbox columns (a slice of a checked dataset frame).

    Returns:
        Columns ``row``, ``path``, ``error``; empty when every image decodes.
    """
    has_bbox = all(c in rows.columns for c in BBOX_COLUMNS)
    bad = []
    for record in rows.to_dict("records"):
        try:
            read_image(record["path"], record_box(record, has_bbox)).load()
        except ImageReadError as err:
            bad.append({"row": int(record["row"]), "path": record["path"], "error": str(err)})
    return pd.DataFrame(bad, columns=["row", "path", "error"])


def check_images(df: pd.DataFrame, *, rows_per_task: int = 256) -> None:
    """Decode every image of ``df`` with Ray Data tasks; raise ``DatasetError`` listing the unreadable rows.

    Args:
        df: a frame from :func:`raymetric.data.csv.load_dataset_csv` (its index names the rows).
        rows_per_task: images per Ray task.
    """
    ds = row_blocks(df, df.index.to_numpy(), "row", rows_per_task)
    bad = ds.map_batches(find_unreadable, batch_format="pandas", batch_size=None).to_pandas()
    if len(bad):
        bad = bad.sort_values("row")
        listed = "\n".join(f"  - row {r.row}: {r.error}" for r in bad.head(MAX_LISTED).itertuples())
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(
            f"column 'path': {len(bad)} image(s) cannot be decoded (check_images: true):\n{listed}{more}\n"
            "(rows are 0-based data rows: row 0 is the first line after the header)"
        )

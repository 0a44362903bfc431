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
        bbox = None
        if has_bbox and not pd.isna(record["x_1"]):
            bbox = [int(record[c]) for c in ("x_1", "y_1", "x_2", "y_2")]
        try:
            read_image(record["path"], bbox).load()
        except ImageReadError as err:
            bad.append({"row": int(record["row"]), "path": record["path"], "error": str(err)})
    return pd.DataFrame(bad, columns=["row", "path", "error"])


def check_images(df: pd.DataFrame, *, rows_per_task: int = 256) -> None:
    """Decode every image of ``df`` with Ray Data tasks; raise ``DatasetError`` listing the unreadable rows.

    Args:
        df: a frame from :func:`raymetric.data.csv.load_dataset_csv` (its index names the rows).
        rows_per_task: images per Ray task.
    """
    import ray.data

    columns = ["path", *[c for c in BBOX_COLUMNS if c in df.columns]]
    rows = df[columns].copy()
    rows.insert(0, "row", df.index.to_numpy())
    for c in BBOX_COLUMNS:
        if c in rows:  # Arrow wants plain floats: nullable Int64 becomes float with NaN
            rows[c] = rows[c].astype("float64")
    n_blocks = max(1, -(-len(rows) // rows_per_task))
    # Ray: blocks built here, no repartition; map_batches with a function runs as tasks (no actor pool).
    ds = ray.data.from_pandas([rows.iloc[i] for i in np.array_split(np.arange(len(rows)), n_blocks)])
    bad = ds.map_batches(find_unreadable, batch_format="pandas", batch_size=None).to_pandas()
    if len(bad):
        bad = bad.sort_values("row")
        listed = "\n".join(f"  - row {r.row}: {r.error}" for r in bad.head(MAX_LISTED).itertuples())
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(
            f"column 'path': {len(bad)} image(s) cannot be decoded (check_images: true):\n{listed}{more}\n"
            "(rows are 0-based data rows: row 0 is the first line after the header)"
        )

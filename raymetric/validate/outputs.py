"""What a stand-alone validation writes: the per-query top-k table and the picture of the worst queries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymetric.config import MetricArgs
from raymetric.embeddings import EmbeddingsTable
from raymetric.validate.scoring import ValidationOutput


def write_topk_table(path: str, table: EmbeddingsTable, out: ValidationOutput, width: int) -> None:
    """Per query: its row, label, ``n_gt``, top-``width`` gallery rows, distances, relevance, per-query metrics."""
    k = min(width, out.topk.gallery_ids.shape[1])
    ids, dist = out.topk.gallery_ids[:, :k].numpy(), out.topk.dist[:, :k].numpy()
    relevant = out.is_relevant[:, :k].numpy()
    columns = {
        "query": pa.array(out.query_rows, pa.int64()),
        "label": pa.array(table.labels[out.query_rows], pa.int64()),
        "n_gt": pa.array(out.topk.n_gt.numpy(), pa.int64()),
        "retrieved": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int64()), k),
        "distance": pa.FixedSizeListArray.from_arrays(pa.array(dist.reshape(-1), pa.float32()), k),
        "relevant": pa.FixedSizeListArray.from_arrays(pa.array(relevant.reshape(-1), pa.bool_()), k),
    }
    if table.categories is not None:
        columns["category"] = pa.array(table.categories[out.query_rows], pa.string())
    for name, values in out.per_query.items():
        columns[name] = pa.array(values.numpy(), pa.float64())
    pq.write_table(pa.table(columns), path)


def picture_rows(table: EmbeddingsTable, out: ValidationOutput, picture) -> tuple[list, str]:
    """The picture's rows (``raymetric.visualize.PictureRow``, worst query first) and the metric ranking them."""
    from raymetric.visualize import PictureRow, badness_tiebreak, nearest_missed, worst_queries

    metric = picture.metric or next(iter(out.per_query))
    # Queries with nothing relevant to find go last: their low values say nothing about the model.
    values = torch.where(out.topk.n_gt > 0, out.per_query[metric], float("inf"))
    gallery = table.is_gallery
    codes = table.sequence_codes()
    rows = []
    for q in worst_queries(values, picture.n_queries, badness_tiebreak(out.per_query)):
        qid = int(out.query_rows[q])
        shown = [(int(g), float(d), bool(table.labels[g] == table.labels[qid]))
                 for g, d in zip(out.topk.gallery_ids[q].tolist(), out.topk.dist[q].tolist()) if g >= 0]
        relevant = np.flatnonzero(gallery & (table.labels == table.labels[qid])
                                  & ~((codes == codes[qid]) & (codes != -1)))
        missed = nearest_missed(table.embeddings[qid], qid, {g for g, _, _ in shown[: picture.n_retrieved]},
                                relevant, table.embeddings[relevant])
        value = float(values[q])
        rows.append(PictureRow(qid, f"#{qid} {metric}={value:.2f}", shown, missed))
    return rows, metric


def draw_picture(table: EmbeddingsTable, out: ValidationOutput, picture, metric_args: MetricArgs,
                 frame: pd.DataFrame | None = None):
    """The worst queries by ``picture.metric`` with their top items and a missed relevant one."""
    from raymetric.visualize import frame_image, retrieval_picture

    rows, metric = picture_rows(table, out, picture)

    def load_image(item: int):
        if frame is not None:
            return frame_image(frame, item)
        if table.paths is not None and table.paths[item]:
            return frame_image(pd.DataFrame({"path": [table.paths[item]]}), 0)
        return None

    return retrieval_picture(rows, load_image, picture.n_retrieved, picture.tile_size,
                             title=f"worst {len(rows)} queries by {metric}")

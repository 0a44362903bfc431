"""Validation inside training, across W gloo processes, equals the single-process search of the same embeddings.

Each rank holds its contiguous share of the validation rows (as in training); the oracle is the
stand-alone job's in-process search (``raymetric.validate.score_table``) of all rows at once. Metrics
must be equal, fnmr@fmr and pcf included (pair-distance counts and moments add up exactly), with query
expansion (a collective gather of neighbour embeddings) and sequences in play.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from raymetric.config import MetricArgs, RetrievalConfig
from raymetric.embeddings import EmbeddingsTable
from raymetric.evaluation import ValidationRows, shard_rows, validation_metrics
from raymetric.validate import score_table
from tests.ddp_utils import run_in_ddp


def make_frame(n=90, dim=8, seed=0):
    """Validation rows with categories, sequences (some empty), duplicates and query-only/gallery-only rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 18, n)
    centers = rng.normal(size=(18, dim))
    emb = centers[labels] + 0.8 * rng.normal(size=(n, dim))
    emb[5] = emb[40]  # exact duplicates: ties at distance 0
    emb[6] = emb[40]
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    frame = pd.DataFrame({
        "label": labels,
        "is_query": rng.random(n) < 0.8,
        "is_gallery": rng.random(n) < 0.85,
        "category": np.array(["shoes", "bags"])[labels % 2],
        "sequence": pd.array([None if i % 3 else f"s{i // 6}" for i in range(n)], dtype="string"),
    })
    frame.loc[~frame.is_query & ~frame.is_gallery, "is_gallery"] = True
    return frame, emb


METRICS = dict(cmc_top_k=[1, 3], precision_top_k=[3], map_top_k=[5], fmr_vals=[0.05, 0.5], fmr_bins=512,
               pcf_variance=[0.5, 0.9])
RETRIEVAL = dict(query_chunk=7, extra_candidates=2, postprocessing=[{"name": "query_expansion", "args": {"n_neighbours": 2}}])


def _rank_metrics(frame, emb, metric_args, retrieval):
    from raymetric.distributed import world

    rank, world_size = world()
    rows = ValidationRows.from_frame(frame)
    mine = shard_rows(len(frame), rank, world_size)
    return validation_metrics(torch.from_numpy(emb[mine]), torch.as_tensor(mine), rows,
                              MetricArgs(**metric_args), retrieval=RetrievalConfig(**retrieval))


def oracle(frame, emb):
    table = EmbeddingsTable(emb, frame["label"].to_numpy(), frame["is_query"].to_numpy(), frame["is_gallery"].to_numpy(),
                            frame["category"].to_numpy(),
                            np.array([None if pd.isna(s) else s for s in frame["sequence"]], object))
    return score_table(table, MetricArgs(**METRICS), RetrievalConfig(**RETRIEVAL)).metrics


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_validation_equals_one_process(world_size):
    frame, emb = make_frame()
    expected = oracle(frame, emb)
    results = run_in_ddp(world_size, _rank_metrics, frame, emb, METRICS, RETRIEVAL)
    for metrics in results:  # every rank ends with the same metrics
        assert list(metrics) == list(expected)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert expected["n_gallery"] == int(frame.is_gallery.sum()) and "bags/pcf@0.9" in expected


def test_single_process_without_a_process_group():
    frame, emb = make_frame(seed=1)
    assert _rank_metrics(frame, emb, METRICS, RETRIEVAL) == pytest.approx(oracle(frame, emb))


def _rank_picture(frame, emb, metric_args, retrieval, picture):
    from raymetric.config import PictureConfig
    from raymetric.distributed import world
    from raymetric.evaluation import worst_picture_rows

    rank, world_size = world()
    rows = ValidationRows.from_frame(frame)
    mine = torch.as_tensor(shard_rows(len(frame), rank, world_size))
    emb_t = torch.from_numpy(emb[mine.numpy()])
    args, picture = MetricArgs(**metric_args), PictureConfig(**picture)
    _, details = validation_metrics(emb_t, mine, rows, args, retrieval=RetrievalConfig(**retrieval), return_details=True)
    return worst_picture_rows(emb_t, mine, rows, details, picture)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("metric", [None, "map@5"])
def test_training_picture_rows_equal_the_stand_alone_picture(world_size, metric):
    """The worst queries, their top items and the nearest missed relevant item, with the gallery sharded."""
    from raymetric.config import PictureConfig
    from raymetric.validate.outputs import picture_rows

    frame, emb = make_frame(seed=2)
    picture = {"n_queries": 6, "n_retrieved": 3, "metric": metric}
    table = EmbeddingsTable(emb, frame["label"].to_numpy(), frame["is_query"].to_numpy(), frame["is_gallery"].to_numpy(),
                            frame["category"].to_numpy(),
                            np.array([None if pd.isna(s) else s for s in frame["sequence"]], object))
    expected, _ = picture_rows(table, score_table(table, MetricArgs(**METRICS), RetrievalConfig(**RETRIEVAL)),
                               PictureConfig(**picture))
    results = (run_in_ddp(world_size, _rank_picture, frame, emb, METRICS, RETRIEVAL, picture) if world_size > 1
               else [_rank_picture(frame, emb, METRICS, RETRIEVAL, picture)])
    assert any(row.missed for row in expected) and len(expected) == 6
    for rows in results:
        assert [(r.query_id, r.title) for r in rows] == [(r.query_id, r.title) for r in expected]
        for got, want in zip(rows, expected):
            assert [(g, rel) for g, _, rel in got.retrieved] == [(g, rel) for g, _, rel in want.retrieved]
            np.testing.assert_allclose([d for _, d, _ in got.retrieved], [d for _, d, _ in want.retrieved], rtol=1e-5)
            assert (got.missed is None) == (want.missed is None)
            if want.missed:
                assert got.missed[0] == want.missed[0] and got.missed[1] == pytest.approx(want.missed[1], rel=1e-6)

"""Validation inside training, across W gloo processes, equals the single-process search of the same embeddings.

Each rank holds its contiguous share of the validation rows (as in training); the oracle is the
stand-alone job's in-process search (``raymetric.validate.score_table``) of all rows at once. Metrics
must be equal, fnmr@fmr and pcf included (histograms and moments add up exactly), with query
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

"""Post-processing: query expansion against a by-hand expansion and brute-force search; distance thresholds."""

import numpy as np
import pytest
import torch

from raymetric.config import ConfigError, MetricArgs, RetrievalConfig
from raymetric.metrics import cmc_at_k
from raymetric.postprocessing import DistanceThreshold, QueryExpansion, apply_postprocessing, build_postprocessor
from raymetric.retrieval import TopK, relevance
from raymetric.search import LocalSearcher, SearchSettings, check_retrieval_config


def brute_topk(query, gallery, k, skip):
    """Top-k rows by (float64 distance rounded to float32, row), skipping ``skip[q]`` sets."""
    out = []
    for q in range(len(query)):
        d = np.sqrt(((gallery.astype(np.float64) - query[q].astype(np.float64)) ** 2).sum(1)).astype(np.float32)
        order = [g for g in np.lexsort((np.arange(len(gallery)), d)) if g not in skip[q]]
        out.append(order[:k])
    return np.array(out)


def setup(seed=0, n=60, dim=5):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 8, n)
    sequences = np.where(rng.random(n) < 0.5, rng.integers(0, 5, n), -1)
    searcher = LocalSearcher(torch.from_numpy(emb), torch.from_numpy(labels), torch.ones(n, dtype=torch.bool),
                             torch.from_numpy(sequences), SearchSettings(k=4, query_chunk=7, extra=1))
    skip = [{g for g in range(n) if g == q or (sequences[q] != -1 and sequences[g] == sequences[q])} for q in range(n)]
    return emb, labels, sequences, searcher, skip


def test_query_expansion_equals_expanding_by_hand():
    emb, labels, sequences, searcher, skip = setup()
    rows = torch.arange(len(emb))
    first = searcher.search(torch.from_numpy(emb), rows)
    np.testing.assert_array_equal(first.gallery_ids.numpy(), brute_topk(emb, emb, 4, skip))

    expanded, result = QueryExpansion(n_neighbours=2)(torch.from_numpy(emb), rows, first, searcher)
    by_hand = (emb + emb[first.gallery_ids[:, 0]] + emb[first.gallery_ids[:, 1]]) / 3
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    np.testing.assert_allclose(expanded.numpy(), by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.gallery_ids.numpy(), brute_topk(expanded.numpy(), emb, 4, skip))
    assert torch.equal(result.n_gt, first.n_gt)  # the relevant items do not change


def test_query_expansion_ignores_padding():
    # A 3-item gallery and k = 4: the last slot is padding and must not be averaged in.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    searcher = LocalSearcher(emb, torch.tensor([0, 0, 1]), torch.ones(3, dtype=torch.bool), None, SearchSettings(k=4))
    rows = torch.arange(3)
    first = searcher.search(emb, rows)
    assert (first.gallery_ids[:, 2:] == -1).all()  # each query skips itself: 2 items, then padding
    expanded, _ = QueryExpansion(n_neighbours=3, normalise=False)(emb, rows, first, searcher)
    torch.testing.assert_close(expanded[0], (emb[0] + emb[2] + emb[1]) / 3)


def test_distance_threshold_drops_far_items_and_changes_the_metrics():
    topk = TopK(torch.tensor([[0.1, 0.5, 2.0], [1.5, 1.6, 1.7]]), torch.tensor([[3, 1, 2], [0, 1, 2]]),
                torch.tensor([1, 1]))
    _, out = DistanceThreshold(1.0)(None, None, topk, None)
    assert out.gallery_ids.tolist() == [[3, 1, -1], [-1, -1, -1]]
    is_relevant, n_retrieved = relevance(out, [0, 0], label_of_id=[0, 1, 0, 1])
    assert n_retrieved.tolist() == [2, 0]
    # Query 1 retrieves nothing but has a relevant item: OML's rule scores it 0.
    assert cmc_at_k(is_relevant, n_retrieved, out.n_gt, 3).tolist() == [0.0, 0.0]
    _, kept = DistanceThreshold(5.0)(None, None, topk, None)
    assert torch.equal(kept.gallery_ids, topk.gallery_ids)


def test_steps_run_in_order():
    emb, _, _, searcher, _ = setup(seed=1)
    rows = torch.arange(len(emb))
    first = searcher.search(torch.from_numpy(emb), rows)
    steps = [build_postprocessor("query_expansion", {"n_neighbours": 1}), build_postprocessor("distance_threshold",
                                                                                              {"max_distance": 0.6})]
    out = apply_postprocessing(steps, torch.from_numpy(emb), rows, first, searcher)
    assert (out.dist[out.gallery_ids >= 0] <= 0.6).all() and (out.gallery_ids == -1).any()


@pytest.mark.parametrize("steps, message", [
    ([{"name": "rerank"}], r"retrieval.postprocessing.0.name: unknown name 'rerank'"),
    ([{"name": "query_expansion", "args": {"n": 2}}], r"retrieval.postprocessing.0.args: unknown argument"),
    ([{"name": "distance_threshold", "args": {"max_distance": -1}}], r"retrieval.postprocessing.0: ValueError"),
    ([{"name": "query_expansion", "args": {"n_neighbours": 9}}], r"n_neighbours=9 exceeds the largest k"),
])
def test_bad_postprocessing_config_names_the_key(steps, message):
    with pytest.raises(ConfigError, match=message):
        check_retrieval_config(RetrievalConfig(postprocessing=steps), MetricArgs(cmc_top_k=[1, 5]))

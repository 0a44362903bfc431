"""Retrieval metrics against hand-worked cases and a plain-Python per-query oracle (REFERENCE.md §2)."""

import math

import numpy as np
import pytest
import torch

from raymetric.metrics import (
    EmbeddingMoments,
    cmc_at_k,
    fmr_key,
    fnmr_at_fmr,
    map_at_k,
    precision_at_k,
    retrieval_metrics,
    validation_report,
)


def oracle(relevance_row, n_retrieved, n_gt, k):
    """(cmc, precision, map) of one query, written straight from the definitions, OML corner cases included."""
    k_eff = min(k, n_retrieved)
    g = [bool(x) for x in relevance_row[:k_eff]]
    if k_eff == 0:
        value = 1.0 if n_gt == 0 else 0.0
        return value, value, value
    cmc = 1.0 if any(g) else 0.0
    denominator = min(n_gt, k_eff)
    precision = sum(g) / denominator if denominator else math.nan
    hits, total = 0, 0.0
    for i, relevant in enumerate(g, start=1):
        if relevant:
            hits += 1
            total += hits / i
    average_precision = total / hits if hits else 0.0
    return cmc, precision, average_precision


def nan_mean(values):
    return sum(values) / len(values) if values else 0.0


def test_worked_example():
    g, n_retrieved, n_gt = [[1, 0, 1, 0, 0]], [5], [3]
    assert cmc_at_k(g, n_retrieved, n_gt, 5).tolist() == [1.0]
    assert cmc_at_k(g, n_retrieved, n_gt, 1).tolist() == [1.0]
    assert precision_at_k(g, n_retrieved, n_gt, 5).item() == pytest.approx(2 / 3)
    assert map_at_k(g, n_retrieved, n_gt, 5).item() == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert map_at_k(g, n_retrieved, n_gt, 5).item() == pytest.approx(0.8333, abs=1e-4)
    # Cut at 2: one hit of min(3, 2) possible.
    assert precision_at_k(g, n_retrieved, n_gt, 2).item() == pytest.approx(1 / 2)
    assert map_at_k(g, n_retrieved, n_gt, 2).item() == pytest.approx(1.0)


def test_precision_is_not_divided_by_k():
    # A perfect ranking with n_gt < k scores 1.
    assert precision_at_k([[1, 1, 0, 0, 0]], [5], [2], 5).item() == 1.0


@pytest.mark.parametrize("fn", [cmc_at_k, precision_at_k, map_at_k])
def test_nothing_retrieved(fn):
    # OML: nothing retrieved and nothing relevant is a success, nothing retrieved but something relevant a miss.
    assert fn([[0, 0, 0], [0, 0, 0]], [0, 0], [0, 4], 3).tolist() == [1.0, 0.0]


def test_retrieved_but_no_relevant_item():
    g, n_retrieved, n_gt = [[0, 0, 0]], [3], [0]
    assert cmc_at_k(g, n_retrieved, n_gt, 3).item() == 0.0
    assert map_at_k(g, n_retrieved, n_gt, 3).item() == 0.0
    assert math.isnan(precision_at_k(g, n_retrieved, n_gt, 3).item())


def test_fewer_retrieved_than_k():
    # k' = min(k, n_retrieved) = 2; the padding column is never counted, even if flagged.
    g = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert precision_at_k(g, [2], [5], 4).item() == pytest.approx(1 / 2)
    assert map_at_k(g, [2], [5], 4).item() == pytest.approx(1 / 2)
    assert cmc_at_k(g, [1], [5], 4).item() == 0.0


def random_case(seed, n_query=300, width=8):
    """Consistent random results: relevant flags only among retrieved items, n_gt >= hits, some n_gt == 0."""
    rng = np.random.default_rng(seed)
    n_retrieved = rng.integers(0, width + 1, n_query)
    is_relevant = (rng.random((n_query, width)) < 0.3) & (np.arange(width)[None, :] < n_retrieved[:, None])
    n_gt = is_relevant.sum(1) + rng.integers(0, 4, n_query)
    no_gt = rng.random(n_query) < 0.15
    is_relevant[no_gt] = False
    n_gt[no_gt] = 0
    categories = rng.choice(np.array(["shoes", "bags", "hats"]), n_query)
    return is_relevant, n_retrieved, n_gt, categories


@pytest.mark.parametrize("seed", range(3))
def test_per_query_against_oracle(seed):
    is_relevant, n_retrieved, n_gt, _ = random_case(seed)
    as_torch = torch.as_tensor(is_relevant), torch.as_tensor(n_retrieved), torch.as_tensor(n_gt)
    for k in (1, 3, 8):
        expected = np.array([oracle(row, r, n, k) for row, r, n in zip(is_relevant.tolist(), n_retrieved, n_gt)])
        for column, fn in enumerate([cmc_at_k, precision_at_k, map_at_k]):
            for inputs in [(is_relevant, n_retrieved, n_gt), as_torch]:
                np.testing.assert_allclose(fn(*inputs, k).numpy(), expected[:, column], rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("mode", ["exclude", "oml"])
def test_means_and_category_blocks_against_oracle(mode):
    is_relevant, n_retrieved, n_gt, categories = random_case(7)
    result = retrieval_metrics(is_relevant, n_retrieved, n_gt, cmc_top_k=(1, 5), precision_top_k=(3, 5),
                               map_top_k=(5,), categories=categories, queries_without_gt=mode)
    metric_keys = ["cmc@1", "cmc@5", "precision@3", "precision@5", "map@5"]
    expected_keys = []
    for prefix in ["", "bags/", "hats/", "shoes/"]:
        expected_keys += [prefix + key for key in metric_keys + ["n_queries", "n_queries_without_gt"]]
    assert list(result) == expected_keys

    blocks = [("", np.ones(len(n_gt), bool))] + [(f"{c}/", categories == c) for c in ("bags", "hats", "shoes")]
    for prefix, members in blocks:
        rows = [i for i in np.flatnonzero(members) if mode == "oml" or n_gt[i] > 0]
        assert result[prefix + "n_queries"] == members.sum()
        assert result[prefix + "n_queries_without_gt"] == (n_gt[members] == 0).sum()
        for key in metric_keys:
            name, k = key.split("@")
            column = ["cmc", "precision", "map"].index(name)
            values = [oracle(is_relevant[i].tolist(), n_retrieved[i], n_gt[i], int(k))[column] for i in rows]
            expected = nan_mean(values)
            if math.isnan(expected):
                assert math.isnan(result[prefix + key])
            else:
                assert result[prefix + key] == pytest.approx(expected, rel=1e-12)

    if mode == "exclude":
        assert all(math.isfinite(v) for v in result.values())
    else:  # OML: a query with retrieved items but no relevant one makes precision NaN
        assert math.isnan(result["precision@5"]) and math.isfinite(result["cmc@1"])


def test_exclude_with_no_query_left_is_finite():
    result = retrieval_metrics([[0, 0], [0, 0]], [2, 2], [0, 0], cmc_top_k=(1,), precision_top_k=(2,),
                               map_top_k=(2,), categories=[3, 4])
    assert result == {"cmc@1": 0.0, "precision@2": 0.0, "map@2": 0.0, "n_queries": 2, "n_queries_without_gt": 2,
                      "3/cmc@1": 0.0, "3/precision@2": 0.0, "3/map@2": 0.0, "3/n_queries": 1,
                      "3/n_queries_without_gt": 1,
                      "4/cmc@1": 0.0, "4/precision@2": 0.0, "4/map@2": 0.0, "4/n_queries": 1,
                      "4/n_queries_without_gt": 1}


def test_exclude_vs_oml_on_a_small_case():
    # q0: worked example; q1: retrieved, nothing relevant; q2: nothing retrieved, nothing relevant.
    g = [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    n_retrieved, n_gt = [5, 5, 0], [3, 0, 0]
    kwargs = dict(cmc_top_k=(5,), precision_top_k=(5,), map_top_k=(5,))
    exclude = retrieval_metrics(g, n_retrieved, n_gt, **kwargs)
    assert exclude["cmc@5"] == 1.0 and exclude["precision@5"] == pytest.approx(2 / 3)
    assert exclude["map@5"] == pytest.approx(0.8333, abs=1e-4) and exclude["n_queries_without_gt"] == 2
    oml = retrieval_metrics(g, n_retrieved, n_gt, queries_without_gt="oml", **kwargs)
    assert oml["cmc@5"] == pytest.approx(2 / 3) and oml["map@5"] == pytest.approx((0.8333 + 0 + 1) / 3, abs=1e-4)
    assert math.isnan(oml["precision@5"]) and oml["n_queries"] == 3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="queries_without_gt"):
        retrieval_metrics([[1]], [1], [1], queries_without_gt="drop")
    with pytest.raises(ValueError, match="k must be"):
        retrieval_metrics([[1, 0]], [2], [1], cmc_top_k=(5,))
    with pytest.raises(ValueError, match="categories"):
        retrieval_metrics([[1, 0]], [2], [1], cmc_top_k=(1,), precision_top_k=(), map_top_k=(), categories=[1, 2])


# ---------------------------------------------------------------- fnmr@fmr, pcf, the report


def all_pair_distances(query, gallery, query_labels, gallery_labels, query_ids, gallery_ids):
    """Brute force: float64 distances of every (query, gallery item) pair but the query itself, and relevance."""
    dist, relevant = [], []
    for q in range(len(query)):
        for g in range(len(gallery)):
            if query_ids[q] == gallery_ids[g]:
                continue
            dist.append(float(np.sqrt(((query[q].astype(np.float64) - gallery[g]) ** 2).sum())))
            relevant.append(query_labels[q] == gallery_labels[g])
    return np.array(dist), np.array(relevant)


def oml_fnmr(dist32: np.ndarray, relevant: np.ndarray, fmr: float) -> float:
    """OML 4.0's calc_fnmr_at_fmr: float32 distances, NumPy's linear quantile of the negatives, positives >= it."""
    threshold = np.quantile(dist32[~relevant], [fmr])[0]  # OML passes a tuple of rates: a float64 threshold
    return float((dist32[relevant] >= threshold).sum() / relevant.sum())


def exact_counts(query, gallery, query_labels, gallery_labels, **masks):
    """``windows -> counts`` over all pairs, for :func:`fnmr_at_fmr`, with a small block size."""
    from raymetric.retrieval import pair_distance_counts

    def counts(windows, n_buckets):
        return pair_distance_counts(torch.from_numpy(query), torch.from_numpy(gallery),
                                    query_labels=torch.from_numpy(query_labels),
                                    gallery_labels=torch.from_numpy(gallery_labels), windows=windows,
                                    n_buckets=n_buckets, max_block_elems=97, **masks)
    return counts


FMRS = [0.0, 0.01, 0.1, 0.37, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("n_buckets", [2, 8, 64, 65536])
def test_fnmr_at_fmr_equals_oml_on_continuous_distances(n_buckets):
    from raymetric.retrieval import own_rows

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(120, 6)).astype(np.float32)
    labels = rng.integers(0, 10, 120)
    ids = np.arange(120)
    dist, relevant = all_pair_distances(emb[:50], emb, labels[:50], labels, ids[:50], ids)
    counts = exact_counts(emb[:50], emb, labels[:50], labels, self_row=own_rows(torch.arange(50), torch.arange(120)))
    values = fnmr_at_fmr(lambda w: counts(w, n_buckets), FMRS, n_buckets)
    for fmr in FMRS:
        # Float32 distances from another formula may differ in the last bits; no positive lies that close
        # to a threshold here, so the values must be equal.
        threshold = np.quantile(dist[~relevant].astype(np.float32), [fmr])[0]
        assert np.abs(dist[relevant] - threshold).min() > 1e-5
        assert values[fmr_key(fmr)] == oml_fnmr(dist.astype(np.float32), relevant, fmr)


@pytest.mark.parametrize("n_buckets", [4, 65536])
def test_fnmr_at_fmr_equals_oml_on_tied_distances(n_buckets):
    # Integer points: few distinct distances, each shared by many pairs (a binned estimate was off by up
    # to 0.24 here). Squared distances are small integers, so every float32 computation is exact.
    rng = np.random.default_rng(8)
    query, gallery = rng.integers(0, 3, (40, 3)).astype(np.float32), rng.integers(0, 3, (70, 3)).astype(np.float32)
    ql, gl = rng.integers(0, 4, 40), rng.integers(0, 4, 70)
    qs, gs = rng.integers(-1, 5, 40), rng.integers(-1, 5, 70)
    dist, relevant = [], []
    for q in range(40):
        for g in range(70):
            if qs[q] != -1 and qs[q] == gs[g]:
                continue
            dist.append(np.sqrt(((query[q] - gallery[g]) ** 2).sum(), dtype=np.float32))
            relevant.append(ql[q] == gl[g])
    dist, relevant = np.array(dist, np.float32), np.array(relevant)
    counts = exact_counts(query, gallery, ql, gl, query_sequences=torch.from_numpy(qs),
                          gallery_sequences=torch.from_numpy(gs))
    passes = []
    values = fnmr_at_fmr(lambda w: passes.append(w) or counts(w, n_buckets), FMRS + [0.2, 0.25, 0.75], n_buckets)
    assert values == {fmr_key(fmr): oml_fnmr(dist, relevant, fmr) for fmr in FMRS + [0.2, 0.25, 0.75]}
    if n_buckets == 65536:
        assert len(passes) <= 3


def test_fnmr_at_fmr_docstring_case_and_threshold_between_values():
    # OML's example, then a threshold strictly between two far-apart negatives, with positives between
    # them: the relevant pairs above it need a pass of their own.
    query = np.zeros((1, 1), np.float32)
    gallery = np.array([[1.0], [2.0], [3.0], [10.0], [4.0], [5.0], [6.0], [7.0]], np.float32)
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 0])  # query label 0: negatives at 1 and 10, positives at 2 ... 7
    counts = exact_counts(query, gallery, np.zeros(1, np.int64), labels)
    passes = []
    values = fnmr_at_fmr(lambda w: passes.append(w) or counts(w, 65536), [0.3, 0.5], 65536)  # thresholds 3.7, 5.5
    assert values == {"fnmr@fmr=0.3": 4 / 6, "fnmr@fmr=0.5": 2 / 6}
    assert len(passes) == 3


def test_fnmr_threshold_is_not_rounded_to_float32():
    # Negatives at 1 and 2, a positive at float32(1.3) = 1.29999995: the fmr 0.3 threshold is 1.3 in
    # float64 (OML's), above the positive; rounded to float32 it would equal it and count it.
    gallery = np.array([[1.0], [2.0], [np.float32(1.3)]], np.float32)
    counts = exact_counts(np.zeros((1, 1), np.float32), gallery, np.zeros(1, np.int64), np.array([1, 1, 0]))
    assert fnmr_at_fmr(lambda w: counts(w, 65536), [0.3], 65536) == {"fnmr@fmr=0.3": 0.0}


def test_fnmr_refuses_overflowing_distances_and_distances_that_change_between_passes():
    big = np.array([[0.0], [2e19], [3.0], [1e19]], np.float32)
    counts = exact_counts(big[:1], big, np.zeros(1, np.int64), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="overflow float32"):
        fnmr_at_fmr(lambda w: counts(w, 64), [0.5], 64)

    rng = np.random.default_rng(2)
    emb, labels = rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 5, 40)
    counts = exact_counts(emb, emb, labels, labels)
    calls = []

    def drifting(windows):  # the second pass sees one pair moved to the lowest key
        out = counts(windows, 64)
        calls.append(windows)
        if len(calls) == 2:
            out[:, 0, 0] += 1
            out[:, 0, 1] -= 1
        return out

    with pytest.raises(RuntimeError, match="changed between counting passes"):
        fnmr_at_fmr(drifting, [0.5], 64)


def test_pair_distance_counts_match_brute_force_slots():
    from raymetric.retrieval import pair_distance_counts
    from raymetric.retrieval.pair_counts import distance_key, first_window

    rng = np.random.default_rng(4)
    query, gallery = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(30, 3)).astype(np.float32)
    ql, gl = rng.integers(0, 3, 7), rng.integers(0, 3, 30)
    qs, gs = rng.integers(-1, 3, 7), rng.integers(-1, 3, 30)
    windows = [(distance_key(0.5), 20), first_window(8), (distance_key(2.0), 23)]  # [0.5, ~1.5), all, [2, inf)
    counts = pair_distance_counts(torch.from_numpy(query), torch.from_numpy(gallery), query_labels=torch.from_numpy(ql),
                                  gallery_labels=torch.from_numpy(gl), windows=windows, n_buckets=8,
                                  self_row=torch.tensor([3, -1, 0, 29, -1, 5, 12]),
                                  query_sequences=torch.from_numpy(qs), gallery_sequences=torch.from_numpy(gs),
                                  max_block_elems=11)
    expected = np.zeros((3, 2, 10), np.int64)
    self_row = [3, -1, 0, 29, -1, 5, 12]
    for q in range(7):
        for g in range(30):
            if (qs[q] != -1 and qs[q] == gs[g]) or g == self_row[q]:
                continue
            key = distance_key(float(np.sqrt(((query[q].astype(np.float64) - gallery[g]) ** 2).sum())))
            for w, (lo, shift) in enumerate(windows):
                slot = 0 if key < lo else 9 if key >= lo + (8 << shift) else 1 + ((key - lo) >> shift)
                expected[w, int(ql[q] == gl[g]), slot] += 1
    # (Float32 distances may differ from rounded float64 ones by an ulp; no key lies that close to an edge here.)
    np.testing.assert_array_equal(counts.numpy(), expected)


def test_fnmr_without_pairs_is_zero():
    def no_pairs(windows):
        return torch.zeros(len(windows), 2, 6, dtype=torch.long)

    assert fnmr_at_fmr(no_pairs, [0.1], 4) == {"fnmr@fmr=0.1": 0.0}
    assert fnmr_at_fmr(no_pairs, [], 4) == {}
    with pytest.raises(ValueError, match="fmr"):
        fnmr_at_fmr(no_pairs, [1.5], 4)
    with pytest.raises(ValueError, match="power of two"):
        fnmr_at_fmr(no_pairs, [0.5], 5)


def oml_pcf(emb: np.ndarray, variances) -> list[float]:
    """OML's PCA.calc_principal_axes_number, in float64: SVD of the centred data."""
    centred = emb - emb.mean(0)
    singular = np.linalg.svd(centred, compute_uv=False)
    explained = singular**2 / (len(emb) - 1)
    cumulative = np.cumsum(explained / explained.sum())
    return [(np.searchsorted(cumulative, v, side="right") + 1) / emb.shape[1] for v in variances]


@pytest.mark.parametrize("shape", [(200, 16), (5, 12), (64, 64)])
def test_pcf_against_oml_formula(shape):
    rng = np.random.default_rng(shape[0])
    emb = rng.normal(size=shape) * np.linspace(3, 0.1, shape[1])  # decaying variances
    variances = [0.1, 0.5, 0.9, 0.99]
    assert EmbeddingMoments.of(emb).pcf(variances) == oml_pcf(emb, variances)
    # Moments add up: shards give the same answer.
    parts = EmbeddingMoments.of(emb[:3]) + EmbeddingMoments.of(emb[3:])
    assert parts.pcf(variances) == oml_pcf(emb, variances)


def test_pcf_degenerate_inputs_are_nan():
    assert all(math.isnan(v) for v in EmbeddingMoments.of(np.ones((1, 4))).pcf([0.5]))
    assert all(math.isnan(v) for v in EmbeddingMoments.of(np.ones((6, 4))).pcf([0.5]))  # no variance


def test_validation_report_keys_and_category_blocks():
    from raymetric.config import MetricArgs

    rng = np.random.default_rng(5)
    is_relevant, n_retrieved, n_gt, categories = random_case(9, n_query=40)
    emb = rng.normal(size=(60, 4))
    emb_categories = rng.choice(np.array(["shoes", "bags", "hats"]), 60)
    moments = {"": EmbeddingMoments.of(emb)} | {c: EmbeddingMoments.of(emb[emb_categories == c])
                                                 for c in ("bags", "hats", "shoes")}
    args = MetricArgs(cmc_top_k=[1], precision_top_k=[3], map_top_k=[3], fmr_vals=[0.5], pcf_variance=[0.5, 0.9])
    report = validation_report(is_relevant, n_retrieved, n_gt, args, categories=categories,
                               fnmr={"fnmr@fmr=0.5": 0.25}, moments=moments)
    block = ["cmc@1", "precision@3", "map@3"]
    assert list(report)[:8] == [*block, "fnmr@fmr=0.5", "pcf@0.5", "pcf@0.9", "n_queries", "n_queries_without_gt"]
    assert list(report)[8:13] == ["bags/" + k for k in [*block, "pcf@0.5", "pcf@0.9"]]  # no fnmr per category
    assert report["shoes/pcf@0.9"] == moments["shoes"].pcf([0.9])[0]
    plain = retrieval_metrics(is_relevant, n_retrieved, n_gt, cmc_top_k=[1], precision_top_k=[3], map_top_k=[3],
                              categories=categories)
    assert {k: v for k, v in report.items() if k in plain} == plain
    assert set(args.metric_names()) <= set(report)

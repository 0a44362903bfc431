"""Sharded, blocked top-k against a brute-force oracle: a per-query loop over all pairs, sorted by (dist, id).

Every test runs each candidate backend: torch with bfloat16 and float32 scores, and faiss. The result
must be the exact top-k whatever the backend: low precision only changes how many queries need a
second, wider round.
"""

import math
import os

import numpy as np
import pytest
import torch

from raymetric.retrieval import TopK, merge_topk, relevance, topk_shard

BACKENDS = [dict(backend="torch", score_dtype="bfloat16"), dict(backend="torch", score_dtype="float32"),
            dict(backend="faiss")]
BACKEND_IDS = ["torch-bf16", "torch-fp32", "faiss"]


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def backend(request):
    """Keyword arguments of topk_shard choosing the candidate backend."""
    return request.param


def brute_force(query, gallery, k, query_labels, gallery_labels, gallery_ids, query_ids=None,
                query_sequences=None, gallery_sequences=None):
    """Plain loops over every (query, gallery) pair, straight from REFERENCE.md §2.

    Distances are float64 from coordinate differences, rounded to float32 because that is the value
    ranking is defined on (ties of the float32 distance go to the smaller id).
    """
    query, gallery = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    dists, ids, n_gts = [], [], []
    for i in range(len(query)):
        candidates, n_gt = [], 0
        for j in range(len(gallery)):
            if query_ids is not None and query_ids[i] == gallery_ids[j]:
                continue
            if query_sequences is not None and query_sequences[i] != -1 and query_sequences[i] == gallery_sequences[j]:
                continue
            d = np.float32(math.sqrt(sum((a - b) ** 2 for a, b in zip(query[i], gallery[j]))))
            candidates.append((float(d), int(gallery_ids[j])))
            n_gt += int(query_labels[i] == gallery_labels[j])
        top = sorted(candidates)[:k]
        pad = k - len(top)
        dists.append([d for d, _ in top] + [math.inf] * pad)
        ids.append([g for _, g in top] + [-1] * pad)
        n_gts.append(n_gt)
    return np.array(dists, np.float32).reshape(-1, k), np.array(ids, np.int64).reshape(-1, k), np.array(n_gts)


def sharded(query, gallery, k, shard_sizes, *, seed, gallery_labels, gallery_ids, gallery_sequences=None,
            **kwargs):
    """Splits the gallery (in a shuffled order) into shards of the given sizes, searches each, merges."""
    order = torch.randperm(len(gallery), generator=torch.Generator().manual_seed(seed))
    assert sum(shard_sizes) == len(gallery)
    parts, start = [], 0
    for size in shard_sizes:
        rows = order[start:start + size]
        start += size
        parts.append(topk_shard(
            query, gallery[rows], k, gallery_labels=gallery_labels[rows], gallery_ids=gallery_ids[rows],
            gallery_sequences=None if gallery_sequences is None else gallery_sequences[rows], **kwargs))
    return merge_topk(parts, k)


def assert_matches(result: TopK, expected):
    dist, ids, n_gt = expected
    np.testing.assert_array_equal(result.gallery_ids.cpu().numpy(), ids)
    np.testing.assert_allclose(result.dist.cpu().numpy(), dist, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(result.n_gt.cpu().numpy(), n_gt)
    assert result.dist.dtype == torch.float32 and result.gallery_ids.dtype == torch.int64


def make_data(n_query, n_gallery, dim, *, seed, grid=False, n_labels=4, n_duplicates=0):
    """Random data with non-contiguous global ids; ``grid`` puts points on {0,1,2}^dim (heavy ties)."""
    gen = torch.Generator().manual_seed(seed)
    if grid:
        gallery = torch.randint(0, 3, (n_gallery, dim), generator=gen).float()
        query = torch.randint(0, 3, (n_query, dim), generator=gen).float()
    else:
        gallery = torch.randn(n_gallery, dim, generator=gen)
        query = torch.randn(n_query, dim, generator=gen)
    if n_duplicates:
        # Exact copies of gallery rows in the gallery and among the queries: ties at d > 0 and d = 0.
        src = torch.randint(0, n_gallery, (n_duplicates,), generator=gen)
        dst = torch.randint(0, n_gallery, (n_duplicates,), generator=gen)
        gallery[dst] = gallery[src]
        n_copies = min(n_duplicates // 2, n_query)
        query[:n_copies] = gallery[src[:n_copies]]
    gallery_labels = torch.randint(0, n_labels, (n_gallery,), generator=gen)
    query_labels = torch.randint(0, n_labels, (n_query,), generator=gen)
    gallery_ids = torch.randperm(3 * n_gallery, generator=gen)[:n_gallery]
    return query, gallery, query_labels, gallery_labels, gallery_ids


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("shard_sizes", [[60], [0, 3, 25, 1, 31], [7, 7, 7, 39]])
def test_sharded_equals_brute_force(grid, shard_sizes, backend):
    query, gallery, ql, gl, gids = make_data(23, 60, 3, seed=len(shard_sizes) + grid, grid=grid, n_duplicates=12)
    k = 9
    expected = brute_force(query, gallery, k, ql, gl, gids)
    result = sharded(query, gallery, k, shard_sizes, seed=1, query_labels=ql, gallery_labels=gl, gallery_ids=gids,
                     **backend)
    assert_matches(result, expected)
    if grid:  # the data really has ties at the cut-off and inside the top-k
        dist = expected[0]
        assert (dist[:, 1:] == dist[:, :-1]).any(1).all()


@pytest.mark.parametrize("max_block_elems", [1, 5, 37, 10**9])
def test_blocking_gives_the_same_result(max_block_elems):
    query, gallery, ql, gl, gids = make_data(19, 41, 4, seed=3, grid=True)
    kwargs = dict(query_labels=ql, gallery_labels=gl, gallery_ids=gids, query_ids=gids[:19],
                  query_sequences=torch.arange(19) % 3 - 1, gallery_sequences=torch.arange(41) % 4 - 1)
    reference = topk_shard(query, gallery, 6, max_block_elems=10**9, **kwargs)
    result = topk_shard(query, gallery, 6, max_block_elems=max_block_elems, **kwargs)
    for a, b in [(result.dist, reference.dist), (result.gallery_ids, reference.gallery_ids),
                 (result.n_gt, reference.n_gt)]:
        assert torch.equal(a, b)
    assert_matches(result, brute_force(query, gallery, 6, ql, gl, gids, gids[:19],
                                       kwargs["query_sequences"], kwargs["gallery_sequences"]))


def test_block_holds_at_most_max_block_elems(monkeypatch):
    import raymetric.retrieval.candidates as candidates

    shapes = []
    original = candidates._block_top

    def spy(scores, *args):
        shapes.append(tuple(scores.shape))
        return original(scores, *args)

    monkeypatch.setattr(candidates, "_block_top", spy)
    query, gallery, ql, gl, gids = make_data(50, 3000, 4, seed=4)
    kwargs = dict(query_labels=ql, gallery_labels=gl, gallery_ids=gids, extra=3)
    result = topk_shard(query, gallery, 5, max_block_elems=10000, **kwargs)
    assert max(q * g for q, g in shapes) <= 10000
    shapes.clear()
    topk_shard(query, gallery, 5, max_block_elems=128, **kwargs)
    assert max(q * g for q, g in shapes) <= 128  # column blocks: one query row exceeds the budget
    assert_matches(result, brute_force(query, gallery, 5, ql, gl, gids))


def test_group_preselection_equals_plain_topk():
    import raymetric.retrieval.candidates as candidates

    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(-40, 40, (30, 16 * 50), generator=gen).float()  # many ties
    scores[3] = float("-inf")  # a fully masked row
    scores[4, 100:] = float("-inf")  # fewer unmasked items than the width
    values, cols = candidates._block_top(scores, 12, 16)
    expected = scores.topk(12, dim=1).values
    assert torch.equal(values.sort(1, descending=True).values, expected)
    assert torch.equal(scores.gather(1, cols), values)  # the columns hold those values
    assert all(len(set(row)) == 12 for row in cols.tolist())


@pytest.mark.parametrize("grid", [False, True])
def test_self_masking_every_item_is_query_and_gallery(grid, backend):
    # Duplicated rows: a query ties at distance 0 with its copies, which sit in other shards.
    _, gallery, _, labels, ids = make_data(0, 70, 2, seed=5, grid=grid, n_duplicates=20)
    k = 12
    expected = brute_force(gallery, gallery, k, labels, labels, ids, query_ids=ids)
    result = sharded(gallery, gallery, k, [10, 0, 50, 10], seed=2, query_labels=labels, gallery_labels=labels,
                     gallery_ids=ids, query_ids=ids, **backend)
    assert_matches(result, expected)
    assert not (result.gallery_ids == ids[:, None]).any()  # a query never retrieves itself
    np.testing.assert_array_equal(result.n_gt.numpy(), np.bincount(labels)[labels] - 1)


def test_sequence_masking_and_minus_one_never_matches(backend):
    query, gallery, ql, gl, gids = make_data(30, 80, 3, seed=6, n_duplicates=8)
    gen = torch.Generator().manual_seed(7)
    # Half the items have no sequence (-1): they must not mask each other.
    query_sequences = torch.randint(-1, 3, (30,), generator=gen)
    gallery_sequences = torch.randint(-1, 3, (80,), generator=gen)
    query_ids = torch.cat([gids[:15], torch.full((15,), 10**6) + torch.arange(15)])  # half also in the gallery
    k = 20
    expected = brute_force(query, gallery, k, ql, gl, gids, query_ids, query_sequences, gallery_sequences)
    result = sharded(query, gallery, k, [33, 2, 45], seed=3, query_labels=ql, gallery_labels=gl,
                     gallery_ids=gids, gallery_sequences=gallery_sequences, query_ids=query_ids,
                     query_sequences=query_sequences, **backend)
    assert_matches(result, expected)

    id_to_seq = dict(zip(gids.tolist(), gallery_sequences.tolist()))
    retrieved_seq = torch.tensor([[id_to_seq.get(g, -2) for g in row] for row in result.gallery_ids.tolist()])
    has_seq = query_sequences[:, None] != -1
    assert not ((retrieved_seq == query_sequences[:, None]) & has_seq).any()
    assert ((retrieved_seq == -1) & ~has_seq).any()  # -1 queries do retrieve -1 items


def test_k_larger_than_gallery_pads(backend):
    query, gallery, ql, gl, gids = make_data(5, 4, 3, seed=8)
    query_ids = torch.tensor([int(gids[2]), -5, -5, -5, -5])  # only query 0 is in the gallery
    result = sharded(query, gallery, 10, [1, 0, 3], seed=4, query_labels=ql, gallery_labels=gl, gallery_ids=gids,
                     query_ids=query_ids, **backend)
    expected = brute_force(query, gallery, 10, ql, gl, gids, query_ids=query_ids)
    assert_matches(result, expected)
    assert (result.gallery_ids[:, 4:] == -1).all() and torch.isinf(result.dist[:, 4:]).all()
    assert (result.gallery_ids[0] >= 0).sum() == 3  # query 0 is gallery item 2 and skips it


def test_k_larger_than_every_shard(backend):
    query, gallery, ql, gl, gids = make_data(9, 50, 4, seed=19, n_duplicates=6)
    expected = brute_force(query, gallery, 30, ql, gl, gids)
    result = sharded(query, gallery, 30, [12, 7, 20, 11], seed=6, query_labels=ql, gallery_labels=gl,
                     gallery_ids=gids, **backend)
    assert_matches(result, expected)


def test_near_ties_below_score_precision_are_resolved_exactly(backend):
    # Items at distances 1 + j * 1e-7 from the query, far below bfloat16 (and near float32) score
    # resolution, with ids in reverse order of distance: only the exact re-rank orders them right,
    # and with bfloat16 scores the proof must send these queries round again.
    gen = torch.Generator().manual_seed(20)
    dim, n = 8, 300
    directions = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    radii = 1.0 + 1e-7 * torch.randperm(n, generator=gen).double()
    gallery = (directions * radii[:, None]).float()
    query = torch.zeros(3, dim)
    query[1, 0], query[2, 1] = 1e-3, -2e-3
    ids = torch.arange(n - 1, -1, -1)
    labels = torch.zeros(n, dtype=torch.long)
    expected = brute_force(query, gallery, 5, [0, 0, 0], labels, ids)
    result = topk_shard(query, gallery, 5, query_labels=[0, 0, 0], gallery_labels=labels, gallery_ids=ids,
                        extra=4, **backend)
    assert_matches(result, expected)
    if backend.get("score_dtype") == "bfloat16":  # float32 scores can separate some of these
        assert result.stats["queries_widened"] > 0


def test_exact_ties_wider_than_the_list(backend):
    # 40 copies of one point: the top-5 are the 5 smallest ids among them, found after the list
    # grows from 7 to 28 to 40 candidates.
    gen = torch.Generator().manual_seed(21)
    gallery = torch.randn(200, 6, generator=gen) * 3
    copies = torch.randperm(200, generator=gen)[:40]
    gallery[copies] = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    query = torch.zeros(2, 6)
    ids = torch.randperm(1000, generator=gen)[:200]
    labels = torch.arange(200) % 3
    expected = brute_force(query, gallery, 5, [0, 1], labels, ids)
    result = topk_shard(query, gallery, 5, query_labels=[0, 1], gallery_labels=labels, gallery_ids=ids,
                        extra=2, **backend)
    assert_matches(result, expected)
    assert sorted(ids[copies].tolist())[:5] == result.gallery_ids[0].tolist()
    assert result.stats["queries_widened"] == 2


def test_empty_gallery_and_empty_queries():
    query, gallery, ql, gl, gids = make_data(3, 5, 2, seed=9)
    empty = topk_shard(query, gallery[:0], 4, query_labels=ql, gallery_labels=gl[:0], gallery_ids=gids[:0])
    assert (empty.gallery_ids == -1).all() and torch.isinf(empty.dist).all() and (empty.n_gt == 0).all()
    none = topk_shard(query[:0], gallery, 4, query_labels=ql[:0], gallery_labels=gl, gallery_ids=gids)
    assert none.dist.shape == (0, 4) and none.n_gt.shape == (0,)
    assert merge_topk([none, none], 4).gallery_ids.shape == (0, 4)


def test_merge_is_independent_of_part_order_and_width():
    query, gallery, ql, gl, gids = make_data(11, 30, 2, seed=10, grid=True)
    shards = [slice(0, 4), slice(4, 20), slice(20, 30)]
    parts = [topk_shard(query, gallery[s], k, query_labels=ql, gallery_labels=gl[s], gallery_ids=gids[s])
             for s, k in zip(shards, [3, 8, 5])]
    expected = brute_force(query, gallery, 3, ql, gl, gids)
    for order in [(0, 1, 2), (2, 1, 0), (1, 2, 0)]:
        assert_matches(merge_topk([parts[i] for i in order], 3), expected)
    # A shard's own result is its top-k: merging it alone changes nothing.
    alone = merge_topk([parts[1]], 8)
    assert torch.equal(alone.gallery_ids, parts[1].gallery_ids) and torch.equal(alone.dist, parts[1].dist)


def test_real_item_at_infinity_ranks_before_padding():
    a = TopK(torch.tensor([[1.0, math.inf]]), torch.tensor([[3, 9]]), torch.tensor([0]))
    b = TopK(torch.tensor([[math.inf, math.inf]]), torch.tensor([[-1, -1]]), torch.tensor([0]))
    assert merge_topk([b, a], 3).gallery_ids.tolist() == [[3, 9, -1]]


def test_half_precision_inputs_are_upcast():
    query, gallery, ql, gl, gids = make_data(9, 20, 4, seed=11)
    query, gallery = query.to(torch.bfloat16), gallery.to(torch.float16)
    result = topk_shard(query.float(), gallery, 5, query_labels=ql, gallery_labels=gl, gallery_ids=gids)
    assert_matches(result, brute_force(query.float(), gallery.float(), 5, ql, gl, gids))
    result = topk_shard(query, gallery.to(torch.bfloat16), 5, query_labels=ql, gallery_labels=gl, gallery_ids=gids)
    assert result.dist.dtype == torch.float32


def test_unnormalised_embeddings_use_the_bias_column(backend):
    # Norms from 0.1 to 30: the bias -|g|^2 / 2 varies, so it goes into the score matrix.
    query, gallery, ql, gl, gids = make_data(17, 90, 5, seed=12)
    gallery = gallery * torch.logspace(-1, 1.5, 90)[:, None]
    result = sharded(query, gallery, 7, [20, 45, 25], seed=5, query_labels=ql, gallery_labels=gl, gallery_ids=gids,
                     **backend)
    assert_matches(result, brute_force(query, gallery, 7, ql, gl, gids))


def test_distances_match_cdist():
    query, gallery, ql, gl, gids = make_data(13, 40, 16, seed=13)
    result = topk_shard(query, gallery, 40, query_labels=ql, gallery_labels=gl, gallery_ids=gids)
    cdist = torch.cdist(query.double(), gallery.double())  # [Q, G]
    positions = torch.argsort(gids)[torch.searchsorted(gids.sort().values, result.gallery_ids)]
    torch.testing.assert_close(result.dist, cdist.gather(1, positions).float(), rtol=1e-6, atol=1e-6)


def test_relevance():
    query, gallery, ql, gl, gids = make_data(10, 25, 2, seed=14, grid=True)
    result = topk_shard(query, gallery, 30, query_labels=ql, gallery_labels=gl, gallery_ids=gids)
    label_of_id = torch.full((int(gids.max()) + 1,), -7)
    label_of_id[gids] = gl
    is_relevant, n_retrieved = relevance(result, ql, label_of_id)
    assert n_retrieved.tolist() == [25] * 10
    assert not is_relevant[:, 25:].any()
    for q in range(10):
        expected = [int(label_of_id[g]) == int(ql[q]) for g in result.gallery_ids[q, :25].tolist()]
        assert is_relevant[q, :25].tolist() == expected
    assert torch.equal(is_relevant.sum(1), result.n_gt)  # everything was retrieved


def test_bad_inputs_raise():
    query, gallery, ql, gl, gids = make_data(3, 5, 2, seed=15)
    with pytest.raises(ValueError, match="unique"):
        topk_shard(query, gallery, 2, query_labels=ql, gallery_labels=gl, gallery_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="both"):
        topk_shard(query, gallery, 2, query_labels=ql, gallery_labels=gl, gallery_ids=gids,
                   query_sequences=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        topk_shard(query, gallery, 2, query_labels=ql[:2], gallery_labels=gl, gallery_ids=gids)
    with pytest.raises(TypeError, match="integers"):
        topk_shard(query, gallery, 2, query_labels=ql.float(), gallery_labels=gl, gallery_ids=gids)
    with pytest.raises(ValueError, match="k must be"):
        topk_shard(query, gallery, 0, query_labels=ql, gallery_labels=gl, gallery_ids=gids)
    with pytest.raises(ValueError, match="backend"):
        topk_shard(query, gallery, 2, query_labels=ql, gallery_labels=gl, gallery_ids=gids, backend="annoy")
    gallery[2, 0] = math.nan
    with pytest.raises(ValueError, match=r"gallery_emb has non-finite values in rows \[2\]"):
        topk_shard(query, gallery, 2, query_labels=ql, gallery_labels=gl, gallery_ids=gids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_gallery, use_fused", [(200, False), (3000, False), (3000, True)])
def test_cuda_matches_cpu(n_gallery, use_fused, monkeypatch):
    import raymetric.retrieval.fused as fused

    monkeypatch.setattr(fused, "ENABLED", use_fused)  # 3000 items: enough for the fused Triton kernel
    query, gallery, ql, gl, gids = make_data(40, n_gallery, 8, seed=16, n_duplicates=30)
    seqs = torch.randint(-1, 5, (n_gallery,), generator=torch.Generator().manual_seed(1))
    kwargs = dict(query_labels=ql, gallery_labels=gl, gallery_ids=gids, query_ids=gids[:40], max_block_elems=9999,
                  query_sequences=seqs[:40], gallery_sequences=seqs, extra=8)
    cpu = topk_shard(query, gallery, 15, **kwargs)
    cuda = topk_shard(query.cuda(), gallery.cuda(), 15, **{key: v.cuda() if torch.is_tensor(v) else v
                                                           for key, v in kwargs.items()})
    assert cuda.dist.is_cuda
    assert torch.equal(cuda.gallery_ids.cpu(), cpu.gallery_ids)
    torch.testing.assert_close(cuda.dist.cpu(), cpu.dist, rtol=1e-6, atol=1e-6)
    assert torch.equal(cuda.n_gt.cpu(), cpu.n_gt)


FUSED_SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernel runs on the CPU
sys.path.insert(0, "tests")
import torch
import raymetric.retrieval.fused as fused
from raymetric.retrieval import topk_shard
from test_retrieval import assert_matches, brute_force, make_data

fused.ENABLED = True
calls = []
plain = fused.fused_candidates
fused.fused_candidates = lambda *a, **k: calls.append(1) or plain(*a, **k)
query, gallery, ql, gl, gids = make_data(30, 600, 6, seed=30, n_duplicates=40)
seqs = torch.randint(-1, 4, (600,), generator=torch.Generator().manual_seed(2))
kwargs = dict(query_labels=ql, gallery_labels=gl, gallery_ids=gids, query_ids=gids[:30], query_sequences=seqs[:30],
              gallery_sequences=seqs, extra=4, score_dtype="float32")
expected = brute_force(query, gallery, 5, ql, gl, gids, gids[:30], seqs[:30], seqs)
assert_matches(topk_shard(query, gallery, 5, **kwargs), expected)
fused.SLOTS_PER_QUERY = 20  # some queries keep more items than they have slots: the plain path takes them
assert_matches(topk_shard(query, gallery, 5, **kwargs), expected)
scaled = gallery * torch.logspace(-1, 1, 600)[:, None]  # unnormalised: the bias column
assert_matches(topk_shard(query, scaled, 7, query_labels=ql, gallery_labels=gl, gallery_ids=gids, extra=3,
                          score_dtype="float32"), brute_force(query, scaled, 7, ql, gl, gids))
assert len(calls) == 3, calls
print("ok")
"""


def test_fused_triton_kernel_in_the_interpreter():
    # The GPU path's kernel, run by Triton's CPU interpreter (float32 inputs there), against brute force.
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", FUSED_SCRIPT], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("seed", range(4))
def test_float_duplicates_tie_by_id_whatever_the_split(seed, backend):
    # Random float embeddings with exact copies, in 16 dims: the distance of a pair is computed pair
    # by pair, so copies tie exactly whatever the shard shapes, and ties go to the smaller id.
    query, gallery, ql, gl, gids = make_data(12, 150, 16, seed=100 + seed, n_duplicates=50)
    expected = brute_force(query, gallery, 8, ql, gl, gids)
    for sizes in ([150], [0, 3, 80, 1, 66], [75, 75]):
        result = sharded(query, gallery, 8, sizes, seed=seed, query_labels=ql, gallery_labels=gl, gallery_ids=gids,
                         max_block_elems=500, **backend)
        assert_matches(result, expected)

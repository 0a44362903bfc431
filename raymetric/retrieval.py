"""Exact top-k retrieval over one gallery shard, and merging shards into the global top-k.

This is the pure core of raymetric's validation: each Ray worker holds one gallery shard, calls
:func:`topk_shard` for every query, and the driver calls :func:`merge_topk` on the per-shard results.
Nothing of size queries x gallery is ever held: the shard is searched in blocks of at most
``max_block_elems`` distances, and only ``k`` candidates per query survive a block.

Semantics (OML's, REFERENCE.md §2):

* A gallery item is skipped for a query when it is the same dataset row (``query_ids[q] ==
  gallery_ids[g]``, "1 vs rest") or shares the query's sequence id (``-1`` = no sequence, never matches).
* Relevant = same label among the items that are not skipped; ``n_gt`` counts them.
* Distance = non-squared Euclidean. Ranking is by ``(distance, gallery id)``: ties go to the smaller id,
  so the merged result does not depend on how the gallery was split into shards.

Distances are computed as ``sqrt(|q|^2 + |g|^2 - 2 q.g)`` with one matmul per block (the formula behind
OML's ``torch.cdist``), but accumulated in float64 and then rounded to float32. The reason is
determinism, not accuracy alone: a float32 GEMM rounds differently for different matrix shapes, so the
same (query, item) pair could get a distance one ulp apart on two shard layouts, and exact ties (duplicate
images) would then break by noise instead of by id. In float64 the shape-dependent noise is ~1e-16, far
below float32 resolution, so the rounded float32 distance is the same whatever the layout (up to
vanishingly rare rounding-boundary cases). Squared distances within ``2**-36 * (|q|^2 + |g|^2)`` of zero
are set to exactly 0, because below that the float64 cancellation noise would otherwise decide (so
duplicates of a query tie at 0 and come out by id). ``compute_dtype=torch.float32`` gives OML's cdist
numbers with a matmul about 2.5x faster on CPU, but ties across shards are then only as good as float32
noise, and distances near 0 carry ``sqrt(eps * |q|^2)`` of it (up to ~1e-3 for unit vectors).

The k smallest entries of a block are found with ``torch.topk`` on int64 keys that pack ``(float32
distance bits, rank of the gallery id)``; every key is unique, so the selection is exact and stable.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["TopK", "topk_shard", "merge_topk", "relevance"]

# Squared distances below this fraction of |q|^2 + |g|^2 are float64 cancellation noise: report 0.
_ZERO_TOL_F64 = 2.0**-36
# Key of a skipped / absent gallery item: larger than any real key, so it always ranks last.
_SENTINEL = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF
_LITTLE_ENDIAN = sys.byteorder == "little"  # the low half of an int64 comes first in memory


@dataclass
class TopK:
    """Top-k gallery items per query, ranked by ``(distance, gallery id)``.

    Attributes:
        dist: ``[Q, k]`` float32 non-squared Euclidean distances, ascending; ``+inf`` in padding.
        gallery_ids: ``[Q, k]`` int64 global gallery ids; ``-1`` in padding (fewer than ``k`` items
            could be retrieved).
        n_gt: ``[Q]`` int64 number of relevant gallery items (same label, not skipped) in what was searched.
    """

    dist: torch.Tensor
    gallery_ids: torch.Tensor
    n_gt: torch.Tensor


def _as_long(x, name: str, n: int, device: torch.device) -> torch.Tensor:
    """Turns an array-like of ``n`` integer codes into an int64 tensor on ``device``."""
    t = torch.as_tensor(x, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.long()


def _block_keys(
    query_aug: torch.Tensor,
    query_sq: torch.Tensor,
    gallery_aug: torch.Tensor,
    gallery_sq: torch.Tensor,
    gallery_rank: torch.Tensor,
    finite: bool,
) -> torch.Tensor:
    """Sort keys of one [Qb, Gb] block: float32 distance bits in the high half, id rank in the low half.

    Non-negative float32 values order like their bit patterns read as integers, so comparing keys compares
    ``(distance, id rank)`` lexicographically, and every key in a shard is unique. ``torch.topk`` on the
    keys is therefore exact, with no tie left for it to break arbitrarily.

    ``query_aug`` is ``[q, |q|^2, 1]`` and ``gallery_aug`` is ``[-2 g, 1, |g|^2]``, so one matmul yields
    ``|q|^2 + |g|^2 - 2 q.g`` without a separate broadcast pass (the trick inside ``torch.cdist``).
    """
    d2 = query_aug @ gallery_aug.T  # [Qb, Gb] squared distances
    if d2.dtype == torch.float64:
        # Snap float64 cancellation noise to exactly 0. The test is per pair (it must not depend on the
        # block); a cheap block-wide bound finds the few candidates first. This also maps negative noise
        # and -0.0 (whose bits would sort first) to +0.0.
        bound = _ZERO_TOL_F64 * (query_sq.max() + gallery_sq.max())
        rows, cols = (d2 <= bound).nonzero(as_tuple=True)
        if rows.numel():
            zero = d2[rows, cols] <= _ZERO_TOL_F64 * (query_sq[rows] + gallery_sq[cols])
            d2[rows[zero], cols[zero]] = 0.0
    else:
        d2.masked_fill_(d2 <= 0.0, 0.0)  # clamp_min(0) would keep -0.0
    d2.sqrt_()  # [Qb, Gb] distances, still in the compute dtype
    if not _LITTLE_ENDIAN:
        dist = torch.nan_to_num_(d2.float(), nan=float("inf"))
        return torch.add(gallery_rank[None, :].long(), dist.view(torch.int32), alpha=2**32)
    # Write both halves of each int64 key in place: the rounding to float32 (what makes ties
    # layout-independent) lands straight in the high half, the rank in the low half. Two strided copies
    # instead of a float32 temporary, a cast to int64, a shift and an add.
    n_rows, n_cols = d2.shape
    keys = torch.empty((n_rows, n_cols), dtype=torch.int64, device=d2.device)  # [Qb, Gb]
    keys.view(torch.int32).view(n_rows, n_cols, 2)[..., 0].copy_(gallery_rank[None, :])
    dist = keys.view(torch.float32).view(n_rows, n_cols, 2)[..., 1]  # [Qb, Gb] strided view of the keys
    dist.copy_(d2)
    del d2
    if not finite or query_aug.dtype == torch.float32:
        # NaN (non-finite embeddings, or float32 overflow) ranks as +inf; a NaN with its sign bit set
        # would otherwise give a negative key and rank first.
        torch.nan_to_num_(dist, nan=float("inf"))
    return keys  # [Qb, Gb]


def _self_and_n_gt(query_labels, gallery_labels, ids_sorted, order, query_ids,
                   query_sequences, gallery_sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the shard position of its own row (-1 if absent) and ``n_gt``, from counts.

    ``n_gt`` = items with the query's label - those with its label and its sequence - its own row if
    that has its label and was not already counted with the sequence. O((Q + G) log G), never Q x G.
    """
    n_query, n_gallery = len(query_labels), len(gallery_labels)
    self_col = torch.full_like(query_labels, -1)  # [Q]
    if query_ids is not None and n_gallery:
        pos = torch.searchsorted(ids_sorted, query_ids).clamp_max_(n_gallery - 1)
        self_col = torch.where(ids_sorted[pos] == query_ids, order[pos], -1)

    # Dense codes for labels seen by either side, so counts can be looked up by index.
    codes, label_code = torch.unique(torch.cat([query_labels, gallery_labels]), return_inverse=True)
    n_gt = torch.bincount(label_code[n_query:], minlength=len(codes))[label_code[:n_query]]  # [Q]

    if query_sequences is not None and n_gallery:
        seq_codes, seq_code = torch.unique(torch.cat([query_sequences, gallery_sequences]), return_inverse=True)
        pair = label_code * len(seq_codes) + seq_code  # [Q + G] code of (label, sequence)
        query_pair, gallery_pair = pair[:n_query], pair[n_query:]
        gallery_pair = gallery_pair[gallery_sequences != -1]
        if gallery_pair.numel():
            uniq, counts = torch.unique(gallery_pair, return_counts=True)
            idx = torch.searchsorted(uniq, query_pair).clamp_max_(len(uniq) - 1)
            found = (uniq[idx] == query_pair) & (query_sequences != -1)
            n_gt -= torch.where(found, counts[idx], 0)

    if query_ids is not None and n_gallery:
        own = self_col.clamp_min(0)
        own_counted = (self_col >= 0) & (gallery_labels[own] == query_labels)
        if query_sequences is not None:
            own_counted &= ~((gallery_sequences[own] == query_sequences) & (query_sequences != -1))
        n_gt -= own_counted.long()
    return self_col, n_gt


def topk_shard(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    k: int,
    *,
    query_labels,
    gallery_labels,
    gallery_ids,
    query_ids=None,
    query_sequences=None,
    gallery_sequences=None,
    max_block_elems: int = 2**24,
    compute_dtype: torch.dtype = torch.float64,
) -> TopK:
    """Exact top-k of every query over one gallery shard.

    Work happens on the device of ``query_emb``. Peak extra memory is about ``max_block_elems * 20``
    bytes (the float64 block, its float32 distances, the int64 keys, a boolean mask), a
    ``compute_dtype`` copy of the shard and the ``[Q, k]`` result; never queries x gallery. ``n_gt``
    comes from label counts, not from the blocks. A distance that comes out NaN (non-finite
    embeddings) ranks as ``+inf``.

    Args:
        query_emb: ``[Q, D]`` query embeddings (float16/bfloat16 are upcast).
        gallery_emb: ``[G, D]`` embeddings of this shard's gallery items (``G`` may be 0).
        k: Number of items to keep per query; may exceed ``G`` (the rest is padding).
        query_labels: ``[Q]`` integer labels.
        gallery_labels: ``[G]`` integer labels.
        gallery_ids: ``[G]`` unique global ids (dataset row numbers); they break distance ties and are
            what the result reports.
        query_ids: ``[Q]`` global ids of the queries; a gallery item with the same id is the query
            itself and is skipped ("1 vs rest"). ``None``: queries are not in the gallery.
        query_sequences: ``[Q]`` int64 sequence codes; ``-1`` means no sequence.
        gallery_sequences: ``[G]`` int64 sequence codes; an item with the query's code (other than
            ``-1``) is skipped. Give both sequence arguments or neither.
        max_block_elems: Most distance entries held at once; blocks span queries and, when one query
            row alone is larger, gallery columns.
        compute_dtype: ``torch.float64`` (default: distances are layout-independent, see the module
            docstring) or ``torch.float32`` (faster; ties exact only within one matmul).

    Returns:
        :class:`TopK` with global gallery ids, ranked by ``(distance, gallery id)``.

    Example:
        >>> q = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
        >>> res = topk_shard(q, g, 3, query_labels=[7, 8], gallery_labels=[8, 7, 7, 7],
        ...                  gallery_ids=[10, 0, 11, 12], query_ids=[0, 10])
        >>> res.gallery_ids  # query 0 skips item 0 (itself); 10 and 11 tie at 1.0, the smaller id first
        tensor([[10, 11, 12],
                [ 0, 11, 12]])
        >>> res.dist
        tensor([[1.0000, 1.0000, 3.0000],
                [1.0000, 2.0000, 3.1623]])
        >>> res.n_gt  # label 7: items 11 and 12 (0 is the query itself); label 8: item 10 is query 1
        tensor([2, 0])
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_block_elems < 1:
        raise ValueError(f"max_block_elems must be >= 1, got {max_block_elems}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if (query_sequences is None) != (gallery_sequences is None):
        raise ValueError("give both query_sequences and gallery_sequences, or neither")
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            f"need [Q, D] and [G, D] embeddings, got {tuple(query_emb.shape)} and {tuple(gallery_emb.shape)}"
        )
    device = query_emb.device
    if gallery_emb.device != device:
        raise ValueError(f"query_emb is on {device} but gallery_emb on {gallery_emb.device}")
    n_query, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    if n_gallery >= 2**31:
        raise ValueError("a shard holds at most 2**31 - 1 items (id ranks live in the low 32 bits of a key)")

    query_labels = _as_long(query_labels, "query_labels", n_query, device)
    gallery_labels = _as_long(gallery_labels, "gallery_labels", n_gallery, device)
    gallery_ids = _as_long(gallery_ids, "gallery_ids", n_gallery, device)
    if query_ids is not None:
        query_ids = _as_long(query_ids, "query_ids", n_query, device)
    if query_sequences is not None:
        query_sequences = _as_long(query_sequences, "query_sequences", n_query, device)
        gallery_sequences = _as_long(gallery_sequences, "gallery_sequences", n_gallery, device)

    # Rank of each item's id inside the shard: keys carry the rank, so ties break by id without
    # reordering (copying) the gallery embeddings.
    ids_sorted, order = torch.sort(gallery_ids)  # [G]
    if n_gallery and (bool(ids_sorted[0] < 0) or bool((ids_sorted[1:] == ids_sorted[:-1]).any())):
        raise ValueError("gallery_ids must be unique and >= 0 within a shard (-1 marks padding)")
    gallery_rank = torch.empty_like(order)
    gallery_rank[order] = torch.arange(n_gallery, device=device)  # [G]
    gallery_rank = gallery_rank.to(torch.int32)  # [G] the low half of each key
    self_col, n_gt = _self_and_n_gt(query_labels, gallery_labels, ids_sorted, order, query_ids,
                                    query_sequences, gallery_sequences)

    gallery = gallery_emb.to(compute_dtype)  # [G, D]
    gallery_sq = (gallery * gallery).sum(1)  # [G]
    gallery_aug = torch.cat([-2.0 * gallery, torch.ones_like(gallery_sq)[:, None], gallery_sq[:, None]], 1)
    del gallery
    finite = bool(torch.isfinite(gallery_emb).all()) and bool(torch.isfinite(query_emb).all())

    cols_per_block = max(1, min(n_gallery, max_block_elems))
    rows_per_block = max(1, max_block_elems // cols_per_block)
    out_keys = torch.full((n_query, k), _SENTINEL, dtype=torch.int64, device=device)  # [Q, k]

    for qs in range(0, n_query, rows_per_block):
        qe = min(qs + rows_per_block, n_query)
        query = query_emb[qs:qe].to(compute_dtype)  # [Qb, D]
        query_sq = (query * query).sum(1)  # [Qb]
        query_aug = torch.cat([query, query_sq[:, None], torch.ones_like(query_sq)[:, None]], 1)  # [Qb, D + 2]
        best = None  # [Qb, <=k] the k smallest keys over the columns seen so far
        for cs in range(0, n_gallery, cols_per_block):
            ce = min(cs + cols_per_block, n_gallery)
            keys = _block_keys(query_aug, query_sq, gallery_aug[cs:ce], gallery_sq[cs:ce], gallery_rank[cs:ce],
                               finite)  # [Qb, Gb]
            if query_ids is not None:
                # The query's own row: one entry per row, set without a [Qb, Gb] mask or a host sync.
                col = self_col[qs:qe] - cs  # [Qb]
                inside = (col >= 0) & (col < ce - cs)
                col = col.clamp(0, ce - cs - 1)[:, None]  # [Qb, 1]
                keys.scatter_(1, col, torch.where(inside[:, None], _SENTINEL, keys.gather(1, col)))
            if query_sequences is not None:
                q_seq = query_sequences[qs:qe, None]  # [Qb, 1]
                keys.masked_fill_((q_seq == gallery_sequences[None, cs:ce]) & (q_seq != -1), _SENTINEL)
            keys = keys.topk(min(k, keys.shape[1]), dim=1, largest=False, sorted=False).values
            if best is not None:
                keys = torch.cat([best, keys], dim=1)  # [Qb, <=2k]
                keys = keys.topk(min(k, keys.shape[1]), dim=1, largest=False, sorted=False).values
            best = keys
        if best is not None:
            out_keys[qs:qe, : best.shape[1]] = best.sort(dim=1).values

    valid = out_keys != _SENTINEL  # [Q, k]
    rank = torch.where(valid, out_keys & _LOW32, 0)  # [Q, k]
    dist_bits = (out_keys >> 32).to(torch.int32)  # [Q, k]
    dist = torch.where(valid, dist_bits.view(torch.float32), float("inf"))
    if n_gallery:
        ids = torch.where(valid, ids_sorted[rank], -1)
    else:
        ids = torch.full_like(out_keys, -1)
    return TopK(dist=dist, gallery_ids=ids, n_gt=n_gt)


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Global top-k from the top-k of disjoint gallery shards.

    Ranks the union of the candidates by ``(distance, gallery id)``, the order :func:`topk_shard` uses
    inside a shard, so the result equals one search over the whole gallery however it was split.

    Args:
        parts: Results for the same queries over disjoint shards; their widths may differ.
        k: Width of the result (padded with ``+inf`` / ``-1`` when fewer candidates exist).

    Returns:
        The merged :class:`TopK`; ``n_gt`` is the sum over the shards.

    Example:
        >>> a = TopK(torch.tensor([[1.0, 2.0]]), torch.tensor([[5, 3]]), torch.tensor([1]))
        >>> b = TopK(torch.tensor([[1.0, float("inf")]]), torch.tensor([[4, -1]]), torch.tensor([2]))
        >>> m = merge_topk([a, b], 4)
        >>> m.gallery_ids, m.dist, m.n_gt
        (tensor([[ 4,  5,  3, -1]]), tensor([[1., 1., 2., inf]]), tensor([3]))
    """
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_query = parts[0].dist.shape[0]
    for part in parts:
        if part.dist.shape != part.gallery_ids.shape or part.dist.shape[0] != n_query:
            raise ValueError("all parts must cover the same queries with [Q, k_i] dist and gallery_ids")
    dist = torch.cat([p.dist for p in parts], dim=1)  # [Q, sum k_i]
    ids = torch.cat([p.gallery_ids for p in parts], dim=1)  # [Q, sum k_i]
    n_gt = torch.stack([p.n_gt for p in parts]).sum(0)  # [Q]

    # Lexicographic sort by (dist, id) as two stable sorts: by id first, then by distance. Padding
    # (-1) gets the largest id so it stays behind a real item at +inf.
    sort_ids = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    order = torch.sort(sort_ids, dim=1, stable=True).indices
    dist, ids = dist.gather(1, order), ids.gather(1, order)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]  # [Q, <=k]
    dist, ids = dist.gather(1, order), ids.gather(1, order)

    n_pad = k - dist.shape[1]
    if n_pad > 0:
        dist = torch.cat([dist, dist.new_full((n_query, n_pad), float("inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((n_query, n_pad), -1)], dim=1)
    return TopK(dist=dist, gallery_ids=ids, n_gt=n_gt)


def relevance(topk: TopK, query_labels, label_of_id) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of each retrieved item, the input of :func:`raymetric.metrics.retrieval_metrics`.

    Args:
        topk: Merged result.
        query_labels: ``[Q]`` integer labels of the queries.
        label_of_id: ``[N]`` integer label of every global id (indexed by the ids in ``topk``).

    Returns:
        ``is_relevant`` (``[Q, k]`` bool, False in padding) and ``n_retrieved`` (``[Q]`` int64, the
        number of non-padding entries).

    Example:
        >>> t = TopK(torch.tensor([[0.5, 1.0, float("inf")]]), torch.tensor([[2, 0, -1]]), torch.tensor([2]))
        >>> relevance(t, [1], label_of_id=[1, 0, 0])
        (tensor([[False,  True, False]]), tensor([2]))
    """
    ids = topk.gallery_ids
    valid = ids >= 0  # [Q, k]
    label_of_id = torch.as_tensor(label_of_id, device=ids.device).long()
    query_labels = torch.as_tensor(query_labels, device=ids.device).long()
    retrieved_labels = label_of_id[ids.clamp_min(0)]  # [Q, k] padding reads id 0, masked just below
    is_relevant = valid & (retrieved_labels == query_labels[:, None])
    return is_relevant, valid.sum(1)

"""Exact top-k of queries over one gallery shard: fast low-precision candidates, exact re-rank, proof.

1. Candidates: the ``k + extra`` best items of each query by a low-precision score
   (:mod:`raymetric.retrieval.candidates`; torch or faiss, bfloat16 or float32).
2. Re-rank: exact distances of the candidates (:mod:`raymetric.retrieval.exact`), ranked by
   ``(distance, gallery id)``.
3. Proof: every item left off a query's list has a low-precision score at most ``outside``, and a
   true score at most ``outside + offset + bound``, so a true distance at least ``sqrt(|q|^2 -
   2 (outside + offset + bound))``. When that lower bound, rounded the way exact distances are,
   exceeds the k-th exact distance on the list, no left-out item can enter the top-k, not even by a
   tie. Queries where it does not (near-duplicates around the k-th place, exact ties wider than the
   list) are searched again with a list four times longer, until the proof holds or the list holds
   the whole shard.

So the result is the exact top-k for every query, whatever the score dtype; the low precision only
decides how often step 3 sends a query round again (counted in ``TopK.stats``).
"""

from __future__ import annotations

import torch

from raymetric.retrieval.candidates import (
    Candidates,
    ScoringGallery,
    faiss_candidates,
    faiss_index,
    score_error_bound,
    scoring_dtype,
    scoring_gallery,
    squared_norms,
    torch_candidates,
)
from raymetric.retrieval import fused
from raymetric.retrieval.exact import exact_distances
from raymetric.retrieval.results import TopK, sort_by_dist_then_id

BACKENDS = ("torch", "faiss")
_EPS64 = 2.0**-53


def _as_long(x, name: str, n: int, device: torch.device) -> torch.Tensor:
    """Turns an array-like of ``n`` integer codes into an int64 tensor on ``device``."""
    t = torch.as_tensor(x, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.long()


def own_rows(query_ids, gallery_ids) -> torch.Tensor:
    """``[Q]`` row of each query's own item among ``gallery_ids`` (``-1`` where it is not there).

    >>> own_rows(torch.tensor([5, 7, 9]), torch.tensor([9, 2, 5]))
    tensor([ 2, -1,  0])
    """
    gallery_ids = torch.as_tensor(gallery_ids)
    return _find_rows(*torch.sort(gallery_ids), torch.as_tensor(query_ids, device=gallery_ids.device))


def _find_rows(ids_sorted: torch.Tensor, order: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """:func:`own_rows` with the gallery ids already sorted (``torch.sort``'s values and indices)."""
    if len(ids_sorted) == 0:
        return torch.full_like(query_ids, -1)
    pos = torch.searchsorted(ids_sorted, query_ids).clamp_max_(len(ids_sorted) - 1)
    return torch.where(ids_sorted[pos] == query_ids, order[pos], -1)


def _self_and_n_gt(query_labels, gallery_labels, ids_sorted, order, query_ids,
                   query_sequences, gallery_sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the shard row of its own item (-1 if absent) and ``n_gt``, from counts.

    ``n_gt`` = items with the query's label - those with its label and its sequence - its own row if
    that has its label and was not already counted with the sequence. O((Q + G) log G), never Q x G.
    """
    n_query, n_gallery = len(query_labels), len(gallery_labels)
    self_row = torch.full_like(query_labels, -1) if query_ids is None else _find_rows(ids_sorted, order, query_ids)

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
        own = self_row.clamp_min(0)
        own_counted = (self_row >= 0) & (gallery_labels[own] == query_labels)
        if query_sequences is not None:
            own_counted &= ~((gallery_sequences[own] == query_sequences) & (query_sequences != -1))
        n_gt -= own_counted.long()
    return self_row, n_gt


def certify(outside: torch.Tensor, offset: float, bound: torch.Tensor, query_sq: torch.Tensor,
            kth_dist: torch.Tensor, dim: int) -> torch.Tensor:
    """Whether no item left off a query's list can rank among its exact top-k (see the module docstring).

    Args:
        outside: ``[Q]`` float64 low-precision score no left-out item exceeds (``-inf``: none left out).
        offset: Added to low-precision scores to get scores.
        bound: ``[Q]`` float64 bound on the error of a low-precision score.
        query_sq: ``[Q]`` float64 ``|q|^2``.
        kth_dist: ``[Q]`` float32 exact k-th distance on the list (``+inf`` when it has fewer items).
        dim: Embedding size (for the float64 rounding of exact distances).

    Returns:
        ``[Q]`` bool.

    Example:
        >>> certify(torch.tensor([0.0, 0.4, float("-inf")], dtype=torch.float64), 0.0,
        ...         torch.full((3,), 0.01, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
        ...         torch.tensor([0.5, 0.5, float("inf")]), dim=2)
        tensor([ True, False,  True])
    """
    top_score = outside + offset + bound  # the largest true score a left-out item can have
    d2 = query_sq - 2 * top_score
    # Rounding of the exact (float64) distances and of this very computation.
    slack = 2 * (dim + 8) * _EPS64 * (query_sq.abs() + 2 * top_score.abs())
    d2 = d2 * (1 - 2 * (dim + 4) * _EPS64) - slack
    lower = d2.clamp_min(0).sqrt().to(torch.float32)  # rounded as exact distances are: monotone
    return torch.isneginf(outside) | (lower > kth_dist)


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
    score_dtype: str | torch.dtype = "auto",
    backend: str = "torch",
    extra: int = 16,
    scoring: ScoringGallery | None = None,
) -> TopK:
    """Exact top-k of every query over one gallery shard.

    Work happens on the device of ``query_emb``. Memory: one ``[rows, cols]`` block of
    ``max_block_elems`` low-precision scores, a score-dtype copy of the shard, and ``[Q, k + extra]``
    candidate lists; never queries x gallery. ``n_gt`` comes from label counts.

    Args:
        query_emb: ``[Q, D]`` query embeddings (finite).
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
        max_block_elems: Most low-precision scores held at once.
        score_dtype: ``"auto"``, ``"bfloat16"``, ``"float32"`` (or a torch dtype) for the candidate
            scores; the result is exact either way.
        backend: ``"torch"`` or ``"faiss"`` (float32 scores) for the candidates.
        extra: Candidates per query beyond ``k``; more means fewer second rounds, at a small cost.
        scoring: The shard prepared by :func:`raymetric.retrieval.candidates.scoring_gallery` in the
            score dtype, to reuse across calls over the same shard (else prepared here).

    Returns:
        :class:`TopK` with global gallery ids, ranked by ``(distance, gallery id)``; ``stats`` counts
        ``queries`` and ``queries_widened`` (needed a longer list).

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
    if extra < 0:
        raise ValueError(f"extra must be >= 0, got {extra}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if (query_sequences is None) != (gallery_sequences is None):
        raise ValueError("give both query_sequences and gallery_sequences, or neither")
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            f"need [Q, D] and [G, D] embeddings, got {tuple(query_emb.shape)} and {tuple(gallery_emb.shape)}"
        )
    device = query_emb.device
    if gallery_emb.device != device:
        raise ValueError(f"query_emb is on {device} but gallery_emb on {gallery_emb.device}")
    for name, emb in (("query_emb", query_emb), ("gallery_emb", gallery_emb)):
        for start in range(0, emb.shape[0], 65536):  # in blocks: no [G, D] mask of a large gallery
            bad = ~torch.isfinite(emb[start:start + 65536]).all(1)
            if bool(bad.any()):
                rows = (bad.nonzero().squeeze(1) + start)[:10].tolist()
                raise ValueError(f"{name} has non-finite values in rows {rows}")
    n_query, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    dim = query_emb.shape[1]

    query_labels = _as_long(query_labels, "query_labels", n_query, device)
    gallery_labels = _as_long(gallery_labels, "gallery_labels", n_gallery, device)
    gallery_ids = _as_long(gallery_ids, "gallery_ids", n_gallery, device)
    if query_ids is not None:
        query_ids = _as_long(query_ids, "query_ids", n_query, device)
    if query_sequences is not None:
        query_sequences = _as_long(query_sequences, "query_sequences", n_query, device)
        gallery_sequences = _as_long(gallery_sequences, "gallery_sequences", n_gallery, device)

    ids_sorted, order = torch.sort(gallery_ids)  # [G]
    if n_gallery and (bool(ids_sorted[0] < 0) or bool((ids_sorted[1:] == ids_sorted[:-1]).any())):
        raise ValueError("gallery_ids must be unique and >= 0 within a shard (-1 marks padding)")
    self_row, n_gt = _self_and_n_gt(query_labels, gallery_labels, ids_sorted, order, query_ids,
                                    query_sequences, gallery_sequences)

    dist = torch.full((n_query, k), float("inf"), device=device)  # [Q, k]
    ids = torch.full((n_query, k), -1, dtype=torch.int64, device=device)  # [Q, k]
    stats = {"queries": n_query, "queries_widened": 0}
    if n_query == 0 or n_gallery == 0:
        return TopK(dist, ids, n_gt, stats)

    dtype = scoring_dtype(backend, score_dtype, device)
    gallery_exact = gallery_emb if gallery_emb.dtype == torch.float64 else gallery_emb.float()
    query_exact = query_emb if query_emb.dtype == torch.float64 else query_emb.float()
    if scoring is None or scoring.dtype != dtype or scoring.matrix.shape[0] != n_gallery:
        scoring = scoring_gallery(gallery_exact, dtype)
    index = faiss_index(scoring) if backend == "faiss" else None
    query_sq = squared_norms(query_exact)  # [Q]
    bound = score_error_bound(query_sq.sqrt(), scoring)  # [Q]

    def candidates(rows: torch.Tensor, width: int) -> Candidates:
        masks = dict(
            self_row=None if query_ids is None else self_row[rows],
            query_sequences=None if query_sequences is None else query_sequences[rows],
            gallery_sequences=gallery_sequences,
        )
        if backend == "faiss":
            return faiss_candidates(query_exact[rows], scoring, width, index=index, **masks)
        if width == first_width and fused.available(device, scoring.dtype):  # GPUs: no score matrix in memory
            return fused.fused_candidates(query_exact[rows], scoring, width, max_block_elems=max_block_elems, **masks)
        return torch_candidates(query_exact[rows], scoring, width, max_block_elems=max_block_elems, **masks)

    pending = torch.arange(n_query, device=device)
    width = first_width = min(k + extra, n_gallery)
    while pending.numel():
        # Rows per round keep the [rows, width] lists within the block budget.
        step = max(1, min(len(pending), max_block_elems // width, 65536))
        retry = []
        for start in range(0, len(pending), step):
            rows = pending[start:start + step]
            cand = candidates(rows, width)
            cand_ids = torch.where(cand.rows >= 0, gallery_ids[cand.rows.clamp_min(0)], -1)  # [r, W]
            cand_dist = exact_distances(query_exact[rows], gallery_exact, cand.rows,
                                        max(2**21, max_block_elems // 8))  # [r, W]
            top_dist, top_ids = sort_by_dist_then_id(cand_dist, cand_ids, k)  # [r, k]
            ok = certify(cand.outside, scoring.offset, bound[rows], query_sq[rows], top_dist[:, k - 1], dim)
            dist[rows[ok]], ids[rows[ok]] = top_dist[ok], top_ids[ok]
            retry.append(rows[~ok])
        pending = torch.cat(retry)
        if pending.numel():
            if width >= n_gallery:
                raise RuntimeError("a list holding the whole shard failed its proof; this is a bug")
            stats["queries_widened"] += int(pending.numel()) if width == first_width else 0
            width = min(width * 4, n_gallery)
    return TopK(dist, ids, n_gt, stats)

"""Histograms of the distances of all (query, gallery item) pairs, split into relevant and not.

``fnmr@fmr`` needs a quantile of the distances of *every* non-relevant pair, which OML gets from a full
ranking (``queries x gallery`` values). Fixed-bin histograms instead are small (``[2, n_bins]``
counts), add up across gallery shards and query chunks, and are filled block by block, so no full
distance matrix is ever held. :func:`raymetric.metrics.fnmr_at_fmr` reads the metric off them.
"""

from __future__ import annotations

import torch


def histogram_range(*embeddings: torch.Tensor) -> float:
    """Upper end of the histogram range: no distance between these embeddings exceeds it.

    ``|q - g| <= |q| + |g| <= 2 max |x|`` (triangle inequality); every shard must use the same range.

    >>> histogram_range(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]))
    10.0
    """
    norms = [float(e.double().norm(dim=1).max()) for e in embeddings if len(e)]
    return 2 * max(norms, default=0.0) or 1.0


def pair_distance_histogram(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    *,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    max_dist: float,
    n_bins: int,
    self_row: torch.Tensor | None = None,
    query_sequences: torch.Tensor | None = None,
    gallery_sequences: torch.Tensor | None = None,
    max_block_elems: int = 2**22,
) -> torch.Tensor:
    """Counts of pair distances in ``n_bins`` equal bins over ``[0, max_dist]``.

    Skipped pairs (the query's own item, the same sequence) are not counted. Distances are float32
    (``sqrt(|q|^2 + |g|^2 - 2 q.g)``, as ``torch.cdist`` computes them): a pair near a bin edge may
    land in the neighbouring bin.

    Args:
        query_emb: ``[Q, D]``.
        gallery_emb: ``[G, D]``.
        query_labels: ``[Q]`` int64.
        gallery_labels: ``[G]`` int64.
        max_dist: Upper end of the range (:func:`histogram_range`); larger distances go to the last bin.
        n_bins: Number of bins.
        self_row: ``[Q]`` gallery row of each query's own item, ``-1`` if none
            (:func:`raymetric.retrieval.own_rows`).
        query_sequences: ``[Q]`` sequence codes (``-1`` = none).
        gallery_sequences: ``[G]`` sequence codes.
        max_block_elems: Most pairs held at once.

    Returns:
        ``[2, n_bins]`` int64: row 0 non-relevant pairs, row 1 relevant pairs.

    Example:
        >>> q, g = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0], [3.0, 4.0], [0.0, 0.0]])
        >>> pair_distance_histogram(q, g, query_labels=torch.tensor([1]), gallery_labels=torch.tensor([1, 2, 1]),
        ...                         max_dist=10.0, n_bins=5, self_row=torch.tensor([2]))
        tensor([[0, 0, 1, 0, 0],
                [1, 0, 0, 0, 0]])
    """
    device = query_emb.device
    counts = torch.zeros(2 * n_bins + 1, dtype=torch.int64, device=device)  # the last slot: skipped pairs
    n_query, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    if n_query == 0 or n_gallery == 0:
        return counts[:-1].view(2, n_bins)
    gallery = gallery_emb.float()
    gallery_sq = gallery.square().sum(1)  # [G]
    cols_per_block = max(1, min(n_gallery, max_block_elems))
    rows_per_block = max(1, max_block_elems // cols_per_block)
    scale = n_bins / max_dist
    for rs in range(0, n_query, rows_per_block):
        re = min(rs + rows_per_block, n_query)
        query = query_emb[rs:re].float()
        query_sq = query.square().sum(1)  # [r]
        for cs in range(0, n_gallery, cols_per_block):
            ce = min(cs + cols_per_block, n_gallery)
            d2 = torch.addmm(gallery_sq[None, cs:ce], query, gallery[cs:ce].T, alpha=-2.0)  # [r, c]
            d2.add_(query_sq[:, None]).clamp_min_(0)
            bins = d2.sqrt_().mul_(scale).to(torch.int64).clamp_(0, n_bins - 1)  # [r, c]
            del d2
            relevant = query_labels[rs:re, None] == gallery_labels[None, cs:ce]  # [r, c]
            bins.add_(relevant.to(torch.int64) * n_bins)
            if self_row is not None:
                local = self_row[rs:re] - cs
                hit = ((local >= 0) & (local < ce - cs)).nonzero().squeeze(1)
                bins[hit, local[hit]] = 2 * n_bins
            if query_sequences is not None:
                q_seq = query_sequences[rs:re, None]
                bins.masked_fill_((q_seq == gallery_sequences[None, cs:ce]) & (q_seq != -1), 2 * n_bins)
            counts += torch.bincount(bins.view(-1), minlength=2 * n_bins + 1)
    return counts[:-1].view(2, n_bins)

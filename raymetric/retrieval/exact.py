"""Exact distances of chosen (query, gallery item) pairs: the values every ranking is defined on.

``d(q, g) = float32(sqrt(sum_i (q_i - g_i)^2))`` with the differences, squares and sum in float64. It is
computed pair by pair, so it is the same number whatever the gallery's split into shards, blocks or
candidate lists, and two items tie exactly when their rounded float32 distances are equal (duplicates
tie at 0). Ties then go to the smaller gallery id.
"""

from __future__ import annotations

import torch

# Elements of the float64 [rows, cols, D] temporary of one block.
DEFAULT_PAIR_BLOCK_ELEMS = 2**21


def exact_distances(query: torch.Tensor, gallery: torch.Tensor, cols: torch.Tensor,
                    max_block_elems: int = DEFAULT_PAIR_BLOCK_ELEMS) -> torch.Tensor:
    """Exact distance from each query to the gallery rows named in its row of ``cols``.

    Args:
        query: ``[Q, D]`` embeddings.
        gallery: ``[G, D]`` embeddings.
        cols: ``[Q, C]`` int64 gallery rows; ``-1`` marks an empty slot.
        max_block_elems: Most elements of the ``[rows, cols, D]`` float64 temporary.

    Returns:
        ``[Q, C]`` float32 distances; ``+inf`` in empty slots.

    Example:
        >>> q = torch.tensor([[0.0, 0.0]])
        >>> exact_distances(q, torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[1, 0, -1]]))
        tensor([[1., 5., inf]])
    """
    n_query, n_cols = cols.shape
    dim = query.shape[1]
    out = torch.full((n_query, n_cols), float("inf"), dtype=torch.float32, device=query.device)
    if n_query == 0 or n_cols == 0 or gallery.shape[0] == 0:
        return out
    cols_per_block = max(1, min(n_cols, max_block_elems // max(dim, 1)))
    rows_per_block = max(1, max_block_elems // (cols_per_block * max(dim, 1)))
    for rs in range(0, n_query, rows_per_block):
        re = min(rs + rows_per_block, n_query)
        q = query[rs:re].to(torch.float64)[:, None, :]  # [r, 1, D]
        for cs in range(0, n_cols, cols_per_block):
            ce = min(cs + cols_per_block, n_cols)
            c = cols[rs:re, cs:ce]  # [r, c]
            g = gallery[c.clamp_min(0)].to(torch.float64)  # [r, c, D]
            d2 = g.sub_(q).square_().sum(-1)  # [r, c]
            dist = d2.sqrt_().to(torch.float32)
            out[rs:re, cs:ce] = torch.where(c >= 0, dist, float("inf"))
    return out


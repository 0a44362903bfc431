"""Retrieval metrics from merged top-k results, with OML's definitions (REFERENCE.md §2).

For a query whose top ``k' = min(k, n_retrieved)`` items have relevance ``g_1..g_k'``:

* ``cmc@k`` = 1 if any ``g_i`` is relevant, else 0.
* ``precision@k`` = ``sum(g_i) / min(n_gt, k')`` (not divided by ``k``).
* ``map@k`` = ``(1 / n_k) * sum_i (n_i / i) * g_i``, ``n_i`` = hits in the top ``i``, ``n_k`` = hits in the
  top ``k'``; 0 when there is no hit.

OML's corner cases are kept in the per-query functions: nothing retrieved and ``n_gt == 0`` gives 1.0,
nothing retrieved and ``n_gt > 0`` gives 0.0, items retrieved but ``n_gt == 0`` gives cmc 0, map 0 and
precision NaN. :func:`retrieval_metrics` decides what to do with queries without relevant items.

All inputs are array-likes (torch tensors or NumPy arrays); per-query results are float64 tensors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["cmc_at_k", "precision_at_k", "map_at_k", "retrieval_metrics"]


def _prepare(is_relevant, n_retrieved, n_gt, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the inputs; returns the hits of the top ``k'`` ([Q, k] bool), ``k'`` ([Q]) and ``n_gt``."""
    is_relevant = torch.as_tensor(is_relevant)
    if is_relevant.ndim != 2:
        raise ValueError(f"is_relevant must be [Q, k], got shape {tuple(is_relevant.shape)}")
    device = is_relevant.device
    n_retrieved = torch.as_tensor(n_retrieved, device=device).long()
    n_gt = torch.as_tensor(n_gt, device=device).long()
    n_query, width = is_relevant.shape
    if n_retrieved.shape != (n_query,) or n_gt.shape != (n_query,):
        raise ValueError("n_retrieved and n_gt must have shape [Q], one entry per row of is_relevant")
    if not 1 <= k <= width:
        # A larger k would silently be evaluated on fewer items than asked for.
        raise ValueError(f"k must be in [1, {width}] (the width of is_relevant), got {k}")
    k_eff = n_retrieved.clamp(0, k)  # [Q] k'
    in_top = torch.arange(k, device=device)[None, :] < k_eff[:, None]  # [Q, k]
    hits = is_relevant[:, :k].bool() & in_top  # [Q, k]
    return hits, k_eff, n_gt


def _nothing_retrieved(value: torch.Tensor, k_eff: torch.Tensor, n_gt: torch.Tensor) -> torch.Tensor:
    """OML's rule for a query with nothing retrieved: 1.0 if it has no relevant item either, else 0.0."""
    return torch.where(k_eff == 0, (n_gt == 0).double(), value)


def cmc_at_k(is_relevant, n_retrieved, n_gt, k: int) -> torch.Tensor:
    """Per-query CMC@k: 1 if a relevant item is among the top ``k'`` retrieved.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K >= k``.
        n_retrieved: ``[Q]`` number of non-padding items per query.
        n_gt: ``[Q]`` number of relevant gallery items per query.
        k: Cut-off.

    Returns:
        ``[Q]`` float64.

    Example:
        >>> cmc_at_k([[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]], [3, 3, 0, 0], [1, 1, 0, 2], k=2)
        tensor([1., 0., 1., 0.], dtype=torch.float64)
    """
    hits, k_eff, n_gt = _prepare(is_relevant, n_retrieved, n_gt, k)
    return _nothing_retrieved(hits.any(1).double(), k_eff, n_gt)


def precision_at_k(is_relevant, n_retrieved, n_gt, k: int) -> torch.Tensor:
    """Per-query precision@k = hits in the top ``k'`` / ``min(n_gt, k')``, OML's definition.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K >= k``.
        n_retrieved: ``[Q]`` number of non-padding items per query.
        n_gt: ``[Q]`` number of relevant gallery items per query.
        k: Cut-off.

    Returns:
        ``[Q]`` float64; NaN where items were retrieved but ``n_gt == 0`` (as in OML).

    Example:
        >>> precision_at_k([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], [5, 5], [3, 1], k=5)
        tensor([0.6667, 1.0000], dtype=torch.float64)
        >>> precision_at_k([[0, 0], [0, 0]], [2, 0], [0, 0], k=2)  # OML: NaN, then 1.0
        tensor([nan, 1.], dtype=torch.float64)
    """
    hits, k_eff, n_gt = _prepare(is_relevant, n_retrieved, n_gt, k)
    # 0 / 0 = NaN where n_gt == 0 and something was retrieved, as OML gives.
    value = hits.sum(1).double() / torch.minimum(n_gt, k_eff).double()
    return _nothing_retrieved(value, k_eff, n_gt)


def map_at_k(is_relevant, n_retrieved, n_gt, k: int) -> torch.Tensor:
    """Per-query mean average precision@k, normalised by the hits found (OML), 0 without a hit.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K >= k``.
        n_retrieved: ``[Q]`` number of non-padding items per query.
        n_gt: ``[Q]`` number of relevant gallery items per query.
        k: Cut-off.

    Returns:
        ``[Q]`` float64.

    Example:
        >>> map_at_k([[1, 0, 1, 0, 0]], [5], [3], k=5)  # (1/1 + 2/3) / 2
        tensor([0.8333], dtype=torch.float64)
    """
    hits, k_eff, n_gt = _prepare(is_relevant, n_retrieved, n_gt, k)
    hits = hits.double()  # [Q, k]
    n_hits = hits.cumsum(1)  # [Q, k] n_i
    positions = torch.arange(1, k + 1, device=hits.device, dtype=torch.float64)  # [k] i
    value = (n_hits / positions * hits).sum(1) / n_hits[:, -1].clamp_min(1)
    return _nothing_retrieved(value, k_eff, n_gt)


def _mean_block(values: dict[str, torch.Tensor], use: torch.Tensor, n_without_gt: int, prefix: str) -> dict:
    """Means of the per-query ``values`` over the queries in ``use``, plus the query counts."""
    out: dict[str, float] = {}
    n_used = int(use.sum())
    for name, per_query in values.items():
        # No query to average (all lack relevant items under "exclude"): 0.0 keeps the metric finite
        # and comparable for checkpointing; the counts below say why.
        out[prefix + name] = float(per_query[use].mean()) if n_used else 0.0
    out[prefix + "n_queries"] = int(use.numel())
    out[prefix + "n_queries_without_gt"] = n_without_gt
    return out


def retrieval_metrics(
    is_relevant,
    n_retrieved,
    n_gt,
    *,
    cmc_top_k: Sequence[int] = (1, 5),
    precision_top_k: Sequence[int] = (5,),
    map_top_k: Sequence[int] = (5,),
    categories: Sequence | None = None,
    queries_without_gt: str = "exclude",
) -> dict[str, float]:
    """Mean retrieval metrics over queries, overall and per category.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K`` >= every top-k.
        n_retrieved: ``[Q]`` number of non-padding items per query (``<= K``).
        n_gt: ``[Q]`` number of relevant gallery items per query.
        cmc_top_k: Cut-offs for ``cmc@k``.
        precision_top_k: Cut-offs for ``precision@k``.
        map_top_k: Cut-offs for ``map@k``.
        categories: Optional ``[Q]`` str/int category of each query: adds a block of keys
            ``<category>/<metric>`` averaged over that category's queries.
        queries_without_gt: ``"exclude"`` (default, pytorch-metric-learning's choice): queries with
            ``n_gt == 0`` are left out of every average and only counted in ``n_queries_without_gt``.
            If no query is left in a block, its metrics are 0.0 (finite, so checkpointing on them still
            works; ``n_queries == n_queries_without_gt`` tells why). ``"oml"``: every query is
            averaged with OML's per-query values, so a query with retrieved items but ``n_gt == 0``
            makes ``precision@k`` NaN, exactly as OML reports it.

    Returns:
        Flat dict: ``cmc@k``, ``precision@k``, ``map@k`` (float means), ``n_queries`` (all queries
        given) and ``n_queries_without_gt`` (ints), then the same keys prefixed by ``<category>/`` for
        each category in sorted order.

    Example:
        >>> m = retrieval_metrics([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], [5, 5], [3, 0],
        ...                       cmc_top_k=(1,), precision_top_k=(5,), map_top_k=(5,))
        >>> {key: round(v, 4) for key, v in m.items()}
        {'cmc@1': 1.0, 'precision@5': 0.6667, 'map@5': 0.8333, 'n_queries': 2, 'n_queries_without_gt': 1}
        >>> retrieval_metrics([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], [5, 5], [3, 0], cmc_top_k=(),
        ...                   precision_top_k=(5,), map_top_k=(), queries_without_gt="oml")
        {'precision@5': nan, 'n_queries': 2, 'n_queries_without_gt': 1}
    """
    if queries_without_gt not in ("exclude", "oml"):
        raise ValueError(f'queries_without_gt must be "exclude" or "oml", got {queries_without_gt!r}')
    per_query: dict[str, torch.Tensor] = {}  # name -> [Q]
    for name, fn, ks in (("cmc", cmc_at_k, cmc_top_k), ("precision", precision_at_k, precision_top_k),
                         ("map", map_at_k, map_top_k)):
        for k in ks:
            per_query[f"{name}@{k}"] = fn(is_relevant, n_retrieved, n_gt, int(k))

    is_relevant = torch.as_tensor(is_relevant)
    n_query = is_relevant.shape[0]
    no_gt = torch.as_tensor(n_gt, device=is_relevant.device).reshape(-1) == 0  # [Q]
    if no_gt.numel() != n_query:
        raise ValueError("n_gt must have one entry per row of is_relevant")
    use = ~no_gt if queries_without_gt == "exclude" else torch.ones_like(no_gt)  # [Q]

    def block(members: torch.Tensor, prefix: str) -> dict:
        sub = {name: v[members] for name, v in per_query.items()}
        return _mean_block(sub, use[members], int(no_gt[members].sum()), prefix)

    out = block(torch.ones_like(no_gt), "")
    if categories is not None:
        categories = np.asarray(categories)
        if categories.shape != (n_query,):
            raise ValueError(f"categories must have shape ({n_query},), got {categories.shape}")
        for category in np.unique(categories):
            members = torch.as_tensor(categories == category, device=no_gt.device)  # [Q]
            out.update(block(members, f"{category}/"))
    return out

"""Top-k results of a gallery shard, merging shards into the global top-k, and relevance of the hits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

_ID_PAD_KEY = torch.iinfo(torch.int64).max  # padding (-1) sorts behind every real id


@dataclass
class TopK:
    """Top-k gallery items per query, ranked by ``(distance, gallery id)``.

    Attributes:
        dist: ``[Q, k]`` float32 non-squared Euclidean distances, ascending; ``+inf`` in padding.
        gallery_ids: ``[Q, k]`` int64 global gallery ids; ``-1`` in padding (fewer than ``k`` items
            could be retrieved).
        n_gt: ``[Q]`` int64 number of relevant gallery items (same label, not skipped) in what was searched.
        stats: Counters of the search (queries, queries that needed a wider candidate list, ...);
            summed by :func:`merge_topk`.
    """

    dist: torch.Tensor
    gallery_ids: torch.Tensor
    n_gt: torch.Tensor
    stats: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, rows) -> "TopK":
        """The results of some queries (``rows``: a slice, indices or a boolean mask)."""
        return TopK(self.dist[rows], self.gallery_ids[rows], self.n_gt[rows], dict(self.stats))

    @staticmethod
    def cat(parts: Sequence["TopK"]) -> "TopK":
        """Results of disjoint query sets, one after the other (all of the same width)."""
        return TopK(torch.cat([p.dist for p in parts]), torch.cat([p.gallery_ids for p in parts]),
                    torch.cat([p.n_gt for p in parts]), _sum_stats(parts))

    def to(self, device) -> "TopK":
        return TopK(self.dist.to(device), self.gallery_ids.to(device), self.n_gt.to(device), dict(self.stats))


def sort_by_dist_then_id(dist: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` columns of each row ordered by ``(dist, id)``, padded with ``(+inf, -1)``.

    Two stable sorts: by id first, then by distance. Padding (``id == -1``) sorts behind a real item
    at ``+inf``.

    >>> sort_by_dist_then_id(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([[0, 9, 4]]), 4)
    (tensor([[1., 1., 2., inf]]), tensor([[ 4,  9,  0, -1]]))
    """
    sort_ids = torch.where(ids < 0, _ID_PAD_KEY, ids)
    order = torch.sort(sort_ids, dim=1, stable=True).indices
    dist, ids = dist.gather(1, order), ids.gather(1, order)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]  # [Q, <=k]
    dist, ids = dist.gather(1, order), ids.gather(1, order)
    n_pad = k - dist.shape[1]
    if n_pad > 0:
        dist = torch.cat([dist, dist.new_full((dist.shape[0], n_pad), float("inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], n_pad), -1)], dim=1)
    return dist, ids


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Global top-k from the top-k of disjoint gallery shards.

    Ranks the union of the candidates by ``(distance, gallery id)``, the order
    :func:`raymetric.retrieval.topk_shard` uses inside a shard, so the result equals one search over
    the whole gallery however it was split.

    Args:
        parts: Results for the same queries over disjoint shards; their widths may differ.
        k: Width of the result (padded with ``+inf`` / ``-1`` when fewer candidates exist).

    Returns:
        The merged :class:`TopK`; ``n_gt`` and ``stats`` are summed over the shards.

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
    dist, ids = sort_by_dist_then_id(dist, ids, k)
    return TopK(dist=dist, gallery_ids=ids, n_gt=n_gt, stats=_sum_stats(parts))


def _sum_stats(parts: Sequence[TopK]) -> dict[str, int]:
    """The parts' search statistics (queries, queries widened), added up key by key."""
    stats: dict[str, int] = {}
    for part in parts:
        for key, value in part.stats.items():
            stats[key] = stats.get(key, 0) + value
    return stats


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

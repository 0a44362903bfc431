"""Post-processing of retrieval results, off by default: query expansion and distance thresholding.

Each step takes ``(query_emb, query_rows, topk, searcher)`` and returns ``(query_emb, topk)``;
``searcher`` is whatever searched (in-process, Ray Train workers or Ray Data shards), so a step may
search again. Steps run in the order ``retrieval.postprocessing`` lists them, before the metrics.
"""

from __future__ import annotations

import torch

from raymetric.retrieval import TopK


class QueryExpansion:
    """Average query expansion: each query becomes the mean of itself and its nearest gallery items.

    Then the whole gallery is searched again with the expanded queries (Chum et al., 2007; Radenovic
    et al., 2018). It helps when a query's nearest neighbours are right and lead to the relevant items
    the query alone misses.

    Args:
        n_neighbours: Gallery items averaged into each query (at most the search's k).
        normalise: L2-normalise the expanded queries (for extractors that normalise their output).
    """

    def __init__(self, n_neighbours: int = 2, normalise: bool = True):
        if n_neighbours < 1:
            raise ValueError(f"n_neighbours must be >= 1, got {n_neighbours}")
        self.n_neighbours = n_neighbours
        self.normalise = normalise

    def __call__(self, query_emb: torch.Tensor, query_rows: torch.Tensor, topk: TopK, searcher):
        if self.n_neighbours > topk.gallery_ids.shape[1]:
            raise ValueError(f"query_expansion: n_neighbours={self.n_neighbours} exceeds the search's k="
                             f"{topk.gallery_ids.shape[1]}")
        ids = topk.gallery_ids[:, : self.n_neighbours]  # [Q, n]
        neighbours = searcher.gallery_embeddings(ids).to(query_emb)  # [Q, n, D], zeros for padding
        count = 1 + (ids >= 0).sum(1, keepdim=True)  # [Q, 1]
        expanded = (query_emb + neighbours.sum(1)) / count  # [Q, D]
        if self.normalise:
            expanded = torch.nn.functional.normalize(expanded, dim=1)
        return expanded, searcher.search(expanded, query_rows)


class DistanceThreshold:
    """Drops retrieved items farther than ``max_distance``: they count as not retrieved.

    A query then retrieves fewer than k items, and the metrics use ``k' = min(k, retrieved)`` (OML's
    rule): with nothing left, the query scores 1.0 if it has no relevant item, else 0.0.

    Example:
        >>> t = TopK(torch.tensor([[0.2, 0.9, 1.5]]), torch.tensor([[4, 1, 7]]), torch.tensor([2]))
        >>> _, out = DistanceThreshold(1.0)(None, None, t, None)
        >>> out.gallery_ids, out.dist
        (tensor([[ 4,  1, -1]]), tensor([[0.2000, 0.9000,    inf]]))
    """

    def __init__(self, max_distance: float):
        if not max_distance >= 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.max_distance = max_distance

    def __call__(self, query_emb, query_rows, topk: TopK, searcher):
        far = topk.dist > self.max_distance  # [Q, k]; items are sorted, so padding stays at the end
        return query_emb, TopK(topk.dist.masked_fill(far, float("inf")), topk.gallery_ids.masked_fill(far, -1),
                               topk.n_gt, dict(topk.stats))


def apply_postprocessing(steps: list, query_emb: torch.Tensor, query_rows: torch.Tensor, topk: TopK, searcher) -> TopK:
    """Runs the steps in order; returns the final results."""
    for step in steps:
        query_emb, topk = step(query_emb, query_rows, topk, searcher)
    return topk


POSTPROCESSORS = {"query_expansion": QueryExpansion, "distance_threshold": DistanceThreshold}


def build_postprocessor(name: str, args: dict | None = None):
    """The post-processing step registered as ``name``."""
    if name not in POSTPROCESSORS:
        raise ValueError(f"unknown post-processing step {name!r}; known: {sorted(POSTPROCESSORS)}")
    return POSTPROCESSORS[name](**(args or {}))


def build_postprocessors(blocks) -> list:
    """Steps from config blocks (``retrieval.postprocessing``)."""
    return [build_postprocessor(b.name, b.args) for b in blocks]

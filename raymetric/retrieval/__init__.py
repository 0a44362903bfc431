"""Exact top-k retrieval over gallery shards: the pure core of raymetric's validation.

Each worker (a Ray Train rank, a Ray Data task, or the driver itself) holds one gallery shard and calls
:func:`topk_shard` for the queries; :func:`merge_topk` merges the shards' results into the global top-k.
Nothing of size queries x gallery is ever held.

Semantics (OML's, REFERENCE.md §2):

* A gallery item is skipped for a query when it is the same dataset row (``query_ids[q] ==
  gallery_ids[g]``, "1 vs rest") or shares the query's sequence id (``-1`` = no sequence, never matches).
* Relevant = same label among the items that are not skipped; ``n_gt`` counts them.
* Distance = non-squared Euclidean, computed exactly per pair (float64, rounded to float32;
  :mod:`raymetric.retrieval.exact`). Ranking is by ``(distance, gallery id)``: ties go to the smaller
  id, so the merged result does not depend on how the gallery was split into shards or blocks.

Speed comes from low-precision candidate scores (bfloat16 or float32 matmuls,
:mod:`raymetric.retrieval.candidates`); exactness from re-ranking the candidates exactly and proving
that nothing left out could rank higher (:mod:`raymetric.retrieval.shard`).
"""

from raymetric.retrieval.exact import exact_distances
from raymetric.retrieval.pair_counts import pair_distance_counts
from raymetric.retrieval.results import TopK, merge_topk, relevance, sort_by_dist_then_id
from raymetric.retrieval.shard import certify, own_rows, topk_shard

__all__ = ["TopK", "topk_shard", "merge_topk", "relevance", "exact_distances", "certify", "sort_by_dist_then_id",
           "own_rows", "pair_distance_counts"]

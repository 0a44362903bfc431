"""Searching validation queries against a gallery held in this process, in query chunks.

The stand-alone validation job uses it when the gallery fits the memory budget; the sharded searches
(Ray Train workers in :mod:`raymetric.evaluation`, Ray Data tasks in :mod:`raymetric.validate`) run the
same kernel, :func:`raymetric.retrieval.topk_shard`, on their shards. Every searcher offers
``search(query_emb, query_rows) -> TopK`` and ``gallery_embeddings(ids)``, which is what the
post-processing steps (:mod:`raymetric.postprocessing`) need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymetric.retrieval import TopK, own_rows, pair_distance_counts, topk_shard
from raymetric.retrieval.candidates import scoring_dtype, scoring_gallery


@dataclass
class SearchSettings:
    """What :func:`raymetric.retrieval.topk_shard` needs besides the data (from ``RetrievalConfig``)."""

    k: int
    backend: str = "torch"
    score_dtype: str = "auto"
    extra: int = 16
    max_block_elems: int = 2**24
    query_chunk: int = 4096

    @classmethod
    def from_config(cls, retrieval, k: int, device: torch.device) -> "SearchSettings":
        """``retrieval``: ``raymetric.config.RetrievalConfig``; the block size default depends on the device."""
        max_block = retrieval.max_block_elems or (2**28 if device.type == "cuda" else 2**24)
        return cls(k=k, backend=retrieval.backend, score_dtype=retrieval.score_dtype,
                   extra=retrieval.extra_candidates, max_block_elems=max_block, query_chunk=retrieval.query_chunk)

    def shard_kwargs(self) -> dict:
        return dict(backend=self.backend, score_dtype=self.score_dtype, extra=self.extra,
                    max_block_elems=self.max_block_elems)


class LocalSearcher:
    """Exact top-k over the gallery items of a set of embeddings held in this process.

    Args:
        embeddings: ``[N, D]`` every validation item (queries and gallery), row = id.
        labels: ``[N]`` int64.
        is_gallery: ``[N]`` bool.
        sequences: ``[N]`` int64 codes, ``-1`` = none; None when there are no sequences.
        settings: Search settings.
    """

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, is_gallery: torch.Tensor,
                 sequences: torch.Tensor | None, settings: SearchSettings):
        self.embeddings, self.labels, self.sequences, self.settings = embeddings, labels, sequences, settings
        device = embeddings.device
        self.gallery_ids = is_gallery.nonzero().squeeze(1)  # [G]
        # All items in the gallery (1 vs rest): no copy of the embeddings.
        self.gallery_emb = embeddings if bool(is_gallery.all()) else embeddings[self.gallery_ids]
        self.gallery_labels = labels[self.gallery_ids]
        self.gallery_sequences = None if sequences is None else sequences[self.gallery_ids]
        dtype = scoring_dtype(settings.backend, settings.score_dtype, device)
        self.scoring = scoring_gallery(self.gallery_emb, dtype)

    def search(self, query_emb: torch.Tensor, query_rows: torch.Tensor) -> TopK:
        """Exact top-k of the given query embeddings; ``query_rows`` name the queries' own items."""
        parts = []
        chunk = self.settings.query_chunk
        for start in range(0, max(len(query_rows), 1), chunk):
            rows = query_rows[start:start + chunk]
            parts.append(topk_shard(
                query_emb[start:start + chunk], self.gallery_emb, self.settings.k,
                query_labels=self.labels[rows], gallery_labels=self.gallery_labels, gallery_ids=self.gallery_ids,
                query_ids=rows,
                query_sequences=None if self.sequences is None else self.sequences[rows],
                gallery_sequences=self.gallery_sequences,
                scoring=self.scoring, **self.settings.shard_kwargs()))
        return TopK.cat(parts)

    def gallery_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` embeddings of gallery ids (zeros for ``-1``)."""
        emb = self.embeddings[ids.clamp_min(0)]
        return emb * (ids >= 0)[..., None]

    def pair_counts(self, query_emb: torch.Tensor, query_rows: torch.Tensor, windows: list[tuple[int, int]],
                    n_buckets: int) -> torch.Tensor:
        """Distance counts of all (query, gallery item) pairs in key windows (for fnmr@fmr;
        :func:`raymetric.retrieval.pair_distance_counts`)."""
        total = torch.zeros(len(windows), 2, n_buckets + 2, dtype=torch.int64)
        for start in range(0, len(query_rows), self.settings.query_chunk):
            rows = query_rows[start:start + self.settings.query_chunk]
            total += pair_distance_counts(
                query_emb[start:start + self.settings.query_chunk], self.gallery_emb,
                query_labels=self.labels[rows], gallery_labels=self.gallery_labels, windows=windows,
                n_buckets=n_buckets, self_row=own_rows(rows, self.gallery_ids),
                query_sequences=None if self.sequences is None else self.sequences[rows],
                gallery_sequences=self.gallery_sequences, max_block_elems=self.settings.max_block_elems // 4)
        return total


def searcher_fnmr(searcher, query_emb: torch.Tensor, query_rows: torch.Tensor, metric_args) -> dict[str, float] | None:
    """``fnmr@fmr`` of a searcher's queries against its gallery (any searcher with ``pair_counts``; a
    collective for the distributed one); None when ``metric_args.fmr_vals`` asks for none."""
    from raymetric.metrics import fnmr_at_fmr

    if not metric_args.fmr_vals:
        return None
    return fnmr_at_fmr(lambda windows: searcher.pair_counts(query_emb, query_rows, windows, metric_args.fmr_bins),
                       metric_args.fmr_vals, metric_args.fmr_bins)


def check_retrieval_config(retrieval, metric_args) -> None:
    """Checks ``retrieval`` (``RetrievalConfig``) against ``metric_args``; raises ConfigError naming the key."""
    from raymetric.config import ConfigError, check_args
    from raymetric.postprocessing import POSTPROCESSORS

    for i, block in enumerate(retrieval.postprocessing):
        key = f"retrieval.postprocessing.{i}"
        if block.name not in POSTPROCESSORS:
            raise ConfigError(f"config key {key}.name: unknown name {block.name!r}; known: {sorted(POSTPROCESSORS)}")
        check_args(key, POSTPROCESSORS[block.name], block.args)
        try:
            step = POSTPROCESSORS[block.name](**block.args)
        except Exception as err:
            raise ConfigError(f"config key {key}: {type(err).__name__}: {err}") from None
        n = getattr(step, "n_neighbours", 0)
        if n > metric_args.max_k:
            raise ConfigError(f"config key {key}.args.n_neighbours={n} exceeds the largest k of metric_args "
                              f"({metric_args.max_k}): the search keeps that many neighbours")
    if retrieval.backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ConfigError("config key retrieval.backend: faiss is not installed") from None

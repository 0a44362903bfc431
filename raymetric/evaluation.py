"""Retrieval validation across workers that each hold a shard of the validation embeddings.

Each worker embeds its own contiguous share of the validation rows and keeps it: its gallery items
are its gallery shard. Query embeddings travel in fixed-size chunks (all-gathered in rank order),
every worker computes the exact top-k of each chunk over its own shard, and the small per-shard
top-k results are all-gathered and merged. Nothing of size queries x gallery exists anywhere, and no
worker ever holds the whole gallery. ``n_gt``, the pair-distance counts of ``fnmr@fmr`` and the
embedding moments of ``pcf`` are sums over shards. Every worker ends with the same metrics, computed
by the same code as the stand-alone job's (:func:`raymetric.metrics.validation_report`).

Plain ``torch.distributed``; with world size 1 it is ordinary single-process retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from raymetric.distributed import all_gather_nograd, all_gather_variable, all_reduce_max, all_reduce_sum, world
from raymetric.metrics import EmbeddingMoments, metric_args_per_query, validation_report
from raymetric.postprocessing import apply_postprocessing, build_postprocessors
from raymetric.retrieval import TopK, merge_topk, own_rows, pair_distance_counts, relevance, topk_shard
from raymetric.retrieval.candidates import scoring_dtype, scoring_gallery
from raymetric.search import SearchSettings, searcher_fnmr


@dataclass
class ValidationRows:
    """Metadata of every validation row, identical on every worker (indexed by row position)."""

    labels: np.ndarray  # [N] int64
    is_query: np.ndarray  # [N] bool
    is_gallery: np.ndarray  # [N] bool
    sequences: np.ndarray  # [N] int64 codes, -1 = no sequence
    categories: np.ndarray | None  # [N] str, or None without a category column

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "ValidationRows":
        from raymetric.data.csv import encode_sequences

        sequences = encode_sequences(df["sequence"]) if "sequence" in df else np.full(len(df), -1, np.int64)
        sequences = np.where(sequences < 0, -1, sequences)  # rows without a sequence: -1, which never matches
        categories = df["category"].astype(str).to_numpy() if "category" in df else None
        return cls(
            # Copies: pandas hands out read-only views, which torch warns about.
            labels=np.array(df["label"], dtype=np.int64),
            is_query=np.array(df["is_query"], dtype=bool),
            is_gallery=np.array(df["is_gallery"], dtype=bool),
            sequences=np.asarray(sequences, np.int64),
            categories=categories,
        )

    @property
    def has_sequences(self) -> bool:
        return bool((self.sequences != -1).any())


def shard_rows(n_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Row positions of worker ``rank``'s contiguous share (sizes differ by at most one).

    >>> [shard_rows(5, r, 2).tolist() for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    return np.array_split(np.arange(n_rows), world_size)[rank]


@torch.no_grad()
def embed(model: torch.nn.Module, loader, device: torch.device, autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[n, D]`` (float32) and dataset indices ``[n]`` of every item of ``loader``.

    ``model`` must not be DDP-wrapped: workers embed different numbers of batches, and DDP's forward
    would wait for the others.
    """
    was_training = model.training
    model.eval()
    embs, indices = [], []
    for batch in loader:
        if len(batch["index"]) == 0:  # every image of the batch was unreadable (on_bad_image: skip)
            continue
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            embs.append(model(images).float())
        indices.append(torch.as_tensor(batch["index"]))
    model.train(was_training)
    if not embs:
        return torch.zeros((0, getattr(model, "feat_dim", 0)), device=device), torch.zeros(0, dtype=torch.int64)
    return torch.cat(embs), torch.cat(indices).long()


class DistributedSearcher:
    """Exact top-k over a gallery sharded across workers. Every method is collective.

    Args:
        emb: ``[n, D]`` this worker's embeddings.
        row_ids: ``[n]`` their validation row positions (disjoint across workers).
        rows: Metadata of all validation rows.
        settings: Search settings; ``query_chunk`` queries per worker per round bound a round's memory.
    """

    def __init__(self, emb: torch.Tensor, row_ids: torch.Tensor, rows: ValidationRows, settings: SearchSettings):
        device = emb.device
        self.device, self.settings, self.dim = device, settings, emb.shape[1]
        self.labels = torch.as_tensor(rows.labels, device=device)
        self.sequences = torch.as_tensor(rows.sequences, device=device) if rows.has_sequences else None
        row_ids = row_ids.to(device)
        is_gallery = torch.as_tensor(rows.is_gallery, device=device)[row_ids]
        self.gallery_emb, self.gallery_ids = emb[is_gallery], row_ids[is_gallery]  # this worker's gallery shard
        self.gallery_labels = self.labels[self.gallery_ids]
        self.gallery_sequences = None if self.sequences is None else self.sequences[self.gallery_ids]
        dtype = scoring_dtype(settings.backend, settings.score_dtype, device)
        self.scoring = scoring_gallery(self.gallery_emb, dtype)

    def _rounds(self, n_local: int) -> int:
        n = int(all_reduce_max(torch.tensor(n_local, device=self.device)).item())
        return -(-n // self.settings.query_chunk)

    def _gathered_chunks(self, query_emb: torch.Tensor, query_ids: torch.Tensor):
        """Yields ``(round_emb [W*C, D], round_ids [W*C], start)``: every worker's next chunk, ``-1`` = padding."""
        chunk = self.settings.query_chunk
        for r in range(self._rounds(len(query_ids))):
            chunk_emb = query_emb[r * chunk:(r + 1) * chunk]
            chunk_ids = query_ids[r * chunk:(r + 1) * chunk]
            pad = chunk - len(chunk_ids)  # equal shapes for the gathers
            chunk_emb = torch.cat([chunk_emb, chunk_emb.new_zeros((pad, self.dim))])
            chunk_ids = torch.cat([chunk_ids, chunk_ids.new_full((pad,), -1)])
            yield all_gather_nograd(chunk_emb), all_gather_nograd(chunk_ids), r * chunk

    def search(self, query_emb: torch.Tensor, query_ids: torch.Tensor) -> TopK:
        """Exact top-k over the whole gallery of this worker's queries (``query_ids``: their rows)."""
        rank, world_size = world()
        chunk, k = self.settings.query_chunk, self.settings.k
        query_ids = query_ids.to(self.device)
        out = []
        for round_emb, round_ids, start in self._gathered_chunks(query_emb, query_ids):
            safe = round_ids.clamp_min(0)
            part = topk_shard(
                round_emb, self.gallery_emb, k,
                query_labels=torch.where(round_ids >= 0, self.labels[safe], -1),
                gallery_labels=self.gallery_labels, gallery_ids=self.gallery_ids, query_ids=round_ids,
                query_sequences=None if self.sequences is None else torch.where(round_ids >= 0, self.sequences[safe], -1),
                gallery_sequences=self.gallery_sequences,
                scoring=self.scoring, **self.settings.shard_kwargs())
            # Every shard's top-k for these queries, to every worker: [W, W*C, k] (small).
            dists = all_gather_nograd(part.dist[None])
            ids = all_gather_nograd(part.gallery_ids[None])
            n_gt = all_gather_nograd(part.n_gt[None])
            merged = merge_topk([TopK(dists[w], ids[w], n_gt[w]) for w in range(world_size)], k)
            mine = slice(rank * chunk, rank * chunk + min(chunk, max(len(query_ids) - start, 0)))
            out.append(merged[mine])
        if not out:
            empty = torch.zeros((0, k), device=self.device)
            return TopK(empty, empty.long(), torch.zeros(0, dtype=torch.int64, device=self.device))
        return TopK.cat(out)

    def gallery_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``[Q, n, D]`` embeddings of gallery ids ``[Q, n]`` of this worker's queries (zeros for ``-1``)."""
        rank, _ = world()
        ids = ids.to(self.device)
        counts = all_gather_nograd(torch.tensor([len(ids)], device=self.device)).tolist()
        every = all_gather_variable(ids)  # [sum Q, n] every worker's ids, in rank order
        pos = own_rows(every.reshape(-1), self.gallery_ids)  # [sum Q * n] row in this shard, -1 elsewhere
        found = self.gallery_emb[pos.clamp_min(0)] * (pos >= 0)[:, None].to(self.gallery_emb.dtype)
        found = all_reduce_sum(found).view(*every.shape, self.dim)  # each id is in exactly one shard
        start = sum(counts[:rank])
        return found[start:start + len(ids)]

    def pair_counts(self, query_emb: torch.Tensor, query_ids: torch.Tensor, windows: list[tuple[int, int]],
                    n_buckets: int) -> torch.Tensor:
        """Distance counts of every (query, gallery item) pair in key windows, summed over the workers
        (collective; :func:`raymetric.retrieval.pair_distance_counts`)."""
        total = torch.zeros(len(windows), 2, n_buckets + 2, dtype=torch.int64, device=self.device)
        for round_emb, round_ids, _ in self._gathered_chunks(query_emb, query_ids.to(self.device)):
            real = round_ids >= 0
            ids = round_ids[real]
            total += pair_distance_counts(
                round_emb[real], self.gallery_emb, query_labels=self.labels[ids],
                gallery_labels=self.gallery_labels, windows=windows, n_buckets=n_buckets,
                self_row=own_rows(ids, self.gallery_ids),
                query_sequences=None if self.sequences is None else self.sequences[ids],
                gallery_sequences=self.gallery_sequences,
                max_block_elems=self.settings.max_block_elems // 4).to(self.device)
        return all_reduce_sum(total).cpu()


def _moments(emb: torch.Tensor, row_ids: torch.Tensor, rows: ValidationRows) -> dict[str, EmbeddingMoments]:
    """Moments of every validation embedding, overall (``""``) and per category, summed over the workers."""
    local = None if rows.categories is None else rows.categories[row_ids.cpu().numpy()]
    every = None if rows.categories is None else np.unique(rows.categories)  # the same order on every worker
    out = {}
    for name, m in EmbeddingMoments.by_category(emb, local, every).items():
        n = all_reduce_sum(torch.tensor(float(m.n), dtype=torch.float64, device=emb.device))
        out[name] = EmbeddingMoments(int(n), all_reduce_sum(m.total), all_reduce_sum(m.outer))
    return out


@dataclass
class ValidationDetails:
    """What :func:`validation_metrics` found besides the metrics (the same on every worker)."""

    topk: TopK  # [Q, k] every query's merged top-k, queries in row order
    query_ids: np.ndarray  # [Q] their validation rows
    per_query: dict[str, torch.Tensor]  # name -> [Q] per-query metrics
    searcher: DistributedSearcher


def validation_metrics(
    emb: torch.Tensor,
    row_ids: torch.Tensor,
    rows: ValidationRows,
    metric_args,
    *,
    retrieval=None,
    return_details: bool = False,
) -> dict[str, float] | tuple[dict[str, float], ValidationDetails]:
    """Retrieval metrics of the validation set embedded across workers (collective; same result everywhere).

    Args:
        emb: ``[n, D]`` this worker's embeddings.
        row_ids: ``[n]`` their validation row positions.
        rows: Metadata of all validation rows.
        metric_args: ``raymetric.config.MetricArgs``.
        retrieval: ``raymetric.config.RetrievalConfig`` (search settings, post-processing); None: the defaults.
        return_details: also return the :class:`ValidationDetails` (for the retrieval picture).

    Returns:
        Flat keys: ``cmc@1``, ``precision@5``, ``map@5``, ``fnmr@fmr=0.1``, ``pcf@0.5``, ...,
        ``<category>/cmc@1`` per category, ``n_queries``, ``n_gallery``, ``n_queries_without_gt``.
    """
    from raymetric.config import RetrievalConfig

    retrieval = retrieval or RetrievalConfig()
    settings = SearchSettings.from_config(retrieval, metric_args.max_k, emb.device)
    searcher = DistributedSearcher(emb, row_ids, rows, settings)
    row_ids = row_ids.to(emb.device)
    is_query = torch.as_tensor(rows.is_query, device=emb.device)[row_ids]
    query_emb, query_ids = emb[is_query], row_ids[is_query]
    topk = searcher.search(query_emb, query_ids)
    topk = apply_postprocessing(build_postprocessors(retrieval.postprocessing), query_emb, query_ids, topk, searcher)

    # Every worker's queries and results, in row order, on every worker (Q x k: small).
    all_ids = all_gather_variable(query_ids)
    order = torch.argsort(all_ids)
    merged = TopK(all_gather_variable(topk.dist)[order], all_gather_variable(topk.gallery_ids)[order],
                  all_gather_variable(topk.n_gt)[order])
    all_ids = all_ids[order].cpu().numpy()
    is_relevant, n_retrieved = relevance(merged, rows.labels[all_ids], rows.labels)
    fnmr = searcher_fnmr(searcher, query_emb, query_ids, metric_args)
    moments = _moments(emb, row_ids, rows) if metric_args.pcf_variance else None
    is_relevant, n_retrieved, n_gt = is_relevant.cpu(), n_retrieved.cpu(), merged.n_gt.cpu()
    per_query = metric_args_per_query(is_relevant, n_retrieved, n_gt, metric_args)  # once: metrics and picture
    metrics = validation_report(
        is_relevant, n_retrieved, n_gt, metric_args,
        categories=rows.categories[all_ids] if rows.categories is not None else None,
        fnmr=fnmr, moments=moments, per_query=per_query,
    )
    metrics["n_gallery"] = int(all_reduce_sum(torch.tensor(len(searcher.gallery_ids), device=emb.device)).item())
    if return_details:
        return metrics, ValidationDetails(merged, all_ids, per_query, searcher)
    return metrics


def worst_picture_rows(emb: torch.Tensor, row_ids: torch.Tensor, rows: ValidationRows, details: ValidationDetails,
                       picture) -> list:
    """The retrieval picture's rows of a validation inside training: the worst queries (collective).

    Like the stand-alone job's picture (:func:`raymetric.validate.draw_picture`): queries ranked by
    ``picture.metric`` (queries with nothing relevant last), each with its top items and the nearest
    relevant gallery item it missed. The query embeddings and each worker's nearest missed item travel
    as ``[n_queries, D]`` and ``[n_queries]`` tensors; the gallery stays sharded.

    Args:
        emb, row_ids: this worker's embeddings and their validation rows (as for :func:`validation_metrics`).
        details: what :func:`validation_metrics` returned with ``return_details=True``.
        picture: ``raymetric.config.PictureConfig``.

    Returns:
        ``list[raymetric.visualize.PictureRow]``, the same on every worker.
    """
    from raymetric.visualize import PictureRow, badness_tiebreak, worst_queries

    topk, searcher, per_query = details.topk, details.searcher, details.per_query
    name = picture.metric or next(iter(per_query))
    values = torch.where(topk.n_gt.cpu() > 0, per_query[name].double(), float("inf"))
    chosen = worst_queries(values, picture.n_queries, badness_tiebreak(per_query))
    qids = torch.as_tensor(details.query_ids[chosen], dtype=torch.int64, device=emb.device)
    # The chosen queries' embeddings, from whichever worker holds each.
    pos = own_rows(qids, row_ids.to(emb.device))
    q_emb = all_reduce_sum(emb[pos.clamp_min(0)].float() * (pos >= 0)[:, None])
    # Each worker's nearest relevant gallery item not shown; the nearest over the workers (ties: lower id).
    gallery_ids = searcher.gallery_ids
    shown = topk.gallery_ids[chosen, :picture.n_retrieved].to(emb.device)
    labels, sequences = searcher.labels, torch.as_tensor(rows.sequences, device=emb.device)
    dist = torch.cdist(q_emb.double(), searcher.gallery_emb.double())  # [n_queries, local gallery]
    relevant = (searcher.gallery_labels[None] == labels[qids][:, None]) & (gallery_ids[None] != qids[:, None])
    relevant &= ~((sequences[gallery_ids][None] == sequences[qids][:, None]) & (sequences[qids][:, None] != -1))
    relevant &= ~(gallery_ids[None, :, None] == shown[:, None, :]).any(-1)
    dist = torch.where(relevant, dist, float("inf"))
    best = dist.min(1) if dist.shape[1] else None
    mine_d = best.values if best is not None else torch.full((len(qids),), float("inf"), dtype=torch.float64)
    mine_id = gallery_ids[best.indices] if best is not None else torch.full_like(qids, -1)
    all_d, all_id = all_gather_nograd(mine_d[None].to(emb.device)), all_gather_nograd(mine_id[None].to(emb.device))
    out = []
    for i, q in enumerate(chosen):
        qid = int(details.query_ids[q])
        retrieved = [(int(g), float(d), bool(rows.labels[g] == rows.labels[qid]))
                     for g, d in zip(topk.gallery_ids[q].tolist(), topk.dist[q].tolist()) if g >= 0]
        d, g = all_d[:, i].cpu(), all_id[:, i].cpu()  # [W]: each worker's candidate
        order = sorted(range(len(d)), key=lambda w: (float(d[w]), int(g[w])))
        missed = None if not torch.isfinite(d[order[0]]) else (int(g[order[0]]), float(d[order[0]]))
        out.append(PictureRow(qid, f"#{qid} {name}={float(values[q]):.2f}", retrieved, missed))
    return out

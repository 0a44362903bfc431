"""Retrieval validation across workers that each hold a shard of the validation embeddings.

Each worker embeds its own contiguous share of the validation rows and keeps it: its gallery items
are its gallery shard. Query embeddings travel in fixed-size chunks (all-gathered in rank order),
every worker computes the exact top-k of each chunk over its own shard, and the small per-shard
top-k results are all-gathered and merged. Nothing of size queries x gallery exists anywhere, and no
worker ever holds the whole gallery. Every worker ends with the same metrics.

Plain ``torch.distributed``; with world size 1 it is ordinary single-process retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from raymetric.distributed import all_gather_nograd, all_reduce_max, all_reduce_sum, world
from raymetric.metrics import retrieval_metrics
from raymetric.retrieval import TopK, merge_topk, relevance, topk_shard


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
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            embs.append(model(images).float())
        indices.append(torch.as_tensor(batch["index"]))
    model.train(was_training)
    if not embs:
        return torch.zeros((0, getattr(model, "feat_dim", 0)), device=device), torch.zeros(0, dtype=torch.int64)
    return torch.cat(embs), torch.cat(indices).long()


@torch.no_grad()
def distributed_topk(
    emb: torch.Tensor,
    row_ids: torch.Tensor,
    rows: ValidationRows,
    k: int,
    *,
    query_chunk: int = 1024,
) -> tuple[torch.Tensor, TopK]:
    """Exact global top-k of every validation query over the gallery sharded across workers.

    Collective: every worker calls it with its own shard.

    Args:
        emb: ``[n, D]`` this worker's embeddings.
        row_ids: ``[n]`` their validation row positions (disjoint across workers).
        rows: metadata of all validation rows.
        k: neighbours to keep.
        query_chunk: queries per worker per round; bounds the memory of one round.

    Returns:
        ``(query_ids [Q], topk)`` for all queries of all workers, sorted by row position; the same on
        every worker.
    """
    device = emb.device
    _, world_size = world()
    row_ids_np = row_ids.cpu().numpy()
    labels = torch.as_tensor(rows.labels, device=device)
    sequences = torch.as_tensor(rows.sequences, device=device)
    is_query = torch.as_tensor(rows.is_query[row_ids_np], device=device)
    is_gallery = torch.as_tensor(rows.is_gallery[row_ids_np], device=device)
    row_ids = row_ids.to(device)

    gallery_emb, gallery_ids = emb[is_gallery], row_ids[is_gallery]  # this worker's gallery shard
    query_emb, query_ids = emb[is_query], row_ids[is_query]
    n_rounds = int(all_reduce_max(torch.tensor(len(query_ids), device=device)).item())
    n_rounds = -(-n_rounds // query_chunk)

    out_ids, out_parts = [], []
    for r in range(n_rounds):
        chunk_emb = query_emb[r * query_chunk : (r + 1) * query_chunk]
        chunk_ids = query_ids[r * query_chunk : (r + 1) * query_chunk]
        pad = query_chunk - len(chunk_ids)  # equal shapes for the gathers
        chunk_emb = torch.cat([chunk_emb, chunk_emb.new_zeros((pad, emb.shape[1]))])
        chunk_ids = torch.cat([chunk_ids, chunk_ids.new_full((pad,), -1)])
        round_emb = all_gather_nograd(chunk_emb)  # [W*C, D] queries of every worker
        round_ids = all_gather_nograd(chunk_ids)  # [W*C], -1 = padding
        safe = round_ids.clamp_min(0)
        part = topk_shard(
            round_emb,
            gallery_emb,
            k,
            query_labels=torch.where(round_ids >= 0, labels[safe], -1),
            gallery_labels=labels[gallery_ids],
            gallery_ids=gallery_ids,
            query_ids=round_ids,
            query_sequences=torch.where(round_ids >= 0, sequences[safe], -1),
            gallery_sequences=sequences[gallery_ids],
        )
        # Every shard's top-k for these queries, to every worker: [W, W*C, k] (small).
        dists = all_gather_nograd(part.dist[None])
        ids = all_gather_nograd(part.gallery_ids[None])
        n_gt = all_gather_nograd(part.n_gt[None])
        merged = merge_topk([TopK(dists[w], ids[w], n_gt[w]) for w in range(world_size)], k)
        keep = round_ids >= 0
        out_ids.append(round_ids[keep])
        out_parts.append(TopK(merged.dist[keep], merged.gallery_ids[keep], merged.n_gt[keep]))

    if not out_parts:
        empty = TopK(torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        return torch.zeros(0, dtype=torch.int64), empty
    qids = torch.cat(out_ids)
    order = torch.argsort(qids)
    topk = TopK(*(torch.cat([getattr(p, f) for p in out_parts])[order] for f in ("dist", "gallery_ids", "n_gt")))
    return qids[order], topk


def validation_metrics(
    emb: torch.Tensor,
    row_ids: torch.Tensor,
    rows: ValidationRows,
    metric_args,
    *,
    query_chunk: int = 1024,
) -> dict[str, float]:
    """Retrieval metrics of the validation set embedded across workers (collective; same result everywhere).

    Args:
        metric_args: ``raymetric.config.MetricArgs``.

    Returns:
        Flat keys: ``cmc@1``, ``precision@5``, ``map@5``, ..., ``<category>/cmc@1`` per category,
        ``n_queries``, ``n_gallery``, ``n_queries_without_gt``.
    """
    query_ids, topk = distributed_topk(emb, row_ids, rows, metric_args.max_k, query_chunk=query_chunk)
    query_ids = query_ids.cpu()
    is_relevant, n_retrieved = relevance(topk, rows.labels[query_ids.numpy()], rows.labels)
    categories = rows.categories[query_ids.numpy()] if rows.categories is not None else None
    metrics = retrieval_metrics(
        is_relevant.cpu(),
        n_retrieved.cpu(),
        topk.n_gt.cpu(),
        cmc_top_k=metric_args.cmc_top_k,
        precision_top_k=metric_args.precision_top_k,
        map_top_k=metric_args.map_top_k,
        categories=categories,
        queries_without_gt=metric_args.queries_without_gt,
    )
    n_gallery = all_reduce_sum(torch.tensor(int(rows.is_gallery[row_ids.cpu().numpy()].sum())))
    metrics["n_gallery"] = int(n_gallery.item())
    return metrics

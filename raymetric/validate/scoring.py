"""Scoring an embeddings table: search (in-process or sharded over Ray Data), post-process, metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from raymetric.config import MetricArgs
from raymetric.embeddings import EmbeddingsTable
from raymetric.metrics import EmbeddingMoments, metric_args_per_query, validation_report
from raymetric.postprocessing import apply_postprocessing, build_postprocessors
from raymetric.retrieval import TopK, relevance
from raymetric.retrieval.candidates import scoring_dtype
from raymetric.search import LocalSearcher, SearchSettings, searcher_fnmr


def search_memory_bytes(table: EmbeddingsTable, settings: SearchSettings, device: torch.device | None = None) -> int:
    """Working memory of an in-process search on ``device`` (default: the CPU): a score-dtype gallery copy,
    one score block, candidate lists."""
    n_gallery, n_query = int(table.is_gallery.sum()), int(table.is_query.sum())
    score_bytes = scoring_dtype(settings.backend, settings.score_dtype, device or torch.device("cpu")).itemsize
    copy = 0 if table.is_gallery.all() else n_gallery * table.dim * 4  # the gallery's own float32 rows
    block = min(settings.max_block_elems, min(n_query, settings.query_chunk) * n_gallery)
    lists = min(n_query, settings.query_chunk) * (settings.k + settings.extra) * 24
    return n_gallery * table.dim * score_bytes + copy + block * (score_bytes + 4) + lists


@dataclass
class ValidationOutput:
    """What scoring an embeddings table gives."""

    metrics: dict[str, float]
    query_rows: np.ndarray  # [Q] table rows of the queries
    topk: TopK  # [Q, k] final results (after post-processing)
    per_query: dict[str, torch.Tensor]  # name -> [Q]
    searched_with: str  # "in-process" or "ray-data (N shards)"
    is_relevant: torch.Tensor  # [Q, k] whether each retrieved item has the query's label (False in padding)


def score_table(table: EmbeddingsTable, metric_args: MetricArgs, retrieval, *, k: int | None = None,
                use_gpu: bool = False, quiet: bool = False) -> ValidationOutput:
    """Every metric of an embeddings table: search (in-process or Ray Data), post-process, score.

    A gallery whose search exceeds ``retrieval.memory_budget_mb`` is sharded over Ray Data, joining or
    starting Ray (``raymetric.ray_env.init_ray``; ``quiet``: without Ray's log lines) when it is not
    running. ``k``: items kept per query (at least the largest k of ``metric_args``, the default).
    ``use_gpu``: search on a GPU (this process's, or one per Ray Data task).
    """
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    settings = SearchSettings.from_config(retrieval, max(k or 0, metric_args.max_k), device)
    needed = search_memory_bytes(table, settings, device)
    budget = retrieval.memory_budget_mb * 2**20
    labels = torch.from_numpy(table.labels)
    if needed <= budget:
        codes = table.sequence_codes()
        searcher = LocalSearcher(torch.from_numpy(table.embeddings).to(device), labels.to(device),
                                 torch.from_numpy(table.is_gallery).to(device),
                                 torch.from_numpy(codes).to(device) if (codes != -1).any() else None, settings)
        searched_with = "in-process"
    else:
        from raymetric.ray_env import init_ray
        from raymetric.validate.ray_data import RayDataSearcher

        init_ray(quiet=quiet)  # the one place that decides Ray is needed
        n_shards = max(2, min(math.ceil(needed / budget), int(table.is_gallery.sum())))
        searcher = RayDataSearcher(table, settings, n_shards, use_gpu=use_gpu)
        searched_with = f"ray-data ({searcher.n_shards} shards)"
    query_rows = torch.from_numpy(np.flatnonzero(table.is_query))
    query_emb = torch.from_numpy(table.embeddings)[query_rows]
    if searched_with == "in-process":
        query_rows, query_emb = query_rows.to(device), query_emb.to(device)
    topk = searcher.search(query_emb, query_rows)
    topk = apply_postprocessing(build_postprocessors(retrieval.postprocessing), query_emb, query_rows, topk, searcher)
    fnmr = searcher_fnmr(searcher, query_emb, query_rows, metric_args)
    topk, query_rows = topk.to("cpu"), query_rows.cpu()

    is_relevant, n_retrieved = relevance(topk, labels[query_rows], labels)
    moments = EmbeddingMoments.by_category(table.embeddings, table.categories) if metric_args.pcf_variance else None
    query_categories = None if table.categories is None else table.categories[query_rows.numpy()]
    per_query = metric_args_per_query(is_relevant, n_retrieved, topk.n_gt, metric_args)  # once: metrics and picture
    metrics = validation_report(is_relevant, n_retrieved, topk.n_gt, metric_args, categories=query_categories,
                                fnmr=fnmr, moments=moments, per_query=per_query)
    metrics["n_gallery"] = int(table.is_gallery.sum())
    return ValidationOutput(metrics, query_rows.numpy(), topk, per_query, searched_with, is_relevant)

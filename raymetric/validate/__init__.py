"""Stand-alone validation on Ray: embed with Ray Data, search the gallery, score, write the run folder.

The driver checks everything first (config, checkpoint, dataset or embeddings table), then:

1. **Embeddings.** From a checkpoint and a dataset: the validation rows go through a Ray Data actor
   pool that decodes, transforms and embeds them (decoding in CPU tasks and the model in GPU actors
   when there are GPUs). Or an embeddings table made elsewhere (:mod:`raymetric.embeddings`).
2. **Search.** A gallery whose search fits ``retrieval.memory_budget_mb`` is searched in this process
   (:class:`raymetric.search.LocalSearcher`): Ray Data's workers take seconds to start. A larger one
   is split into shards, one Ray Data block each; every query chunk is broadcast through the object
   store, each shard returns its top-k per query, and the driver merges them
   (:class:`RayDataSearcher`). Both run :func:`raymetric.retrieval.topk_shard`: same results.
3. **Metrics** with the code training uses (:func:`raymetric.metrics.validation_report`).
4. **Outputs** in ``<ray.storage_path>/<name>/``: ``config.yaml``, ``metrics.json`` (training's flat
   keys), ``topk.parquet`` (per query: its top-k ids, distances, relevance, per-query metrics),
   ``retrieval.png`` (the worst queries) and, from a checkpoint, ``embeddings.parquet``.
"""

from raymetric.validate.outputs import draw_picture, write_topk_table
from raymetric.validate.plan import (
    ValidationPlan,
    check_validate_config,
    load_checkpoint,
    prepare_validation,
    resolve_checkpoint,
    table_from_frame,
)
from raymetric.validate.ray_data import RayDataSearcher, embed_with_ray_data
from raymetric.validate.run import ValidationResult, run_validation
from raymetric.validate.scoring import ValidationOutput, score_table, search_memory_bytes

__all__ = ["run_validation", "ValidationResult", "prepare_validation", "ValidationPlan", "check_validate_config",
           "resolve_checkpoint", "load_checkpoint", "table_from_frame", "embed_with_ray_data", "RayDataSearcher",
           "score_table", "ValidationOutput", "search_memory_bytes", "write_topk_table", "draw_picture"]

"""The stand-alone validation from start to end: check, embed, score, write the run folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from raymetric.config import ValidateConfig, make_run_dir
from raymetric.embeddings import write_embeddings
from raymetric.validate.outputs import draw_picture, write_topk_table
from raymetric.validate.plan import prepare_validation
from raymetric.validate.scoring import score_table

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
TOPK_FILE = "topk.parquet"
PICTURE_FILE = "retrieval.png"
EMBEDDINGS_FILE = "embeddings.parquet"


@dataclass
class ValidationResult:
    """Where a stand-alone validation put its outputs, and its metrics."""

    run_dir: str
    metrics: dict[str, float]
    searched_with: str


def run_validation(cfg: ValidateConfig, *, quiet: bool = False) -> ValidationResult:
    """The whole stand-alone validation (see the module docstring)."""
    from raymetric.ray_env import init_ray

    plan = prepare_validation(cfg)
    cfg = plan.cfg
    run_dir = make_run_dir(cfg)
    if plan.table is None:
        from raymetric.validate.ray_data import embed_with_ray_data

        init_ray(quiet=quiet)
        table = embed_with_ray_data(plan)
        if cfg.save_embeddings:
            write_embeddings(table, os.path.join(run_dir, EMBEDDINGS_FILE))
    else:
        table = plan.table
    out = score_table(table, cfg.metric_args, cfg.retrieval, k=cfg.topk_to_save, use_gpu=cfg.ray.use_gpu, quiet=quiet)
    with open(os.path.join(run_dir, METRICS_FILE), "w") as f:
        json.dump(out.metrics, f, indent=2)
    write_topk_table(os.path.join(run_dir, TOPK_FILE), table, out, cfg.topk_to_save or cfg.metric_args.max_k)
    if cfg.picture.n_queries and out.per_query:
        picture = draw_picture(table, out, cfg.picture, cfg.metric_args, plan.frame)
        picture.save(os.path.join(run_dir, PICTURE_FILE))
    return ValidationResult(run_dir, out.metrics, out.searched_with)

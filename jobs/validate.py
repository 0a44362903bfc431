r"""Validate a feature extractor: a raymetric checkpoint on a dataset, or an embeddings table.

On one machine (Ray starts locally when needed):
    python jobs/validate.py --config configs/validate_demo.yaml checkpoint=runs/<run>
    python jobs/validate.py --embeddings embeddings.parquet metric_args.cmc_top_k=[1,10]

On a running cluster (outputs go to ray.storage_path, shared storage on a real cluster):
    ray job submit --working-dir . -- python jobs/validate.py --config configs/validate_demo.yaml \
        checkpoint=/mnt/shared/runs/<run> ray.num_workers=4 ray.use_gpu=true ray.storage_path=/mnt/shared/runs

`checkpoint` takes a run folder (its best checkpoint, best/state.pt, else its latest), a checkpoint_*
folder or a state.pt; the
dataset, transforms and metrics default to the checkpoint's training config. Inference runs on a Ray
Data actor pool (`ray.num_workers` actors); a gallery whose search fits `retrieval.memory_budget_mb`
is searched in this process, a larger one in shards over Ray Data. The top-k is exact either way.

The run folder holds config.yaml, metrics.json (training's keys), topk.parquet (every query's top-k),
retrieval.png (the worst queries) and, from a checkpoint, embeddings.parquet. The last line printed is
`run: <directory>`. Exit status: 0 done; 2 a config, checkpoint, dataset or embeddings-table error
(printed, naming the key, column or rows).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymetric.config import ConfigError, ValidateConfig, flag_overrides, job_parser, load_config  # noqa: E402
from raymetric.data.csv import DatasetError  # noqa: E402
from raymetric.embeddings import EmbeddingsError  # noqa: E402
from raymetric.ray_env import shutdown_if_started  # noqa: E402
from raymetric.report import format_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, ValidateConfig)
    parser.add_argument("--embeddings", help="a Parquet embeddings table to score (same as embeddings=...)")
    parser.add_argument("--checkpoint", help="a run folder, checkpoint folder or state.pt (same as checkpoint=...)")
    args = parser.parse_args(argv)
    overrides = flag_overrides(args, ("embeddings", "checkpoint"))
    try:
        cfg = load_config(args.config, overrides, schema=ValidateConfig)
        from raymetric.validate import run_validation  # imports Ray Data: after the cheap checks

        result = run_validation(cfg, quiet=args.quiet)
    except (ConfigError, DatasetError, EmbeddingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shutdown_if_started()  # flushes the workers' log lines, so that `run:` is really the last line
    print(format_metrics(result.metrics))
    print(f"searched: {result.searched_with}")
    print(f"run: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

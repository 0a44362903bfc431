r"""Train a feature extractor on Ray Train.

On one machine (Ray starts locally):
    python jobs/train.py --config configs/demo.yaml max_epochs=5

On a running cluster (outputs go to ray.storage_path, shared storage on a real cluster):
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml \
        ray.num_workers=4 ray.use_gpu=true ray.storage_path=/mnt/shared/runs

Any config key can be overridden as key=value (nested keys with dots, values in YAML syntax). The
config, the dataset and the cluster's resources are checked before any worker starts. The last line
printed is `run: <directory>`.

The console shows one line per epoch (loss, share of active triplets, images/s, the checkpoint
metric on validation epochs, ETA); Ray's own log lines stay in Ray's log files unless --verbose.
The run directory holds config.yaml, history.jsonl, metrics.json, checkpoint_*/ and, with the default
`logger: {name: tensorboard}`, TensorBoard event files (`tensorboard --logdir runs`); `logger.name=mlflow`
logs to MLflow instead (pip install 'raymetric[mlflow]'). Start from weights with
extractor.args.weights=<timm .pth/.safetensors, or a raymetric run directory or checkpoint>.

Exit status: 0 done; 2 a config, dataset or sampler error (printed, naming the key, column or rows).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymetric.config import ConfigError, TrainConfig, job_parser, load_config  # noqa: E402
from raymetric.data.csv import DatasetError  # noqa: E402
from raymetric.ray_env import shutdown_if_started  # noqa: E402
from raymetric.report import format_metrics  # noqa: E402
from raymetric.samplers import SamplerError  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, TrainConfig, config_default=DEFAULT_CONFIG,
                        config_help="YAML config (default: configs/demo.yaml)",
                        quiet_help="no per-epoch lines (CI): only the final metrics and `run:`", example="max_epochs=5")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's log lines (workers, Train controller)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from raymetric.train import fit  # imports Ray: after the cheap checks

        result = fit(cfg, quiet=args.quiet, verbose=args.verbose)
    except (ConfigError, DatasetError, SamplerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Ray: a worker's exception arrives wrapped in a TrainingFailedError
        from raymetric.train import describe_failure

        print(f"error: training failed: {describe_failure(err)}", file=sys.stderr)
        return 1
    shutdown_if_started()  # flushes the workers' log lines, so that `run:` is really the last line
    print(format_metrics(result.metrics))
    print(f"run: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

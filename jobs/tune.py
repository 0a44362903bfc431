r"""Sweep hyperparameters with Ray Tune: every trial is a full Ray Train run, stopped early by ASHA.

On one machine (Ray starts locally, with the dashboard):
    python jobs/tune.py --config configs/tune_demo.yaml tune.num_samples=8

On a running cluster (sweep and trial directories go to ray.storage_path, shared storage on a real cluster):
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_demo.yaml \
        ray.storage_path=/mnt/shared/runs dataset_root=/mnt/shared/data/demo

Resume a stopped or crashed sweep (finished trials stay, the others continue from their checkpoints):
    python jobs/tune.py --resume runs/<sweep directory>

A sweep file is a training config (or a `base:` one plus overrides) with a `tune:` block; key=value
overrides apply to it (`tune.num_samples=2`, `max_epochs=4`). The base config and every searched
value are checked as jobs/train.py checks a config, before Ray starts. The job prints the trials
table and writes trials.csv, best.yaml (runs with jobs/train.py) and val_metric.png into the sweep
directory; its last line is `sweep: <directory>`.

Exit status: 0 done; 1 interrupted (resume it); 2 a config, dataset or sampler error, before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymetric.config import ConfigError  # noqa: E402
from raymetric.data.csv import DatasetError  # noqa: E402
from raymetric.ray_env import shutdown_if_started  # noqa: E402
from raymetric.samplers import SamplerError  # noqa: E402
from raymetric.tune.space import load_sweep  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tune_demo.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="sweep file (default: configs/tune_demo.yaml)")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="continue the sweep in this directory")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress from Tune: only the table and where things went"
    )
    parser.add_argument("--verbose", action="store_true", help="also show Ray's log lines (trial drivers, workers)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. tune.num_samples=2")
    args = parser.parse_args(argv)
    try:
        if args.resume and args.overrides:
            raise ConfigError("--resume continues a sweep as it was started; it takes no key=value overrides")
        sweep = train_raw = None
        if not args.resume:
            sweep, train_raw = load_sweep(args.config, args.overrides)
        from raymetric.tune import sweep as sweeps  # imports Ray: after the cheap checks

        if args.resume:
            result = sweeps.resume_sweep(args.resume, quiet=args.quiet, verbose=args.verbose)
        else:
            result = sweeps.run_sweep(sweep, train_raw, quiet=args.quiet, verbose=args.verbose)
    except (ConfigError, DatasetError, SamplerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shutdown_if_started()  # flushes the workers' log lines before the summary
    print(result.table)
    print(f"table: {os.path.join(result.sweep_dir, sweeps.TRIALS_CSV)}")
    print(f"plot: {result.plot}")
    if result.best_config:
        print(f"best: {result.best_config}  (python jobs/train.py --config {result.best_config})")
    if not result.finished:
        print(f"interrupted: resume with python jobs/tune.py --resume {result.sweep_dir}")
    print(f"sweep: {result.sweep_dir}")
    return 0 if result.finished else 1


if __name__ == "__main__":
    sys.exit(main())

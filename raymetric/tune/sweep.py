"""Sweeps on Ray Tune: check on the driver, then one Tune trial per sampled config, each a full Ray Train run.

Ray Train V2 refuses ``Tuner(TorchTrainer)``; a trial is a function that checks its config exactly as
``jobs/train.py`` does (``prepare_run``), builds the same trainer (``make_trainer``) and fits it,
while a Train callback forwards the validation reports to Tune, whose scheduler may stop it early.
Each trial's directory is an ordinary run directory (config.yaml, history.jsonl, checkpoints) that
Tune also writes its own files into.

Two Ray pitfalls shape the shell (../shared/RAY_NOTES.md §4):
- A trial's driver must not hold the CPU its own workers need, or trials deadlock on a small
  cluster. Drivers reserve memory on the head node instead of a CPU (``tune.trial_resources``), and
  the sweep runs at most as many trials at once as the cluster holds, drivers and workers together.
- When Tune stops a trial, only Train's ``PlacementGroupCleaner`` frees the workers' placement
  group, and it needs Ray's State API (the dashboard). Without it the next trial waits forever, so
  an early-stopping sweep refuses to start without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import ray
import ray.tune
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.basic_variant import BasicVariantGenerator

from raymetric.config import ConfigError, make_run_dir
from raymetric.train import HISTORY_FILE, prepare_run, run_trainer
from raymetric.tune.plan import SweepPlan, check_sweep, plan_concurrency
from raymetric.tune.plot import plot_curves
from raymetric.tune.results import (
    STATUS_COMPLETED,
    STATUS_STOPPED,
    STATUS_UNFINISHED,
    TrialSummary,
    format_table,
    pick_best,
    summarize_trial,
    table_rows,
    write_config_with_header,
    write_csv,
)
from raymetric.tune.schedulers import STOPS_FILE, build_trial_scheduler
from raymetric.tune.space import SweepConfig, config_from_raw, load_sweep, override_value, trial_overrides

SWEEP_FILE = "sweep.yaml"  # the resolved sweep in its directory: reruns with --config, resumes with --resume
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best.yaml"
PLOT_FILE = "val_metric.png"

# ---------------------------------------------------------------- trials


class ValidationToTune(TuneReportCallback):
    """Forwards rank 0's validation reports to Tune (the others lack the metric Tune checks for),
    without the per-category keys, the images and the per-step records (they stay in the run's
    history.jsonl and loggers).

    Ray: a Train callback; it runs in the Train controller, which reads every ``ray.train.report``.
    """

    def __init__(self, metric_key: str):
        super().__init__()
        self.metric_key = metric_key

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric_key in metrics[0]:
            overall = {k: v for k, v in metrics[0].items()  # no images, no per-step records
                       if (k.count("/") <= 1 or k == self.metric_key) and not isinstance(v, (dict, list))}
            super().after_report(run_context, [overall], checkpoint)


def run_trial(
    params: dict[str, Any], *, train_raw: dict, sweep_dir: str, metric_key: str, extractors: dict | None
) -> None:
    """What one Tune trial runs: the sampled values as ``key=value`` overrides, the same checks and
    the same trainer as ``jobs/train.py``. Its run directory is the trial's directory, so a resumed
    sweep resumes the run from its last checkpoint.
    """
    # Ray: the trial id names the run directory; a restored sweep keeps it, so Train resumes the run.
    trial_id = ray.tune.get_context().get_trial_id()
    overrides = trial_overrides(params) + [
        f"ray.storage_path={override_value(sweep_dir)}",
        f"ray.name={override_value(trial_id)}",
    ]
    cfg, df = prepare_run(config_from_raw(train_raw, overrides), extractors)
    run_trainer(cfg, make_run_dir(cfg), df, extractors=extractors, quiet=True, callbacks=[ValidationToTune(metric_key)])


def _trial_dirname(trial) -> str:
    return trial.trial_id  # = the run's ray.name (run_trial), so the trial directory is the run directory


def _trainable(plan: SweepPlan, sweep_dir: str, extractors: dict | None):
    trainable = ray.tune.with_parameters(
        run_trial, train_raw=plan.train_raw, sweep_dir=sweep_dir, metric_key=plan.metric_key, extractors=extractors
    )
    # Ray: what Tune reserves is the driver actor's; its TorchTrainer reserves the workers separately.
    return ray.tune.with_resources(trainable, dict(plan.sweep.trial_resources))


# ---------------------------------------------------------------- Ray


def init_ray_for_sweep(*, quiet: bool = False, verbose: bool = False) -> None:
    """Join ``RAY_ADDRESS`` (``ray job submit``) or this process's Ray, else start a local Ray with the
    dashboard: its State API is what frees the workers of a trial the scheduler stops."""
    from raymetric.ray_env import init_ray

    dashboard_url = init_ray(quiet=quiet, verbose=verbose, dashboard=True)
    if dashboard_url and not quiet:
        print(f"Ray dashboard: {dashboard_url}", flush=True)


def state_api_available() -> bool:
    """Whether the State API of the Ray this process is connected to answers (it needs the dashboard,
    from ``ray[default]``)."""
    from ray.util.state import list_nodes

    try:
        answered = {node.node_id for node in list_nodes(timeout=15, raise_on_missing_output=False)}
    except Exception:  # Ray raises several kinds here, by version: any failure means "no"
        return False
    # Without an address the client may find another Ray's dashboard on this machine.
    return bool(answered & {node["NodeID"] for node in ray.nodes()})


def _check_cluster(plan: SweepPlan) -> int:
    if plan.sweep.scheduler is not None and not state_api_available():
        raise ConfigError(
            f"config key tune.scheduler={plan.sweep.scheduler.name!r} stops trials early, which needs Ray's State "
            "API to free their workers; this Ray has no dashboard (start it with the dashboard, pip install "
            "'ray[default]'), or set tune.scheduler=null"
        )
    return plan_concurrency(plan, ray.cluster_resources())


# ---------------------------------------------------------------- sweeping


@dataclass
class SweepResult:
    """Where a sweep put its outputs."""

    sweep_dir: str
    trials: list[TrialSummary]
    table: str
    best_config: str | None  # best.yaml, or None if no trial validated
    plot: str
    finished: bool  # False after an interruption: resume it with resume_sweep


def sweep_dir_of(plan: SweepPlan) -> str:
    """``<ray.storage_path>/<tune.name or date_time_postfix_sweep>``; ConfigError if it holds a sweep already."""
    name = plan.sweep.name or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{plan.base_cfg.postfix}_sweep"
    sweep_dir = os.path.join(plan.base_cfg.ray.storage_path, name)
    if os.path.exists(os.path.join(sweep_dir, SWEEP_FILE)):
        raise ConfigError(
            f"config key tune.name: {sweep_dir} already holds a sweep; resume it with "
            f"python jobs/tune.py --resume {sweep_dir}, or choose another tune.name"
        )
    return sweep_dir


def new_sweep_dir(plan: SweepPlan, sweep_dir: str) -> None:
    """Create the sweep directory with the resolved sweep in it (``sweep.yaml``)."""
    os.makedirs(sweep_dir, exist_ok=True)
    resolved = plan.train_raw | {
        "ray": {**plan.train_raw.get("ray", {}), "storage_path": plan.base_cfg.ray.storage_path},
        "tune": plan.sweep.model_dump(mode="json") | {"name": None},
    }
    write_config_with_header(
        resolved,
        os.path.join(sweep_dir, SWEEP_FILE),
        [
            f"Resume: python jobs/tune.py --resume {sweep_dir}",
            f"Run again: python jobs/tune.py --config {sweep_dir}/{SWEEP_FILE}",
        ],
    )


def run_sweep(
    sweep: SweepConfig, train_raw: dict, *, extractors: dict | None = None, quiet: bool = False, verbose: bool = False
) -> SweepResult:
    """Check, start or join Ray, run the trials, write the table, the best config and the plot.

    Args:
        sweep: the ``tune`` block.
        train_raw: the raw training config every trial starts from (``load_sweep``).
        extractors: extra extractor classes by name, as for ``raymetric.train.fit``.
        quiet: no progress from Tune.
        verbose: also Ray's log lines (trial drivers, Train controllers, workers).
    """
    plan = check_sweep(sweep, train_raw, extractors)
    sweep_dir = sweep_dir_of(plan)
    init_ray_for_sweep(quiet=quiet, verbose=verbose)
    max_concurrent = _check_cluster(plan)
    new_sweep_dir(plan, sweep_dir)
    scheduler = (
        build_trial_scheduler(sweep.scheduler.name, sweep.scheduler.args, plan.max_epochs)
        if sweep.scheduler is not None
        else None
    )
    if scheduler is not None:
        scheduler.stops_file = os.path.join(sweep_dir, STOPS_FILE)
    tuner = ray.tune.Tuner(
        _trainable(plan, sweep_dir, extractors),
        param_space=plan.param_space,
        tune_config=ray.tune.TuneConfig(
            metric=plan.metric_key,
            mode=sweep.mode,
            scheduler=scheduler,
            # Ray: TuneConfig(max_concurrent_trials) is ignored next to a search_alg instance.
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent),
            num_samples=sweep.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=os.path.basename(sweep_dir), storage_path=os.path.dirname(sweep_dir), verbose=0 if quiet else 1
        ),
    )
    tuner.fit()
    return write_results(plan, sweep_dir)


def load_sweep_dir(sweep_dir: str) -> tuple[SweepConfig, dict]:
    """The sweep config and raw training config a sweep directory was started with."""
    return load_sweep(os.path.join(sweep_dir, SWEEP_FILE))


def resume_sweep(
    sweep_dir: str, *, extractors: dict | None = None, quiet: bool = False, verbose: bool = False
) -> SweepResult:
    """Continue a stopped or crashed sweep: finished trials stay, unfinished and errored ones run again,
    each from its run's last checkpoint."""
    sweep_dir = os.path.abspath(sweep_dir)
    if not ray.tune.Tuner.can_restore(sweep_dir):
        raise ConfigError(f"--resume {sweep_dir}: not a sweep directory Ray Tune can restore")
    sweep, train_raw = load_sweep_dir(sweep_dir)
    plan = check_sweep(sweep, train_raw, extractors)
    init_ray_for_sweep(quiet=quiet, verbose=verbose)
    _check_cluster(plan)
    tuner = ray.tune.Tuner.restore(
        sweep_dir, _trainable(plan, sweep_dir, extractors), resume_unfinished=True, resume_errored=True
    )
    tuner.fit()
    return write_results(plan, sweep_dir)


# ---------------------------------------------------------------- results


def _read_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_sweep(plan: SweepPlan, sweep_dir: str) -> list[TrialSummary]:
    """Every trial of the sweep, from Tune's saved state and each run's history."""
    stopped_at = {}
    if os.path.exists(os.path.join(sweep_dir, STOPS_FILE)):
        with open(os.path.join(sweep_dir, STOPS_FILE)) as f:
            for line in f:
                record = json.loads(line)
                stopped_at.setdefault(record["trial"], record["epoch"])
    trials = []
    for trial in sorted(ExperimentAnalysis(sweep_dir).trials, key=lambda t: t.trial_id):
        run_dir = os.path.join(sweep_dir, trial.trial_id)
        params = {key: trial.config.get(key) for key in plan.sweep.search}
        max_epochs = config_from_raw(plan.train_raw, trial_overrides(params)).max_epochs
        error = trial.get_error()
        trials.append(
            summarize_trial(
                trial.trial_id,
                params,
                _read_history(run_dir),
                metric_key=plan.metric_key,
                mode=plan.sweep.mode,
                max_epochs=max_epochs,
                run_dir=run_dir,
                error=str(error).strip().splitlines()[-1][:300] if error is not None else None,
                done=trial.status in ("TERMINATED", "ERROR"),
                stopped_at=stopped_at.get(trial.trial_id),
            )
        )
    return trials


def write_results(plan: SweepPlan, sweep_dir: str) -> SweepResult:
    """The trials table (printed by the job, and as CSV), the best config as YAML, the plot."""
    trials = summarize_sweep(plan, sweep_dir)
    metric = plan.sweep.metric
    rows = table_rows(trials, list(plan.sweep.search), metric)
    write_csv(rows, os.path.join(sweep_dir, TRIALS_CSV))
    plot = os.path.join(sweep_dir, PLOT_FILE)
    plot_curves(
        {_legend(t): t.curve for t in trials},
        plot,
        title=f"{os.path.basename(sweep_dir)}: validation {metric} per epoch",
        ylabel=plan.metric_key,
    )
    best = pick_best(trials, plan.sweep.mode)
    best_path = None
    if best is not None:
        best_path = os.path.join(sweep_dir, BEST_CONFIG)
        write_best_config(plan, best, best_path)
    finished = all(t.status != STATUS_UNFINISHED for t in trials)
    return SweepResult(sweep_dir, trials, format_table(rows), best_path, plot, finished)


def _legend(trial: TrialSummary) -> str:
    """``<trial id>  best 0.412``, and how it ended unless it completed."""
    text = f"{trial.trial_id}  " + (f"best {trial.best:.3f}" if trial.best is not None else "not validated")
    if trial.status == STATUS_STOPPED:
        return f"{text}, stopped at epoch {trial.stopped_at}"
    return text if trial.status == STATUS_COMPLETED else f"{text}, {trial.status}"


def write_best_config(plan: SweepPlan, best: TrialSummary, path: str) -> None:
    """The base config with the best trial's values: ``python jobs/train.py --config best.yaml``."""
    overrides = trial_overrides(best.params)
    cfg, _ = prepare_run(config_from_raw(plan.train_raw, overrides))
    write_config_with_header(
        cfg.model_dump(mode="json"),
        path,
        [
            f"python jobs/train.py --config {path}",
            f"Best trial {best.trial_id} of sweep {os.path.dirname(path)}: {plan.metric_key} = {best.best:.4f} "
            f"at epoch {best.best_epoch} of {best.max_epochs} ({best.status})",
            f"Searched values: {' '.join(overrides)}",
        ],
    )

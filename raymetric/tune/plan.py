"""The driver-side check of a sweep, before Ray starts, and how many trials a cluster holds at once.

Every trial's config passes ``raymetric.train.prepare_run`` (what ``jobs/train.py`` checks) before it
trains; ``check_sweep`` runs the same check first for the base config and for each searched key's
corner values in combination with the others, so a bad search space fails before any trial starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raymetric.config import ConfigError, TrainConfig, checkpoint_metric_key
from raymetric.data.csv import DatasetError
from raymetric.samplers import SamplerError
from raymetric.train import prepare_run
from raymetric.tune.schedulers import build_trial_scheduler
from raymetric.tune.space import SweepConfig, build_search_space, config_from_raw, corner_combinations, trial_overrides


@dataclass
class SweepPlan:
    """A checked sweep: what Tune gets, and what every trial will need."""

    sweep: SweepConfig
    train_raw: dict  # the training config every trial starts from (absolute dataset_root)
    base_cfg: TrainConfig  # train_raw checked, absolute paths
    param_space: dict[str, Any]  # config key -> Ray Tune sampler
    checked: list[dict[str, Any]]  # the combinations of searched values checked before any trial
    max_epochs: int  # the most any trial trains (the scheduler's max_t)
    worker_resources: dict[str, float]  # the most any trial's Train workers reserve
    metric_key: str  # as reported: "val/cmc@1"


def check_sweep(sweep: SweepConfig, train_raw: dict, extractors: dict | None = None) -> SweepPlan:
    """Everything ``jobs/train.py`` checks, for the base config and for the searched values, before
    Ray starts. Raises ConfigError (or DatasetError, SamplerError) naming the key.

    Every trial's config passes the same ``prepare_run`` again before it trains; here each searched
    key's corner values (``build_search_space``) are tried in combination with the others.
    """
    datasets: dict = {}  # read and checked once, whatever the trials vary
    base_cfg, df = prepare_run(config_from_raw(train_raw), extractors, datasets)
    train_raw = {**train_raw, "dataset_root": base_cfg.dataset_root}  # trials run in other directories
    metric_key = _check_metric(sweep.metric, base_cfg, df)
    if not sweep.search:
        raise ConfigError("config key tune.search: give at least one config key to search")

    param_space, corners = {}, {}
    for key, spec in sweep.search.items():
        param_space[key], corners[key] = build_search_space(key, spec)
    checked = corner_combinations(corners)
    cfgs = []
    for values in checked:
        overrides = trial_overrides(values)
        try:
            cfg, _ = prepare_run(config_from_raw(train_raw, overrides), extractors, datasets)
        except (ConfigError, DatasetError, SamplerError) as err:
            raise ConfigError(
                f"config key tune.search: a trial with {' '.join(overrides)} would fail:\n{err}"
            ) from None
        cfgs.append(cfg)

    max_epochs = max(cfg.max_epochs for cfg in cfgs)
    if sweep.scheduler is not None:
        build_trial_scheduler(sweep.scheduler.name, sweep.scheduler.args, max_epochs)
    worker_resources = {
        "CPU": max(cfg.ray.num_workers * cfg.ray.cpus_per_worker for cfg in cfgs),
        "GPU": max(cfg.ray.num_workers if cfg.ray.use_gpu else 0 for cfg in cfgs),
    }
    return SweepPlan(sweep, train_raw, base_cfg, param_space, checked, max_epochs, worker_resources, metric_key)


def _check_metric(metric: str, cfg: TrainConfig, df) -> str:
    """The reported key of the sweep's metric (``cmc@1`` -> ``val/cmc@1``; OML's ``OVERALL/cmc/1`` works too)."""
    flat = checkpoint_metric_key(cfg.model_copy(update={"metric_for_checkpointing": metric}))
    known = cfg.metric_args.metric_names()
    category, _, name = flat.rpartition("/")
    categories = set(df["category"].dropna().astype(str)) if "category" in df else set()
    if name not in known or (category and category not in categories):
        raise ConfigError(
            f"config key tune.metric: {metric!r} is not computed; computed: {known}, also per category "
            f"as <category>/<metric> with categories {sorted(categories)} (set metric_args.*_top_k to add one)"
        )
    return f"val/{flat}"


def trials_at_once(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at the same time (0: not even one).

    >>> trials_at_once({"CPU": 2, "GPU": 0, "memory": 5e8}, {"CPU": 5, "memory": 16e9})
    2
    """
    return min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0)


def plan_concurrency(plan: SweepPlan, cluster: dict[str, float]) -> int:
    """The number of trials to run at once; ConfigError if the cluster cannot hold one."""
    sweep = plan.sweep
    for key, value in sweep.trial_resources.items():
        if value > 0 and cluster.get(key, 0.0) < value:
            raise ConfigError(
                f"config key tune.trial_resources: {key}={value:g} per trial, the Ray cluster has {cluster.get(key, 0.0):g}"
            )
    per_trial = dict(sweep.trial_resources)
    for key, value in plan.worker_resources.items():
        per_trial[key] = per_trial.get(key, 0.0) + value
    at_once = trials_at_once(per_trial, cluster)
    if at_once == 0:
        short = {k: v for k, v in per_trial.items() if v > cluster.get(k, 0.0)}
        has = {k: cluster.get(k, 0.0) for k in short}
        raise ConfigError(
            f"a trial needs {short} (tune.trial_resources plus ray.num_workers x ray.cpus_per_worker, and a GPU "
            f"per worker with ray.use_gpu); the Ray cluster has {has}"
        )
    wanted = sweep.max_concurrent_trials
    if wanted is not None and wanted > at_once:
        print(
            f"tune.max_concurrent_trials={wanted} lowered to {at_once}: the cluster holds {at_once} trials "
            f"of {per_trial} at once, and more would wait holding their drivers' resources"
        )
    return min(wanted or at_once, at_once)

"""Early stopping for sweeps: Ray Tune's schedulers by name, counting in epochs."""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

from raymetric.config import ConfigError, check_args

STOPS_FILE = "stopped.jsonl"  # in the sweep directory: which trial the scheduler stopped, at which epoch


class _RecordsStops:
    """Appends ``{"trial", "epoch"}`` to ``stops_file`` whenever the scheduler stops a trial.

    Ray: Tune labels a trial its scheduler stopped TERMINATED, exactly like one that finished, and
    the trial trains on until its actor is killed, so neither its status nor its history says so.
    """

    stops_file: str | None = None  # set by run_sweep; the file survives an interrupted sweep

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and self.stops_file:
            with open(self.stops_file, "a") as f:
                f.write(json.dumps({"trial": trial.trial_id, "epoch": result.get("epoch")}) + "\n")
        return decision


class _ASHA(_RecordsStops, ASHAScheduler):
    pass


class _MedianStopping(_RecordsStops, MedianStoppingRule):
    pass


def _asha(max_t: int, grace_period: int = 1, reduction_factor: float = 2, brackets: int = 1):
    # time_attr="epoch": rungs in epochs, which a resumed run keeps counting (Tune's own iteration
    # count restarts). stop_last_trials=False: a trial that reaches max_t ends by itself, instead of
    # being killed while it writes its last checkpoint.
    return _ASHA(
        time_attr="epoch",
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        brackets=brackets,
        stop_last_trials=False,
    )


def _median_stopping(max_t: int, grace_period: int = 1, min_samples_required: int = 3):
    return _MedianStopping(time_attr="epoch", grace_period=grace_period, min_samples_required=min_samples_required)


def build_trial_scheduler(name: str, args: dict, max_t: int):
    """The Tune scheduler registered as ``name`` (time unit: epochs; Tune gives it the metric and mode)."""
    if name not in TRIAL_SCHEDULERS:
        raise ConfigError(f"config key tune.scheduler.name: unknown name {name!r}; known: {sorted(TRIAL_SCHEDULERS)}")
    factory = TRIAL_SCHEDULERS[name]
    check_args("tune.scheduler", factory, args, provided=("max_t",))
    try:
        return factory(max_t, **args)
    except (AssertionError, ValueError, TypeError) as err:  # Ray's schedulers check their arguments with asserts
        raise ConfigError(
            f"config key tune.scheduler.args: {err or type(err).__name__} (max_t = {max_t} epochs)"
        ) from None


TRIAL_SCHEDULERS = {
    "asha": _asha,
    "median_stopping": _median_stopping,
}

"""Watching a training run: the driver's per-epoch line, and the experiment loggers fed from Ray Train.

Ray Train V2 runs a controller process that receives every report of every worker; a
``ray.train.UserCallback`` runs there. raymetric uses two: ``HistoryCallback`` (``raymetric.train``)
appends rank 0's report to ``history.jsonl``, and ``LoggerCallback`` (here) hands it to the
configured loggers (``raymetric.loggers``). The controller always runs on the driver's node, so the
driver prints its progress line by following ``history.jsonl``: the console shows raymetric's lines
only, while Ray's own log lines stay in Ray's log files (``--verbose`` shows them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import ray.train

from raymetric.config import TrainConfig, checkpoint_metric_key
from raymetric.loggers import ExperimentLogger, build_logger

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the progress line (pure)


def format_progress_line(record: dict[str, Any], max_epochs: int, metric_key: str, eta_s: float | None) -> str:
    """One line for one report (rank 0's metrics of an epoch, or the validation before training).

    >>> format_progress_line({"epoch": 3, "train/loss": 0.25, "train/active_triplets": 0.5,
    ...                       "train/images_per_s": 120.0, "val/cmc@1": 0.8}, 10, "cmc@1", 90.0)
    'epoch 3/10  loss 0.2500  active 0.50  120 img/s  val/cmc@1 0.8000  eta 1.5 min'
    >>> format_progress_line({"epoch": 0, "val/cmc@1": 0.1}, 10, "cmc@1", None)
    'epoch 0/10  untrained  val/cmc@1 0.1000'

    A checkpoint inside an epoch reports the epochs completed and the step reached in the next one:

    >>> format_progress_line({"epoch": 3, "step": 50, "train/loss": 0.2}, 10, "cmc@1", None)
    'epoch 4/10  step 50  loss 0.2000'
    """
    if "step" in record:
        parts = [f"epoch {int(record['epoch']) + 1}/{max_epochs}", f"step {record['step']}"]
    else:
        parts = [f"epoch {record.get('epoch', '?')}/{max_epochs}"]
    if "train/loss" in record:
        parts.append(f"loss {record['train/loss']:.4f}")
        for name, short in (("train/active_triplets", "active"), ("train/accuracy", "acc")):
            if name in record:
                parts.append(f"{short} {record[name]:.2f}")
        if "train/images_per_s" in record:
            parts.append(f"{record['train/images_per_s']:.0f} img/s")
    else:
        parts.append("untrained")
    if f"val/{metric_key}" in record:
        parts.append(f"val/{metric_key} {record[f'val/{metric_key}']:.4f}")
    if eta_s is not None:
        parts.append(f"eta {eta_s / 60:.1f} min")
    return "  ".join(parts)


def format_failure(record: dict[str, Any], retries_left: bool) -> str:
    """The line for a worker failure recorded in ``history.jsonl``.

    >>> format_failure({"event": "worker_failure", "errors": {"1": "RuntimeError: boom"}}, True)
    'worker failure: rank 1: RuntimeError: boom; Ray Train restarts the workers from the last checkpoint'
    """
    errors = "; ".join(f"rank {rank}: {message.splitlines()[0] if message else ''}" for rank, message in record.get("errors", {}).items())
    then = "Ray Train restarts the workers from the last checkpoint" if retries_left else "no retries left (ray.max_failures)"
    return f"worker failure: {errors}; {then}"


class EtaClock:
    """Remaining time from the wall-clock pace of the training epochs seen so far.

    >>> clock = EtaClock(max_epochs=10)
    >>> clock.update(epoch=1, now=100.0, epoch_time_s=12.0)  # one epoch seen: its own duration
    108.0
    >>> clock.update(epoch=3, now=120.0)  # 2 epochs in 20 s, 7 to go
    70.0
    """

    def __init__(self, max_epochs: int):
        self.max_epochs = max_epochs
        self._first: tuple[int, float] | None = None

    def update(self, epoch: int, now: float, epoch_time_s: float | None = None) -> float | None:
        if self._first is None:
            self._first = (epoch, now)
            pace = epoch_time_s
        else:
            first_epoch, first_time = self._first
            pace = (now - first_time) / (epoch - first_epoch) if epoch > first_epoch else epoch_time_s
        return None if pace is None else pace * max(self.max_epochs - epoch, 0)


class HistoryFollower:
    """New complete lines of a growing JSON-lines file, from where the last call stopped."""

    def __init__(self, path: str):
        self.path = path
        self._offset = 0

    def read_new(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


class ProgressPrinter:
    """Prints a line per report of a running fit, from ``history.jsonl``, in a driver thread.

    Use as a context manager around ``trainer.fit()``; on exit it prints what is left.
    """

    def __init__(self, history_path: str, *, max_epochs: int, metric_key: str, max_failures: int = 0,
                 stream: TextIO | None = None, poll_s: float = 0.5):
        self._follower = HistoryFollower(history_path)
        self._clock = EtaClock(max_epochs)
        self.max_epochs, self.metric_key = max_epochs, metric_key
        self._failures_left = max_failures
        self._stream = stream or sys.stdout
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raymetric-progress", daemon=True)
        # A resumed run directory already holds earlier reports: print only this fit's.
        self._follower.read_new()

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.print_new()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.print_new()

    def print_new(self) -> None:
        for record in self._follower.read_new():
            print(self.format(record), file=self._stream, flush=True)

    def format(self, record: dict[str, Any]) -> str:
        if record.get("event") == "worker_failure":
            line = format_failure(record, self._failures_left > 0)
            self._failures_left -= 1
            return line
        eta = None
        if "train/loss" in record and "step" not in record:  # an epoch's end, not a checkpoint inside it
            eta = self._clock.update(int(record["epoch"]), record.get("time", 0.0), record.get("train/epoch_time_s"))
        return format_progress_line(record, self.max_epochs, self.metric_key, eta)


# ---------------------------------------------------------------- loggers in the controller (Ray shell)


class LoggerCallback(ray.train.UserCallback):
    """Feeds rank 0's report of every epoch to the configured loggers.

    Ray: runs in the Ray Train controller process, which sees every report; nothing in the worker
    loop changes. It is pickled to the controller, so it holds plain data and builds the loggers on
    the first report. A logger that fails is reported once (Ray's controller log) and dropped for the
    rest of the run: losing a plot must not stop training.

    Args:
        blocks: the config's ``logger`` entries as ``{"name": ..., "args": {...}}``.
        run_dir: the run directory.
        log_images: also log the images a report names (``images``).
    """

    def __init__(self, blocks: list[dict], run_dir: str, *, log_images: bool = False):
        self.blocks = blocks
        self.run_dir = run_dir
        self.log_images = log_images
        self._loggers: dict[str, ExperimentLogger] | None = None

    def _open(self) -> dict[str, ExperimentLogger]:
        if self._loggers is None:
            self._loggers = {}
            for block in self.blocks:
                try:
                    self._loggers[block["name"]] = build_logger(block["name"], self.run_dir, block.get("args"))
                except Exception:
                    log.exception("logger %r could not start; the run goes on without it", block["name"])
        return self._loggers

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        loggers = self._open()
        for name in list(loggers):
            try:
                loggers[name].log_report(metrics[0], log_images=self.log_images)
            except Exception:
                log.exception("logger %r failed; the run goes on without it", name)
                del loggers[name]


def logger_callbacks(cfg: TrainConfig, run_dir: str) -> list[ray.train.UserCallback]:
    """The controller-side callbacks that the config's ``logger`` asks for (none for ``logger: null``)."""
    if not cfg.logger:
        return []
    return [LoggerCallback([b.model_dump() for b in cfg.logger], run_dir, log_images=cfg.log_images)]


# ---------------------------------------------------------------- the driver's side of a run


@contextmanager
def watch_run(cfg: TrainConfig, run_dir: str, history_path: str, *, quiet: bool = False) -> Iterator[None]:
    """Around ``trainer.fit()`` on the driver: open the loggers, print progress, close the loggers.

    The loggers are opened here first so that a bad logger setting (an unreachable MLflow server)
    fails on the driver before any worker starts; they log the config, and on exit the run's
    outcome (MLflow's run status: ``FINISHED``, ``FAILED`` or ``KILLED``).
    """
    loggers = [build_logger(block.name, run_dir, block.args) for block in cfg.logger]
    params = cfg.model_dump(mode="json")
    for logger in loggers:
        logger.log_params(params)
        logger.flush()
    status = "FAILED"
    try:
        if quiet:
            yield
        else:
            with ProgressPrinter(history_path, max_epochs=cfg.max_epochs, metric_key=checkpoint_metric_key(cfg),
                                 max_failures=cfg.ray.max_failures):
                yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for logger in loggers:
            logger.close(status)

"""What a sweep leaves behind: a table of trials (printed and as CSV) and the best config as YAML.

Pure: built from each trial's own ``history.jsonl`` (what it trained and validated, across restarts)
and what Tune says about it (an error, whether it finished).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

STATUS_COMPLETED = "completed"
STATUS_STOPPED = "stopped early"  # by the scheduler, before its last epoch
STATUS_ERROR = "error"
STATUS_UNFINISHED = "unfinished"  # the sweep was interrupted: resume it


@dataclass
class TrialSummary:
    """One trial of a sweep."""

    trial_id: str
    params: dict[str, Any]  # the sampled values, by config key
    curve: list[tuple[int, float]]  # (epoch, validation metric), one point per validated epoch
    epochs_run: int
    max_epochs: int
    status: str
    run_dir: str
    stopped_at: int | None = None  # the epoch at which the scheduler stopped it
    error: str | None = None
    best: float | None = field(default=None)
    best_epoch: int | None = field(default=None)


def validation_curve(history: list[dict], metric_key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every validated epoch in a run's history; a repeated epoch (a restart
    trained it again) keeps its last value.

    >>> validation_curve([{"epoch": 1, "val/cmc@1": 0.2}, {"epoch": 2}, {"epoch": 1, "val/cmc@1": 0.3},
    ...                   {"event": "worker_failure"}], "val/cmc@1")
    [(1, 0.3)]
    """
    points: dict[int, float] = {}
    for record in history:
        if "epoch" in record and record.get(metric_key) is not None:
            points[int(record["epoch"])] = float(record[metric_key])
    return sorted(points.items())


def summarize_trial(
    trial_id: str,
    params: dict[str, Any],
    history: list[dict],
    *,
    metric_key: str,
    mode: str,
    max_epochs: int,
    run_dir: str,
    error: str | None = None,
    done: bool = True,
    stopped_at: int | None = None,
) -> TrialSummary:
    """One row of the trials table.

    Args:
        history: the trial's ``history.jsonl`` records.
        metric_key: the reported key, e.g. ``val/cmc@1``.
        mode: ``max`` or ``min``.
        error: what Tune reports if the trial failed.
        done: whether Tune finished the trial (an interrupted sweep leaves trials that are not).
        stopped_at: the epoch at which the scheduler stopped the trial (it may have trained a little
            further before it was killed).

    >>> s = summarize_trial("t0", {"lr": 0.1}, [{"epoch": 0, "val/cmc@1": 0.1}, {"epoch": 1, "val/cmc@1": 0.4},
    ...                     {"epoch": 2, "val/cmc@1": 0.3}], metric_key="val/cmc@1", mode="max", max_epochs=4,
    ...                     run_dir="r", stopped_at=2)
    >>> s.best, s.best_epoch, s.epochs_run, s.status
    (0.4, 1, 2, 'stopped early')
    """
    curve = validation_curve(history, metric_key)
    epochs_run = max((int(r["epoch"]) for r in history if "epoch" in r), default=0)
    if error is not None:
        status = STATUS_ERROR
    elif stopped_at is not None and stopped_at < max_epochs:
        status = STATUS_STOPPED
    elif done and epochs_run >= max_epochs:
        status = STATUS_COMPLETED
    else:
        status = STATUS_UNFINISHED
    summary = TrialSummary(trial_id, params, curve, epochs_run, max_epochs, status, run_dir, stopped_at, error)
    finite = [(e, v) for e, v in curve if not math.isnan(v)]
    if finite:
        sign = 1.0 if mode == "max" else -1.0
        # The first epoch that reached the best value.
        summary.best_epoch, summary.best = max(finite, key=lambda p: (sign * p[1], -p[0]))
    return summary


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    """The trial with the best validation value (the first one on a tie); None if none validated.

    >>> a = TrialSummary("a", {}, [], 1, 1, "completed", "ra", best=0.5)
    >>> b = TrialSummary("b", {}, [], 1, 1, "completed", "rb", best=0.7)
    >>> pick_best([a, b], "max").trial_id, pick_best([a, b], "min").trial_id
    ('b', 'a')
    """
    scored = [t for t in trials if t.best is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda t: (sign * t.best, -trials.index(t)))


def table_rows(trials: list[TrialSummary], keys: list[str], metric: str) -> list[dict[str, Any]]:
    """The trials table as plain rows: trial, one column per searched key, best metric, its epoch,
    epochs run, status, run directory."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.trial_id}
        row |= {key: t.params.get(key) for key in keys}
        row |= {
            f"best {metric}": t.best,
            "best epoch": t.best_epoch,
            "epochs run": f"{t.epochs_run}/{t.max_epochs}",
            "status": t.status,
            "stopped at epoch": t.stopped_at if t.status == STATUS_STOPPED else None,
            "run_dir": t.run_dir,
        }
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text; the run directory is left out (it is in the CSV).

    >>> print(format_table([{"trial": "t0", "lr": 0.0001, "best cmc@1": 0.5, "run_dir": "/r"}]))
    trial  lr      best cmc@1
    t0     0.0001  0.5000
    """
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c != "run_dir"]
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    """The trials table as CSV, every column, full precision."""
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def write_config_with_header(config: dict, path: str, header: list[str]) -> None:
    """A YAML config preceded by ``#`` comment lines (the launch command, where it came from)."""
    with open(path, "w") as f:
        f.write("".join(f"# {line}\n" for line in header))
        yaml.safe_dump(config, f, sort_keys=False)

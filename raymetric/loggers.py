"""Experiment loggers: a run's metrics, config and images to TensorBoard event files or to MLflow.

Which loggers a run uses is the config's ``logger`` key: OML's shape ``{name, args}``, or a list of
them; ``logger: null`` logs nothing beyond ``history.jsonl``.

    logger:
      - name: tensorboard             # event files in <run_dir>/tensorboard: tensorboard --logdir runs
      - name: mlflow                  # pip install 'raymetric[mlflow]'
        args: {experiment_name: cub}  # a local SQLite store next to the runs; no server needed

Nothing here imports Ray. During training the loggers live in the Ray Train controller process and
are fed every report of rank 0 (``raymetric.progress.LoggerCallback``); the driver opens them before
the run (config, MLflow run) and closes them after it (MLflow run status).

A report is a flat dict. Numbers are logged as scalars at ``step = report["epoch"]``, named as in the
report except that ``@`` becomes ``/`` (``val/cmc@1`` is logged as ``val/cmc/1``, OML's spelling:
neither TensorBoard nor MLflow takes ``@``). Two more keys are extension points for the worker loop
and for validation:

- ``steps``: per-step records ``[{"step": global_step, "loss": ..., ...}, ...]``, logged as
  ``train_step/<name>`` at their global step;
- ``images``: ``{tag: png_path}``, logged as images when the config's ``log_images`` is true (the
  retrieval picture of each validation).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import os
import re
import time
from typing import Any

import numpy as np

STEPS_KEY = "steps"
IMAGES_KEY = "images"
# Report keys that are bookkeeping, not metrics.
_NOT_METRICS = frozenset({"epoch", "step", "time", "checkpoint", STEPS_KEY, IMAGES_KEY})


def split_report(report: dict[str, Any]) -> tuple[dict[str, float], list[dict], dict[str, str]]:
    """A report's scalar metrics, its per-step records and its images.

    Non-numeric values (strings, lists other than ``steps``) and bools are not metrics; NaN (a value
    not known yet, such as the best metric before the first validation) is left out.

    >>> split_report({"epoch": 2, "train/loss": 0.5, "val/cmc@1": 1, "best/cmc@1": float("nan"), "note": "x",
    ...               "steps": [{"step": 7, "loss": 0.4}]})
    ({'train/loss': 0.5, 'val/cmc@1': 1.0}, [{'step': 7, 'loss': 0.4}], {})
    """
    scalars = {
        key: float(value)
        for key, value in report.items()
        if key not in _NOT_METRICS and isinstance(value, numbers.Real) and not isinstance(value, bool)
        and not math.isnan(value)
    }
    steps = report.get(STEPS_KEY) or []
    images = report.get(IMAGES_KEY) or {}
    return scalars, list(steps), dict(images)


def step_metrics(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """The global step of a per-step record and its metrics, named ``train_step/<name>``.

    >>> step_metrics({"step": 12, "loss": 0.25, "lr": 0.001})
    (12, {'train_step/loss': 0.25, 'train_step/lr': 0.001})
    """
    step = int(record["step"])
    return step, {f"train_step/{k}": float(v) for k, v in record.items() if k != "step"}


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat ``a.b.c`` keys with string values (MLflow params, TensorBoard text).

    >>> flatten_params({"optimizer": {"name": "adam", "args": {"lr": 0.001}}, "scheduling": None, "k": [1, 5]})
    {'optimizer.name': 'adam', 'optimizer.args.lr': '0.001', 'scheduling': 'None', 'k': '[1, 5]'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten_params(value, prefix=f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def image_array(image: np.ndarray | str | os.PathLike) -> np.ndarray:
    """An image as ``[H, W, 3]`` uint8: a path to an image file, or an array (``[H, W]``, ``[H, W, 3|4]``)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as img:
            return np.asarray(img.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"an image must be [H, W], [H, W, 3] or [H, W, 4]; got shape {arr.shape}")
    if arr.dtype != np.uint8:
        # Floats are taken as [0, 1], as TensorBoard and MLflow take them.
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr[:, :, :3]


def logged_name(key: str) -> str:
    """The name a report key is logged under: ``@`` becomes ``/`` (OML's ``cmc/1`` spelling), and other
    characters that TensorBoard tags or MLflow names refuse become ``_``.

    >>> logged_name("val/cmc@1"), logged_name("val/red car/map@5"), logged_name("a+b")
    ('val/cmc/1', 'val/red_car/map/5', 'a_b')
    """
    return re.sub(r"[^/\w.\-]", "_", key.replace("@", "/"))


class ExperimentLogger:
    """What every logger does. Subclasses take ``run_dir`` first, then their own keyword arguments.

    A logger may be built twice for one run, in the driver and in the Ray Train controller; both
    instances write to the same place.
    """

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the resolved config (a nested dict)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at a step."""

    def log_image(self, tag: str, image: np.ndarray | str, step: int) -> None:
        """Log an image (an array or a path to an image file) at a step."""

    def flush(self) -> None:
        """Make everything logged so far visible to readers."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release; ``status`` is the run's outcome: ``FINISHED``, ``FAILED`` or ``KILLED``."""

    def log_report(self, report: dict[str, Any], *, log_images: bool = False) -> None:
        """Log one report: its scalars at ``report["epoch"]``, its per-step records, its images.

        A report from inside an epoch (a checkpoint every N steps; it carries ``step``) adds no
        epoch-level point: at ``step = epoch`` it would overwrite the previous epoch's.
        """
        scalars, steps, images = split_report(report)
        epoch = int(report.get("epoch", 0))
        for record in steps:
            step, values = step_metrics(record)
            self.log_metrics(values, step)
        if scalars and "step" not in report:
            self.log_metrics(scalars, epoch)
        if log_images:
            for tag, path in images.items():
                self.log_image(tag, path, epoch)
        self.flush()


class TensorBoardLogger(ExperimentLogger):
    """TensorBoard event files in ``<run_dir>/<subdir>``, written with tensorboardX (a Ray Train dependency).

    View them with ``tensorboard --logdir <run_dir>``, or ``--logdir <ray.storage_path>`` to compare
    runs. The config is logged as text under the tag ``config``.

    Events are written synchronously (tensorboardX's ``EventsWriter``), not through its
    ``SummaryWriter``, whose ``flush()`` returns before its writer thread has written the last events:
    the controller process that logs may end right after the last report.

    Args:
        run_dir: the run directory.
        subdir: folder of the event files inside the run directory.
    """

    def __init__(self, run_dir: str, *, subdir: str = "tensorboard"):
        from tensorboardX.event_file_writer import EventsWriter

        self.log_dir = os.path.join(run_dir, subdir)
        os.makedirs(self.log_dir, exist_ok=True)
        # The file name holds the second and the host; the pid keeps the driver's and the controller's apart.
        self._events = EventsWriter(os.path.join(self.log_dir, "events"), f".{os.getpid()}")

    def _write(self, summary, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._events.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def log_params(self, params: dict[str, Any]) -> None:
        import yaml
        from tensorboardX.summary import text

        # Four-space indentation: TensorBoard renders text as Markdown, this keeps it a code block.
        config = yaml.safe_dump(params, sort_keys=False)
        self._write(text("config", "\n".join("    " + line for line in config.splitlines())), 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from tensorboardX.summary import scalar

        for key, value in metrics.items():
            self._write(scalar(logged_name(key), value), step)

    def log_image(self, tag: str, image: np.ndarray | str, step: int) -> None:
        from tensorboardX.summary import image as image_summary

        self._write(image_summary(logged_name(tag), image_array(image), dataformats="HWC"), step)

    def flush(self) -> None:
        self._events.flush()

    def close(self, status: str = "FINISHED") -> None:
        self._events.close()


MLFLOW_RUN_FILE = "mlflow_run.json"


def default_mlflow_uri(run_dir: str) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else a SQLite store beside the run directories.

    SQLite is MLflow's own default local store (its plain-file store is refused by MLflow 3 unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set); it needs no server.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    storage = os.path.dirname(os.path.abspath(run_dir))
    return f"sqlite:///{os.path.join(storage, 'mlflow.db')}"


class MLflowLogger(ExperimentLogger):
    """An MLflow run: params (the flat config), metrics per step, images, ``config.yaml`` as an artifact.

    The run's id is kept in ``<run_dir>/mlflow_run.json``, so a resumed run directory continues the
    same MLflow run and the driver can end the run that the controller logged to.

    Args:
        run_dir: the run directory.
        tracking_uri: where runs go; None: ``$MLFLOW_TRACKING_URI`` if set, else a local SQLite store
            ``<ray.storage_path>/mlflow.db`` (browse with ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``).
            On a multi-node cluster, point it at an MLflow server.
        experiment_name: the MLflow experiment, created when missing.
        run_name: the MLflow run's name; None: the run directory's name.
        tags: more tags for the run.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        tracking_uri: str | None = None,
        experiment_name: str = "raymetric",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        from mlflow.tracking import MlflowClient

        # MLflow announces at INFO level each table it creates in a new SQLite store.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.run_dir = os.path.abspath(run_dir)
        self.tracking_uri = tracking_uri or default_mlflow_uri(run_dir)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        existing = self._existing_run_id()
        if existing:
            self.run_id = existing
            self._client.update_run(existing, status="RUNNING")  # a resumed run directory runs again
        else:
            self.run_id = self._create_run(experiment_name, run_name, tags or {})

    def _run_file(self) -> str:
        return os.path.join(self.run_dir, MLFLOW_RUN_FILE)

    def _existing_run_id(self) -> str | None:
        if not os.path.exists(self._run_file()):
            return None
        with open(self._run_file()) as f:
            saved = json.load(f)
        return saved["run_id"] if saved.get("tracking_uri") == self.tracking_uri else None

    def _create_run(self, experiment_name: str, run_name: str | None, tags: dict[str, str]) -> str:
        experiment = self._client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):
                # Beside the database, not in the current directory (MLflow's default for SQLite).
                artifacts = "file://" + os.path.join(os.path.dirname(self.tracking_uri[len("sqlite:///"):]), "mlartifacts")
            experiment_id = self._client.create_experiment(experiment_name, artifact_location=artifacts)
        run = self._client.create_run(
            experiment_id,
            run_name=run_name or os.path.basename(self.run_dir),
            tags={"raymetric.run_dir": self.run_dir, **tags},
        )
        os.makedirs(self.run_dir, exist_ok=True)
        with open(self._run_file(), "w") as f:
            json.dump({"tracking_uri": self.tracking_uri, "run_id": run.info.run_id}, f)
        return run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        flat = [Param(logged_name(k), v[:6000]) for k, v in flatten_params(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            try:
                self._client.log_batch(self.run_id, params=flat[start : start + 100])
            except MlflowException as err:
                # A resumed run directory whose config changed: MLflow params cannot change.
                self._client.set_tag(self.run_id, "raymetric.params_changed", str(err)[:500])
        config_file = os.path.join(self.run_dir, "config.yaml")
        if os.path.exists(config_file):
            self._client.log_artifact(self.run_id, config_file)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(logged_name(k), v, now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's batch limit
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_image(self, tag: str, image: np.ndarray | str, step: int) -> None:
        self._client.log_image(self.run_id, image_array(image), key=logged_name(tag), step=step)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)


# Package each logger needs, and how to get it; checked on the driver before a run starts.
REQUIREMENTS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX (it comes with ray[train])"),
    "mlflow": ("mlflow", "pip install 'raymetric[mlflow]'"),
}


def missing_requirement(name: str) -> str | None:
    """How to install what logger ``name`` needs, or None when it is installed."""
    module, hint = REQUIREMENTS.get(name, (None, ""))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"the {module!r} package is not installed: {hint}"


LOGGERS: dict[str, type[ExperimentLogger]] = {
    "tensorboard": TensorBoardLogger,
    "mlflow": MLflowLogger,
}


def build_logger(name: str, run_dir: str, args: dict | None = None) -> ExperimentLogger:
    """Build the logger registered as ``name``, writing for ``run_dir``."""
    if name not in LOGGERS:
        raise ValueError(f"unknown logger {name!r}; known: {sorted(LOGGERS)}")
    return LOGGERS[name](run_dir, **(args or {}))

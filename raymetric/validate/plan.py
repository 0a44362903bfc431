"""Driver-side preparation of a stand-alone validation (no Ray): config, checkpoint, dataset or table.

Everything that can be wrong is found here, before Ray starts, and named: the config key, the checkpoint,
the dataset's column and rows (``raymetric.data.csv``) or the embeddings table's (``raymetric.embeddings``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raymetric.checkpoint import load_state
from raymetric.config import ConfigError, MetricArgs, TrainConfig, ValidateConfig, check_picture
from raymetric.embeddings import EmbeddingsTable, optional_strings, read_embeddings
from raymetric.search import check_retrieval_config


@dataclass
class ValidationPlan:
    """A checked validation: the resolved config and where the embeddings come from."""

    cfg: ValidateConfig  # metric_args and dataset keys filled in
    table: EmbeddingsTable | None = None  # given embeddings
    frame: pd.DataFrame | None = None  # validation rows of the dataset, with a checkpoint
    train_cfg: TrainConfig | None = None  # the checkpoint's config
    state_path: str | None = None  # the checkpoint's state.pt
    model_state: dict | None = None  # its extractor's state dict (read once, on the driver)


def resolve_checkpoint(path: str) -> str:
    """The ``state.pt`` of a checkpoint given as the file, its ``checkpoint_*`` folder or a run folder.

    A run folder gives its best checkpoint (``best/state.pt``, by ``metric_for_checkpointing``), else its
    latest, as ``jobs/export.py`` and ``jobs/predict.py`` do.
    """
    from raymetric.export import ExportError, find_checkpoint

    try:
        return find_checkpoint(path, "best")
    except ExportError as err:
        raise ConfigError(f"config key checkpoint: {err} (give the file, a checkpoint_* folder or a run folder)") from None


def load_checkpoint(state_path: str) -> tuple[TrainConfig, dict]:
    """The training config and the extractor's state dict of a checkpoint."""
    try:
        state = load_state(state_path)
    except Exception as err:  # a truncated file, a pickle that is not weights-only, ...
        raise ConfigError(f"config key checkpoint: cannot read {state_path!r}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"config key checkpoint: {state_path!r} is not a raymetric checkpoint "
                          f"(needs 'model' and 'config')")
    try:
        train_cfg = TrainConfig.model_validate(state["config"])
    except Exception as err:
        raise ConfigError(f"config key checkpoint: the config stored in {state_path!r} does not load: {err}") from None
    return train_cfg, state["model"]


def check_validate_config(cfg: ValidateConfig, metric_args: MetricArgs) -> None:
    """Cross-key checks of a validation config. Raises ConfigError naming the key."""
    check_picture(cfg.picture, metric_args)
    check_retrieval_config(cfg.retrieval, metric_args)


def prepare_validation(cfg: ValidateConfig) -> ValidationPlan:
    """Driver-side checks before Ray starts: config, checkpoint, dataset or table.

    Raises ConfigError, DatasetError or EmbeddingsError naming the key, column or rows.
    """
    from raymetric.data.csv import DatasetError, load_dataset_csv

    if (cfg.checkpoint is None) == (cfg.embeddings is None):
        raise ConfigError("give exactly one of config keys checkpoint (with a dataset) and embeddings "
                          "(a Parquet embeddings table), e.g. --embeddings E.parquet")
    updates: dict = {"ray": cfg.ray.model_copy(update={"storage_path": os.path.abspath(cfg.ray.storage_path)})}
    if cfg.embeddings is not None:
        for key in ("dataset_root", "dataframe_name", "transforms_val", "precision"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"config key {key}: not used with embeddings (no model runs); remove it")
        table = read_embeddings(cfg.embeddings)
        updates |= {"embeddings": os.path.abspath(cfg.embeddings), "metric_args": cfg.metric_args or MetricArgs()}
        cfg = cfg.model_copy(update=updates)
        check_validate_config(cfg, cfg.metric_args)
        return ValidationPlan(cfg, table=table)

    state_path = os.path.abspath(resolve_checkpoint(cfg.checkpoint))
    train_cfg, model_state = load_checkpoint(state_path)
    from raymetric.extractors import EXTRACTORS

    if train_cfg.extractor.name not in EXTRACTORS:
        raise ConfigError(f"config key checkpoint: its extractor {train_cfg.extractor.name!r} is not a built-in "
                          f"one ({sorted(EXTRACTORS)}); embed with your own code and pass --embeddings")
    updates |= {
        "checkpoint": state_path,
        "dataset_root": os.path.abspath(cfg.dataset_root or train_cfg.dataset_root),
        "dataframe_name": cfg.dataframe_name or train_cfg.dataframe_name,
        "transforms_val": cfg.transforms_val or train_cfg.transforms_val,
        "metric_args": cfg.metric_args or train_cfg.metric_args,
        "precision": cfg.precision or train_cfg.precision,
    }
    cfg = cfg.model_copy(update=updates)
    check_validate_config(cfg, cfg.metric_args)
    from raymetric.data.transforms import build_transforms

    try:
        build_transforms(cfg.transforms_val.name, cfg.transforms_val.args)
    except Exception as err:
        raise ConfigError(f"config key transforms_val: {type(err).__name__}: {err}") from None
    df = load_dataset_csv(os.path.join(cfg.dataset_root, cfg.dataframe_name), cfg.dataset_root, check_files=True,
                          require_splits=("validation",))
    frame = df[df["split"] == "validation"].reset_index(drop=True)
    if not len(frame):
        raise DatasetError(f"{cfg.dataset_root}/{cfg.dataframe_name}: column 'split': no 'validation' rows")
    return ValidationPlan(cfg, frame=frame, train_cfg=train_cfg, state_path=state_path, model_state=model_state)


def table_from_frame(frame: pd.DataFrame, embeddings: np.ndarray) -> EmbeddingsTable:
    """The embeddings table of a dataset's validation rows (row ``i`` of the frame is item ``i``)."""

    return EmbeddingsTable(
        embeddings=np.ascontiguousarray(embeddings, np.float32),
        labels=np.asarray(frame["label"], np.int64),
        is_query=np.asarray(frame["is_query"], bool),
        is_gallery=np.asarray(frame["is_gallery"], bool),
        categories=None if "category" not in frame else frame["category"].astype(str).to_numpy(),
        sequences=optional_strings(frame, "sequence"),
        paths=optional_strings(frame, "path"),
    ).check("validation rows")

"""Training on Ray Train: the driver (``fit``) and the recipe every worker runs (``train_loop_per_worker``).

The recipe reads top to bottom: set up data, model, loss and optimizer, restore a checkpoint if Ray
hands one over, then train, validate, checkpoint and report once per epoch (and, if asked, every N
steps). It is the same code at every world size; with one worker the gathers are no-ops and there is
no DDP wrapper. The step itself (gather, mine, loss, backward, accumulation) is ``raymetric.step``.

A checkpoint holds everything needed to continue exactly: extractor, criterion (loss parameters and
the miner's memory bank), optimizer, scheduler, the sampler's position (epoch and global step), the
train logs of a partial epoch, every rank's RNG states, the best metric so far and the config. The
best-by-metric checkpoint is written, atomically, to ``<run_dir>/best/state.pt`` besides Ray's latest
ones.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from raymetric.checkpoint import (
    BEST_DIR,
    STATE_FILE,
    capture_rng,
    copy_atomic,
    config_mismatches,
    load_state,
    resume_target,
    state_mismatches,
    restore_rng,
    restore_training_state,
    save_atomic,
    seed_everything,
    step_seed,
    training_state,
)
from raymetric.config import ConfigError, TrainConfig, check_config, checkpoint_metric_key, dump_config, make_run_dir
from raymetric.data.csv import load_dataset_csv, remap_labels
from raymetric.data.cache import ImageCache
from raymetric.data.dataset import ImageDataset, collate_dropping, collate_substituting
from raymetric.data.loading import DeviceBatches, build_train_input, loader_kwargs, pin_memory_for
from raymetric.data.transforms import build_transforms
from raymetric.distributed import all_reduce_sum, broadcast_buffers, world
from raymetric.evaluation import ValidationRows, embed, shard_rows, validation_metrics, worst_picture_rows
from raymetric.extractors import build_extractor
from raymetric.loggers import IMAGES_KEY, STEPS_KEY
from raymetric.progress import format_progress_line
from raymetric.losses import build_criterion
from raymetric.optim import (
    build_lr_schedule,
    build_optimizer,
    extractor_param_groups,
    optimizer_args,
    param_groups,
    set_trainable,
)
from raymetric.samplers import GlobalPlanSampler, build_sampler
from raymetric.step import micro_step, wrap_ddp

HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------- driver


@dataclass
class RunResult:
    """Where a finished run put its outputs, and its last validation metrics."""

    run_dir: str
    metrics: dict[str, float]  # flat keys: cmc@1, map@5, <category>/cmc@1, n_queries, ...
    checkpoint_path: str | None


def prepare_run(
    cfg: TrainConfig, extractors: dict | None = None, datasets: dict | None = None
) -> tuple[TrainConfig, pd.DataFrame]:
    """Driver-side checks before any worker starts: config, demo data, dataset CSV, sampler feasibility.

    Returns the config with absolute paths (workers change directory) and the checked dataset.
    Raises ConfigError, DatasetError or SamplerError naming the key, column or rows. ``datasets``: checked
    datasets by CSV, root and ``category_conflict``, shared by calls that check many configs of one
    dataset (a sweep), which then read and check the CSV and its files once.
    """
    check_config(cfg, extractors)
    cfg = cfg.model_copy(
        update={
            "dataset_root": os.path.abspath(cfg.dataset_root),
            "ray": cfg.ray.model_copy(update={"storage_path": os.path.abspath(cfg.ray.storage_path)}),
        }
    )
    if cfg.demo_data is not None:
        from raymetric.data.demo import SIZES, ensure_demo

        spec = SIZES[cfg.demo_data.size]
        spec = type(spec)(**{**spec.__dict__, "seed": cfg.demo_data.seed})
        ensure_demo(cfg.dataset_root, spec)
    key = (cfg.dataset_csv, cfg.dataset_root, cfg.category_conflict)
    df = None if datasets is None else datasets.get(key)
    if df is None:
        df = load_dataset_csv(cfg.dataset_csv, cfg.dataset_root, check_files=True,
                              category_conflict=cfg.category_conflict)
        if datasets is not None:
            datasets[key] = df
    train_df = df[df["split"] == "train"]
    sampler = build_train_sampler(cfg, train_df, cfg.ray.num_workers, rank=0)  # raises SamplerError naming the numbers
    check_scheduler_steps(cfg, sampler.n_steps)
    labels, _ = remap_labels(train_df["label"])
    miner = cfg.criterion.miner.model_dump() if cfg.criterion.miner else None
    # The extractor is built only when its embedding size matters: the config states it (OML's
    # in_features), or a checkpoint to resume must fit its tensors.
    extractor = None
    if cfg.criterion.args.get("in_features") is not None or cfg.resume_from:
        torch.manual_seed(cfg.seed)
        extractor = build_extractor(cfg.extractor.name, cfg.extractor.args, extractors)
    try:  # the criterion's checks with the run's numbers (ArcFace: the number of labels)
        criterion = build_criterion(
            cfg.criterion.name, cfg.criterion.args, miner, seed=cfg.seed,
            in_features=extractor.feat_dim if extractor is not None else 8,
            num_classes=int(labels.max()) + 1 if len(labels) else 0, label2category=_label2category(train_df, labels),
        )
    except ValueError as err:
        raise ConfigError(f"config key criterion (with this dataset and extractor): {err}") from None
    if cfg.resume_from:
        cfg = cfg.model_copy(update={"resume_from": os.path.abspath(cfg.resume_from)})
        check_resume(cfg, extractor, criterion)
    return cfg, df


def check_scheduler_steps(cfg: TrainConfig, n_batches: int) -> None:
    """Refuses a step-interval scheduler that would never step: Lightning's rule steps it at an optimizer
    step whose batch number within the epoch (1-based) is a multiple of ``scheduler_frequency``."""
    scheduling, accumulate = cfg.scheduling, cfg.accumulate_grad_batches
    if scheduling is None or scheduling.scheduler_interval != "step":
        return
    frequency = scheduling.scheduler_frequency
    updates = [b for b in range(1, n_batches + 1) if b % accumulate == 0 or b == n_batches]  # optimizer steps
    if not any(b % frequency == 0 for b in updates):
        raise ConfigError(
            f"config key scheduling.scheduler_frequency={frequency}: with scheduler_interval: step the scheduler "
            f"steps at an optimizer step whose batch number within the epoch is a multiple of it (Lightning's "
            f"rule), and with {n_batches} batches per epoch and accumulate_grad_batches={accumulate} none is: "
            f"the learning rate would never change")


def check_resume(cfg: TrainConfig, extractor: torch.nn.Module, criterion: torch.nn.Module) -> str:
    """The ``state.pt`` that ``resume_from`` resumes, after checking it fits this config (on the driver).

    ``extractor`` and ``criterion``: built from this config and dataset, to compare tensor shapes with.
    Raises ConfigError naming every mismatch: a structural config key (extractor, criterion, miner,
    optimizer, scheduler) or a tensor missing, unexpected or of another shape.
    """
    from raymetric.export import ExportError, find_checkpoint

    try:
        kind, target = resume_target(cfg.resume_from)
        state_path = target if kind == "checkpoint" else find_checkpoint(target, "latest")
    except (FileNotFoundError, ExportError) as err:
        raise ConfigError(f"config key resume_from: {err}") from None
    state = load_state(state_path)  # weights_only: a checkpoint runs no code when loaded
    if "config" not in state or "model" not in state:
        raise ConfigError(f"config key resume_from: {state_path} is not a raymetric training checkpoint")
    problems = config_mismatches(state["config"], cfg.model_dump(mode="json"))
    if not problems:  # same blocks: compare the tensors themselves (an embedding size, a class count)
        problems = state_mismatches(state["model"], extractor, "model")
        problems += state_mismatches(state["criterion"], criterion, "criterion")
    if problems:
        listed = "\n  - ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ConfigError(f"config key resume_from: {state_path} does not fit this config:\n  - {listed}")
    return state_path


def check_cluster_resources(cfg: TrainConfig) -> None:
    """Refuse a request the running cluster cannot hold, instead of waiting for resources forever."""
    total = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"config key ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
            f"needs {need_cpu:g} CPUs; the Ray cluster has {total.get('CPU', 0):g}"
        )
    if cfg.loader.source == "ray_data" and total.get("CPU", 0) < need_cpu + cfg.loader.ray_data_cpus:
        raise ConfigError(
            f"config key loader.source=ray_data needs loader.ray_data_cpus={cfg.loader.ray_data_cpus:g} CPUs free "
            f"beside the workers' {need_cpu:g} (ray.num_workers x ray.cpus_per_worker); the Ray cluster has "
            f"{total.get('CPU', 0):g}: lower ray.cpus_per_worker or add CPU nodes, or the tasks would wait forever"
        )
    if cfg.ray.use_gpu and total.get("GPU", 0) < cfg.ray.num_workers:
        raise ConfigError(
            f"config key ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers} needs that many GPUs; "
            f"the Ray cluster has {total.get('GPU', 0):g}"
        )


class HistoryCallback(ray.train.UserCallback):
    """Appends every report (rank 0's metrics) and every worker failure to ``history.jsonl``.

    Ray: runs in the controller process, which sees all reports, including those without a checkpoint
    (``Result`` keeps only checkpointed ones) and the failures that trigger a restart.
    """

    def __init__(self, path: str):
        self.path = path

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def after_report(self, run_context, metrics, checkpoint):
        self._write({**metrics[0], "checkpoint": checkpoint.path if checkpoint else None})

    def after_exception(self, run_context, worker_exceptions):
        errors = {str(rank): f"{type(e).__name__}: {e}"[:500] for rank, e in worker_exceptions.items()}
        self._write({"event": "worker_failure", "errors": errors})


def make_trainer(
    cfg: TrainConfig,
    run_dir: str,
    *,
    extractors: dict | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
    df: pd.DataFrame | None = None,
) -> TorchTrainer:
    """The Ray Train trainer of a checked config (``prepare_run``), writing into ``run_dir``.

    ``run_dir`` must be ``<cfg.ray.storage_path>/<name>``: Ray keeps its checkpoints there, and a
    second fit with the same directory resumes from them. ``callbacks``: more Ray Train
    ``UserCallback``s (Tune's report forwarding). The config's ``logger`` entries are added here,
    as a callback; a caller that runs the trainer itself ends their run with
    ``raymetric.progress.watch_run`` (or leaves an MLflow run marked running). ``df``: the dataset
    ``prepare_run`` returned (read again when not given), for ``loader.cache``.
    """
    from raymetric.progress import logger_callbacks

    storage_path, name = os.path.split(os.path.abspath(run_dir))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "extractors": extractors, "quiet": quiet, "run_dir": run_dir,
                           "cache_dir": prepare_image_cache(cfg, df)},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker} | ({"GPU": 1} if cfg.ray.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # controller_failure_limit=0: a group that cannot start fails instead of retrying forever.
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures, controller_failure_limit=0),
            callbacks=[
                HistoryCallback(os.path.join(run_dir, HISTORY_FILE)),
                *logger_callbacks(cfg, run_dir),
                *(callbacks or []),
            ],
        ),
    )


def prepare_image_cache(cfg: TrainConfig, df: pd.DataFrame | None = None) -> str | None:
    """``loader.cache``: the cache folder of the training images, built now (Ray Data) unless it exists.

    ``df``: the checked dataset, when the caller has it (else it is read again).
    """
    if not cfg.loader.cache:
        return None
    from raymetric.config import cache_size
    from raymetric.data.cache import build_image_cache

    if df is None:
        df = load_dataset_csv(cfg.dataset_csv, cfg.dataset_root, check_files=False,
                              category_conflict=cfg.category_conflict)
    root = cfg.loader.cache_dir or os.path.join(cfg.ray.storage_path, ".image_cache")
    return build_image_cache(df[df["split"] == "train"], cache_size(cfg), root)


def resume_run_dir(cfg: TrainConfig) -> str | None:
    """The run directory that ``resume_from`` continues in place, or None.

    Ray: a TorchTrainer whose run directory holds a run snapshot resumes from that run's latest
    registered checkpoint. The new config replaces ``config.yaml`` (the old one is kept as
    ``config.<n>.yaml``) and ``history.jsonl`` records the resumption.
    """
    if not cfg.resume_from or resume_target(cfg.resume_from)[0] != "run":
        return None
    run_dir = cfg.resume_from
    old = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(old):
        n = 1
        while os.path.exists(os.path.join(run_dir, f"config.{n}.yaml")):
            n += 1
        os.replace(old, os.path.join(run_dir, f"config.{n}.yaml"))
    dump_config(cfg, old)
    with open(os.path.join(run_dir, HISTORY_FILE), "a") as f:
        f.write(json.dumps({"time": time.time(), "event": "resumed", "max_epochs": cfg.max_epochs}) + "\n")
    return run_dir


def fit(cfg: TrainConfig, *, extractors: dict | None = None, quiet: bool = False, verbose: bool = False) -> RunResult:
    """Check everything on the driver, train on Ray Train, write the run directory.

    Args:
        cfg: the typed config.
        extractors: extra extractor classes by name (a user's own ``nn.Module``s), usable in
            ``extractor.name``.
        quiet: no per-epoch lines (CI).
        verbose: also show Ray's own log lines (workers, Train controller) on this console; by
            default they stay in Ray's log files and the driver prints one line per epoch.
    """
    from raymetric.ray_env import init_ray

    cfg, df = prepare_run(cfg, extractors)
    dashboard_url = init_ray(quiet=quiet, verbose=verbose, dashboard=cfg.ray.dashboard)
    check_cluster_resources(cfg)
    if cfg.check_images:
        from raymetric.data.check_images import check_images

        check_images(df)  # Ray Data: decode every image once; raises DatasetError naming the rows
    run_dir = resume_run_dir(cfg) or make_run_dir(cfg)
    if not quiet:
        print(f"run directory: {run_dir}" + (f"  (Ray dashboard: {dashboard_url})" if dashboard_url else ""), flush=True)
    return run_trainer(cfg, run_dir, df, extractors=extractors, quiet=quiet)


def run_trainer(cfg: TrainConfig, run_dir: str, df: pd.DataFrame, *, extractors: dict | None = None,
                quiet: bool = False, callbacks: list | None = None) -> RunResult:
    """Train a prepared config (``prepare_run``) into ``run_dir`` on Ray Train and write ``metrics.json``.

    The driver prints the progress lines (``watch_run``; the workers stay quiet) and runs the loggers;
    ``callbacks``: more Ray Train ``UserCallback``s (a Tune trial's report forwarding).
    """
    from raymetric.progress import watch_run

    trainer = make_trainer(cfg, run_dir, extractors=extractors, quiet=True, callbacks=callbacks, df=df)
    with watch_run(cfg, run_dir, os.path.join(run_dir, HISTORY_FILE), quiet=quiet):  # opens and closes the loggers
        result = trainer.fit()
    metrics = (result.return_value or {}).get("val") or {}
    with open(os.path.join(run_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2)
    return RunResult(run_dir, metrics, result.checkpoint.path if result.checkpoint else None)


def describe_failure(err: BaseException) -> str:
    """One readable line per failed worker (their own exception), instead of Ray's wrapped traceback.

    Ray: ``fit()`` raises ``WorkerGroupError`` (``worker_failures``: rank -> exception) or
    ``ControllerError`` (``controller_failure``) once ``ray.max_failures`` restarts are spent.
    """
    failures = getattr(err, "worker_failures", None)
    if failures:
        return "; ".join(f"worker {rank}: {type(e).__name__}: {e}".splitlines()[0] for rank, e in sorted(failures.items()))
    cause = getattr(err, "controller_failure", None) or err
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


# ---------------------------------------------------------------- worker recipe


@dataclass
class TrainData:
    """A worker's data: its train loader (with the distributed sampler) and its validation shard."""

    train_loader: torch.utils.data.DataLoader
    train_batches: DeviceBatches  # the batches on the device, finished (raymetric/data/loading.py, ray_ingest.py)
    sampler: GlobalPlanSampler
    val_loader: torch.utils.data.DataLoader
    val_rows: ValidationRows
    my_val_rows: np.ndarray
    num_classes: int
    label2category: dict[int, str] | None
    val_frame: pd.DataFrame | None = None  # the validation rows (paths, boxes): the retrieval picture's images


def build_train_sampler(cfg: TrainConfig, train_df: pd.DataFrame, world_size: int, rank: int) -> GlobalPlanSampler:
    """The configured sampler over the train split (plain shuffled batches when ``sampler`` is null).

    The driver builds it too (rank 0), so impossible settings fail before any worker starts.
    """
    labels, _ = remap_labels(train_df["label"])
    categories = train_df["category"].astype(str).to_numpy() if "category" in train_df else None
    name, args = (cfg.sampler.name, cfg.sampler.args) if cfg.sampler else (None, {"batch_size": cfg.bs_train})
    return build_sampler(name, labels, args, world_size=world_size, rank=rank, seed=cfg.seed, categories=categories)


def _label2category(train_df: pd.DataFrame, labels: np.ndarray) -> dict[int, str] | None:
    if "category" not in train_df:
        return None
    return dict(zip(labels.tolist(), train_df["category"].astype(str).tolist()))


def setup_data(
    cfg: TrainConfig, rank: int, world_size: int, use_gpu: bool, device: torch.device | None = None,
    cache_dir: str | None = None,
) -> TrainData:
    """Loaders of one worker. The driver has checked the CSV; workers only re-read it.

    ``cache_dir``: the decoded training images (``loader.cache``), built by the driver.
    """
    device = device or torch.device("cuda" if use_gpu else "cpu")
    df = load_dataset_csv(cfg.dataset_csv, cfg.dataset_root, check_files=False, category_conflict=cfg.category_conflict)
    train_df = df[df["split"] == "train"]
    val_df = df[df["split"] == "validation"].reset_index(drop=True)
    train_labels, _ = remap_labels(train_df["label"])
    skip = cfg.on_bad_image == "skip"
    # Decoded and augmented in the DataLoader processes, or finished on the device (cfg.loader).
    train_set, to_device, collate = build_train_input(
        train_df, train_labels, (cfg.transforms_train.name, cfg.transforms_train.args), device=device,
        augment_on=cfg.loader.augment_on, decode=cfg.loader.decode, on_bad_image=cfg.on_bad_image,
        cache=None if cache_dir is None else ImageCache(cache_dir),
    )
    sampler = build_train_sampler(cfg, train_df, world_size, rank)
    loader_args = loader_kwargs(
        cfg.num_workers, pin_memory_for(cfg.loader.pin_memory, device.type), cfg.loader.prefetch_factor,
        cfg.loader.persistent_workers,
    )
    # Not ray.train.torch.prepare_data_loader: it would replace the batch sampler with a DistributedSampler.
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate or (collate_substituting if skip else None), **loader_args
    )
    my_val_rows = shard_rows(len(val_df), rank, world_size)
    val_set = ImageDataset(
        val_df.iloc[my_val_rows], build_transforms(cfg.transforms_val.name, cfg.transforms_val.args),
        on_bad_image=cfg.on_bad_image,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.bs_val, shuffle=False, collate_fn=collate_dropping if skip else None, **loader_args
    )
    if cfg.loader.source == "ray_data":  # Ray tasks decode and augment, anywhere in the cluster
        from raymetric.data.ray_ingest import RayDataBatches

        train_batches = RayDataBatches(
            train_set, collate or (collate_substituting if skip else None), sampler, to_device, seed=cfg.seed,
            rank=rank, cpus=cfg.loader.ray_data_cpus, prefetch=cfg.loader.prefetch_factor,
        )
    else:
        train_batches = DeviceBatches(train_loader, to_device, cfg.loader.look_ahead)
    return TrainData(
        train_loader, train_batches, sampler, val_loader,
        ValidationRows.from_frame(val_df), my_val_rows,
        num_classes=int(train_labels.max()) + 1, label2category=_label2category(train_df, train_labels),
        val_frame=val_df,
    )


PICTURE_TAG = "val/retrieval"
PICTURES_DIR = "pictures"


def save_training_picture(rows: list, val_frame: pd.DataFrame, picture, run_dir: str, epoch: int) -> str:
    """Draws the retrieval picture of a validation into ``<run>/pictures/retrieval_epoch_<epoch>.png``."""
    from raymetric.visualize import frame_image, retrieval_picture

    image = retrieval_picture(rows, lambda item: frame_image(val_frame, item), picture.n_retrieved,
                              picture.tile_size, title=f"epoch {epoch}: worst {len(rows)} validation queries")
    os.makedirs(os.path.join(run_dir, PICTURES_DIR), exist_ok=True)
    path = os.path.join(run_dir, PICTURES_DIR, f"retrieval_epoch_{epoch:04d}.png")
    image.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)  # the loggers on the driver never read half a file
    return path


def _all_ranks(obj):
    """``[obj of rank 0, ..., obj of rank W-1]``; a collective when there are several workers."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def train_loop_per_worker(loop_config: dict) -> dict:
    """What every Ray Train worker runs. Ray: every rank reports at every report point, or the run hangs."""
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()  # Ray: the GPU Ray assigned to this worker, or the CPU
    use_gpu = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if (cfg.precision == "bf16" and use_gpu) else None
    channels_last = cfg.channels_last  # on CPUs too: oneDNN's convolutions run 5-10% faster (bench/train_throughput.py)
    metric_key = checkpoint_metric_key(cfg)
    sign = 1.0 if cfg.mode_for_checkpointing == "max" else -1.0
    run_dir, quiet = loop_config.get("run_dir"), loop_config.get("quiet")

    # -- data
    data = setup_data(cfg, rank, world_size, use_gpu, device, cache_dir=loop_config.get("cache_dir"))
    sampler = data.sampler

    # -- model, loss, optimizer (the same initial weights at every world size)
    torch.manual_seed(cfg.seed)
    extractor = build_extractor(cfg.extractor.name, cfg.extractor.args, loop_config.get("extractors")).to(device)
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    if cfg.sync_batchnorm and world_size > 1:  # BatchNorm statistics of the global batch (CUDA only)
        extractor = torch.nn.SyncBatchNorm.convert_sync_batchnorm(extractor)
    miner = cfg.criterion.miner.model_dump() if cfg.criterion.miner else None
    criterion = build_criterion(
        cfg.criterion.name, cfg.criterion.args, miner, seed=cfg.seed, in_features=extractor.feat_dim,
        num_classes=data.num_classes, label2category=data.label2category,
    ).to(device)
    groups = param_groups(extractor, criterion, cfg.optimizer.groups)  # backbone, head, loss
    optimizer = build_optimizer(cfg.optimizer.name, groups,
                                optimizer_args(cfg.optimizer.name, cfg.optimizer.args, cfg.fused_optimizer, device.type))
    if cfg.compile:  # in place: the state dict keeps its keys, DDP wraps the compiled module as any other
        extractor.compile(mode=cfg.compile_mode, backend=cfg.compile_backend)
    scheduling = cfg.scheduling
    scheduler = None
    if scheduling is not None:
        block = scheduling.scheduler
        scheduler = build_lr_schedule(block.name, optimizer, block.args, scheduling.warmup, scheduling.warmup_start_factor)

    def learning_rates() -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}

    def step_scheduler(interval: str, count: int) -> None:
        # OML's (Lightning's) semantics: at an optimizer step whose batch number within the epoch (1-based,
        # counting accumulated batches) is a multiple of scheduler_frequency; or every that many epochs.
        if scheduler is not None and scheduling.scheduler_interval == interval and count % scheduling.scheduler_frequency == 0:
            scheduler.step()

    # -- resume: the latest checkpoint Ray registered (None on a first attempt)
    epoch0, step0, optimizer_steps = 0, 0, 0
    step_records: list[dict] = []  # rank 0: per-step logs (cfg.log_every_n_steps) until the next report
    best, best_epoch, last_val, partial = None, None, {}, {"sums": {}, "steps": 0}
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), device)
    elif cfg.resume_from and resume_target(cfg.resume_from)[0] == "checkpoint":
        state = load_state(resume_target(cfg.resume_from)[1], device)  # a new run from another run's state
        # Its best checkpoint is its own: the first validation sets it (best/state.pt in this run directory).
        state = {**state, "best": None, "best_epoch": None}
    if state is not None:
        restore_training_state(state, extractor, criterion, optimizer, scheduler)
        epoch0, step0, optimizer_steps = state["epoch"], state["step"], state["optimizer_steps"]
        best, best_epoch, last_val, partial = state["best"], state["best_epoch"], state["last_val"], state["partial_epoch"]
        if len(state["rng"]) == world_size:  # with another world size, the per-step seeds take over anyway
            restore_rng(state["rng"][rank])

    criterion_ddp = wrap_ddp(criterion, device)  # ArcFace's class weights: averaged like the model's gradients
    model, frozen = extractor, None

    picture_wanted = bool(cfg.log_images and cfg.picture.n_queries and run_dir)

    def validate(epoch: int) -> tuple[dict, dict]:
        """Validation metrics, and the report's ``images`` (rank 0: the retrieval picture when log_images)."""
        broadcast_buffers(extractor)  # rank 0's BatchNorm statistics, as checkpointed, on every worker
        emb, index = embed(extractor, data.val_loader, device, autocast_dtype)
        row_ids = torch.as_tensor(data.my_val_rows, dtype=torch.int64)[index]
        out = validation_metrics(emb, row_ids, data.val_rows, cfg.metric_args, retrieval=cfg.retrieval,
                                 return_details=picture_wanted)
        metrics, details = out if picture_wanted else (out, None)
        if cfg.on_bad_image == "skip":  # rows left out because their image could not be read (a collective)
            n_bad = all_reduce_sum(torch.tensor(float(len(data.my_val_rows) - len(index)), device=device))
            metrics["n_bad_images"] = int(n_bad.item())
        images = {}
        if details is not None:
            rows = worst_picture_rows(emb, row_ids, data.val_rows, details, cfg.picture)  # collective
            if rank == 0:
                images[PICTURE_TAG] = save_training_picture(rows, data.val_frame, cfg.picture, run_dir, epoch)
        return metrics, images

    def save_and_report(metrics: dict, epoch: int, step: int, sums: dict, n_steps: int, new_best: bool) -> None:
        # Ray: every rank calls this (the RNG gather is a collective, report a barrier); rank 0 writes.
        rng = _all_ranks(capture_rng())
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = training_state(
                    extractor, criterion, optimizer, scheduler,
                    epoch=epoch,  # the position to continue from: epoch, and global step within it
                    step=step,
                    optimizer_steps=optimizer_steps,
                    partial_epoch={"sums": sums, "steps": n_steps},  # train logs of a mid-epoch checkpoint
                    best=best,
                    best_epoch=best_epoch,
                    last_val=last_val,
                    rng=rng,  # per rank
                    world_size=world_size,
                    config=cfg.model_dump(mode="json"),
                )
                save_atomic(state, os.path.join(tmp, STATE_FILE))
                ckpt = Checkpoint.from_directory(tmp)
                if new_best and run_dir:
                    # Besides Ray's latest checkpoints: Ray's own scoring could delete the latest one.
                    os.makedirs(os.path.join(run_dir, BEST_DIR), exist_ok=True)
                    copy_atomic(os.path.join(tmp, STATE_FILE), os.path.join(run_dir, BEST_DIR, STATE_FILE))  # no 2nd torch.save
            if step_records:  # rank 0's per-step records since the last report
                metrics = metrics | {STEPS_KEY: list(step_records)}
                step_records.clear()
            ray.train.report(metrics, checkpoint=ckpt)

    if cfg.validate_untrained and epoch0 == 0 and step0 == 0:
        last_val, images = validate(0)
        ray.train.report({"epoch": 0} | {f"val/{k}": v for k, v in last_val.items()} | ({IMAGES_KEY: images} if images else {}))
        if rank == 0 and not quiet:
            print(format_progress_line({"epoch": 0} | {f"val/{k}": v for k, v in last_val.items()}, cfg.max_epochs,
                                       metric_key, None), flush=True)

    accumulate = cfg.accumulate_grad_batches
    started = time.time()
    for epoch in range(epoch0, cfg.max_epochs):
        sampler.set_epoch(epoch)
        start_step = step0 if epoch == epoch0 else 0
        sampler.set_start_step(start_step)
        if frozen != (epoch < cfg.freeze_n_epochs):
            # DDP registers the trainable parameters when it wraps, so wrap again after a change.
            frozen = epoch < cfg.freeze_n_epochs
            set_trainable(extractor_param_groups(extractor)["backbone"], not frozen)
            model = wrap_ddp(model, device)  # the old wrapper's hooks go
        model.train()
        criterion.train()
        resumed = partial if start_step else {"sums": {}, "steps": 0}
        sums: dict[str, torch.Tensor | float] = dict(resumed["sums"])
        n_done, epoch_start, bad_images = resumed["steps"], time.time(), 0
        seeds = (step_seed(cfg.seed, epoch, step, rank) for step in range(start_step, sampler.n_steps))
        batches = data.train_batches.epoch(seeds)  # on the device; augmentation finished there is seeded per step
        used_lr = learning_rates()
        for step in range(start_step, sampler.n_steps):
            # Before the batch: its augmentations too when they run here (num_workers: 0); DataLoader
            # processes draw from their own seeds.
            seed_everything(step_seed(cfg.seed, epoch, step, rank))
            batch = next(batches)
            bad_images += batch.get("n_bad_images", 0)  # on_bad_image: skip
            images = batch["image"]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"]
            update = (step + 1) % accumulate == 0 or step + 1 == sampler.n_steps
            logs = micro_step(
                model, criterion_ddp, optimizer, images, labels, update=update, accumulate=accumulate,
                clip_grad_norm=cfg.gradient_clip_val, autocast_dtype=autocast_dtype, sync_logs=False,
            )
            for name, value in logs.items():  # device tensors: no host sync per step
                sums[name] = sums.get(name, 0.0) + value
            n_done += 1
            if not update:
                continue
            optimizer_steps += 1
            used_lr = learning_rates()  # the rates this step trained with, before the scheduler moves them
            if rank == 0 and cfg.log_every_n_steps and optimizer_steps % cfg.log_every_n_steps == 0:
                # This step's loss terms (global, from reduce_loss) and rates: one host sync per N steps, on rank 0.
                step_records.append({"step": optimizer_steps} | {k: float(v) for k, v in logs.items()}
                                    | {"lr": next(iter(used_lr.values()))}
                                    | ({f"lr/{name}": lr for name, lr in used_lr.items()} if len(used_lr) > 1 else {}))
            step_scheduler("step", step + 1)
            every = cfg.checkpoint_every_n_steps
            if every and (step + 1) % every == 0 and step + 1 < sampler.n_steps:
                floats = {k: float(v) for k, v in sums.items()}
                step_metrics = {"epoch": epoch, "step": step + 1} | {f"train/{k}": v / n_done for k, v in floats.items()}
                save_and_report(step_metrics, epoch, step + 1, floats, n_done, new_best=False)
        step_scheduler("epoch", epoch + 1)

        epoch_time = time.time() - epoch_start
        metrics = {"epoch": epoch + 1} | {f"train/{k}": float(v) / max(n_done, 1) for k, v in sums.items()}
        metrics["train/lr"] = next(iter(used_lr.values()))  # as Lightning's LearningRateMonitor: the lr trained with
        if len(used_lr) > 1:
            metrics |= {f"train/lr/{name}": lr for name, lr in used_lr.items()}
        if cfg.freeze_n_epochs:
            metrics["train/backbone_frozen"] = float(frozen)
        metrics["train/images_per_s"] = (sampler.n_steps - start_step) * sampler.global_batch_size / max(epoch_time, 1e-9)
        metrics["train/epoch_time_s"] = epoch_time
        if cfg.on_bad_image == "skip":  # a collective, so only where the policy makes it count
            metrics["train/bad_images"] = int(all_reduce_sum(torch.tensor(float(bad_images), device=device)).item())
        new_best, images = False, {}
        if (epoch + 1) % cfg.valid_period == 0 or epoch + 1 == cfg.max_epochs:
            last_val, images = validate(epoch + 1)
            metrics |= {f"val/{k}": v for k, v in last_val.items()}
            value = last_val.get(metric_key)
            if value is not None and not math.isnan(value) and (best is None or sign * value > sign * best):
                best, best_epoch, new_best = value, epoch + 1, True
        metrics["best/" + metric_key] = best if best is not None else float("nan")
        save_and_report(metrics | ({IMAGES_KEY: images} if images else {}), epoch + 1, 0, {}, 0, new_best)
        if rank == 0 and not quiet:
            done = epoch + 1 - epoch0
            eta = (time.time() - started) / done * (cfg.max_epochs - epoch - 1)
            print(format_progress_line(metrics, cfg.max_epochs, metric_key, eta), flush=True)

    return {"val": last_val, "epochs": cfg.max_epochs, "best": best, "best_epoch": best_epoch}

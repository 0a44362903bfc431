"""Training on Ray Train: the driver (``fit``) and the recipe every worker runs (``train_loop_per_worker``).

The recipe reads top to bottom: set up data, model, loss and optimizer, restore a checkpoint if Ray
hands one over, then train, validate, checkpoint and report once per epoch. It is the same code at
every world size; with one worker the gathers are no-ops and there is no DDP wrapper.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import torch

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device, prepare_model

from raymetric.config import TrainConfig, check_config, checkpoint_metric_key, dump_config
from raymetric.data.csv import load_dataset_csv, remap_labels
from raymetric.data.dataset import ImageDataset
from raymetric.data.transforms import build_transforms
from raymetric.distributed import all_gather_nograd, all_gather_with_grad
from raymetric.evaluation import ValidationRows, embed, shard_rows, validation_metrics
from raymetric.extractors import build_extractor
from raymetric.losses import build_criterion, reduce_loss
from raymetric.optim import build_optimizer, build_scheduler
from raymetric.samplers import build_sampler, check_balance_args

STATE_FILE = "state.pt"
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


def prepare_run(cfg: TrainConfig, extractors: dict | None = None) -> tuple[TrainConfig, pd.DataFrame]:
    """Driver-side checks before any worker starts: config, demo data, dataset CSV, sampler feasibility.

    Returns the config with absolute paths (workers change directory) and the checked dataset.
    Raises ConfigError, DatasetError or SamplerError naming the key, column or rows.
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
    df = load_dataset_csv(cfg.dataset_csv, cfg.dataset_root, check_files=True)
    train_labels = df.loc[df["split"] == "train", "label"].to_numpy()
    check_balance_args(train_labels, **cfg.sampler.args, world_size=cfg.ray.num_workers)
    return cfg, df


def check_cluster_resources(cfg: TrainConfig) -> None:
    """Refuse a request the running cluster cannot hold, instead of waiting for resources forever."""
    from raymetric.config import ConfigError

    total = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"config key ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
            f"needs {need_cpu:g} CPUs; the Ray cluster has {total.get('CPU', 0):g}"
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
) -> TorchTrainer:
    """The Ray Train trainer of a checked config (``prepare_run``), writing into ``run_dir``.

    ``run_dir`` must be ``<cfg.ray.storage_path>/<name>``: Ray keeps its checkpoints there, and a
    second fit with the same directory resumes from them. ``callbacks``: more Ray Train
    ``UserCallback``s (Tune's report forwarding, loggers).
    """
    storage_path, name = os.path.split(os.path.abspath(run_dir))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "extractors": extractors, "quiet": quiet},
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
            callbacks=[HistoryCallback(os.path.join(run_dir, HISTORY_FILE)), *(callbacks or [])],
        ),
    )


def new_run_dir(cfg: TrainConfig) -> str:
    """``<storage_path>/<ray.name or date_time_postfix>``, created, with the resolved config in it."""
    name = cfg.ray.name or f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{cfg.postfix}"
    run_dir = os.path.join(cfg.ray.storage_path, name)
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, CONFIG_FILE))
    return run_dir


def fit(cfg: TrainConfig, *, extractors: dict | None = None, quiet: bool = False) -> RunResult:
    """Check everything on the driver, train on Ray Train, write the run directory.

    Args:
        cfg: the typed config.
        extractors: extra extractor classes by name (a user's own ``nn.Module``s), usable in
            ``extractor.name``.
        quiet: no per-epoch lines from the workers.
    """
    from raymetric.ray_env import init_ray

    cfg, _ = prepare_run(cfg, extractors)
    init_ray(quiet=quiet)
    check_cluster_resources(cfg)
    run_dir = new_run_dir(cfg)
    result = make_trainer(cfg, run_dir, extractors=extractors, quiet=quiet).fit()
    metrics = (result.return_value or {}).get("val") or {}
    with open(os.path.join(run_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2)
    return RunResult(run_dir, metrics, result.checkpoint.path if result.checkpoint else None)


# ---------------------------------------------------------------- worker recipe


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Augmentations and DataLoader worker seeds depend on (seed, epoch, rank) only, so a resumed
    # run draws the same random numbers as an uninterrupted one.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _format_epoch_line(epoch: int, max_epochs: int, metrics: dict, key: str, eta_s: float) -> str:
    line = (
        f"epoch {epoch}/{max_epochs}  loss {metrics['train/loss']:.4f}  "
        f"active {metrics.get('train/active_triplets', float('nan')):.2f}  "
        f"{metrics['train/images_per_s']:.0f} img/s"
    )
    if f"val/{key}" in metrics:
        line += f"  val/{key} {metrics[f'val/{key}']:.4f}"
    return line + f"  eta {eta_s / 60:.1f} min"


def train_loop_per_worker(loop_config: dict) -> dict:
    """What every Ray Train worker runs. Ray: every rank reports every epoch, or the run hangs."""
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    use_gpu = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if (cfg.precision == "bf16" and use_gpu) else None
    metric_key = checkpoint_metric_key(cfg)
    sign = 1.0 if cfg.mode_for_checkpointing == "max" else -1.0

    # -- data (the driver has checked the CSV; workers only re-read it)
    df = load_dataset_csv(cfg.dataset_csv, cfg.dataset_root, check_files=False)
    train_df = df[df["split"] == "train"]
    val_df = df[df["split"] == "validation"].reset_index(drop=True)
    train_labels, _ = remap_labels(train_df["label"])
    train_set = ImageDataset(train_df, build_transforms(cfg.transforms_train.name, cfg.transforms_train.args), labels=train_labels)
    sampler = build_sampler(
        cfg.sampler.name, train_labels, cfg.sampler.args, world_size=world_size, rank=rank, seed=cfg.seed
    )
    loader_args = {"num_workers": cfg.num_workers, "pin_memory": use_gpu, "persistent_workers": cfg.num_workers > 0}
    # Not ray.train.torch.prepare_data_loader: it would replace the P x K batch sampler with a DistributedSampler.
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, **loader_args)
    val_rows = ValidationRows.from_frame(val_df)
    my_val_rows = shard_rows(len(val_df), rank, world_size)
    val_set = ImageDataset(val_df.iloc[my_val_rows], build_transforms(cfg.transforms_val.name, cfg.transforms_val.args))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.bs_val, shuffle=False, **loader_args)

    # -- model, loss, optimizer
    torch.manual_seed(cfg.seed)  # the same initial weights at every world size
    model = prepare_model(build_extractor(cfg.extractor.name, cfg.extractor.args, loop_config.get("extractors")))
    miner = cfg.criterion.miner.model_dump() if cfg.criterion.miner else None
    criterion = build_criterion(cfg.criterion.name, cfg.criterion.args, miner).to(device)
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = build_optimizer(cfg.optimizer.name, params, cfg.optimizer.args)
    scheduler = build_scheduler(cfg.scheduling.scheduler.name, optimizer, cfg.scheduling.scheduler.args) if cfg.scheduling else None

    # -- resume
    start_epoch, best, last_val = 0, None, {}
    checkpoint = ray.train.get_checkpoint()  # None on the first attempt; the latest registered one after a restart
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, last_val = state["epoch"], state["best"], state["last_val"]

    def validate() -> dict:
        emb, index = embed(_unwrap(model), val_loader, device, autocast_dtype)
        row_ids = torch.as_tensor(my_val_rows, dtype=torch.int64)[index]
        return validation_metrics(emb, row_ids, val_rows, cfg.metric_args)

    if cfg.validate_untrained and start_epoch == 0:
        last_val = validate()
        ray.train.report({"epoch": 0} | {f"val/{k}": v for k, v in last_val.items()})
        if rank == 0 and not loop_config.get("quiet"):
            print(f"epoch 0/{cfg.max_epochs}  untrained  val/{metric_key} {last_val.get(metric_key, float('nan')):.4f}", flush=True)

    started = time.time()
    for epoch in range(start_epoch, cfg.max_epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank))
        model.train()
        epoch_start = time.time()
        sums: dict[str, float] = {}
        n_steps = 0
        for batch in train_loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_dtype is not None):
                emb = model(images)
            emb = emb.float()
            # Mine over the global batch: gathered in rank order with autograd, anchors stay local.
            ref_emb = all_gather_with_grad(emb)  # [W*B, D]
            ref_labels = all_gather_nograd(labels)  # [W*B]
            anchor_ref_index = rank * len(emb) + torch.arange(len(emb), device=device)
            loss, logs = reduce_loss(criterion(emb, labels, ref_emb, ref_labels, anchor_ref_index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n_steps += 1
            if scheduler is not None and cfg.scheduling.scheduler_interval == "step" and n_steps % cfg.scheduling.scheduler_frequency == 0:
                scheduler.step()
            for name, value in logs.items():
                sums[name] = sums.get(name, 0.0) + value
        if scheduler is not None and cfg.scheduling.scheduler_interval == "epoch" and (epoch + 1) % cfg.scheduling.scheduler_frequency == 0:
            scheduler.step()

        epoch_time = time.time() - epoch_start
        metrics = {"epoch": epoch + 1} | {f"train/{k}": v / max(n_steps, 1) for k, v in sums.items()}
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics["train/images_per_s"] = n_steps * sampler.global_batch_size / max(epoch_time, 1e-9)
        metrics["train/epoch_time_s"] = epoch_time
        if (epoch + 1) % cfg.valid_period == 0 or epoch + 1 == cfg.max_epochs:
            last_val = validate()
            metrics |= {f"val/{k}": v for k, v in last_val.items()}
            value = last_val.get(metric_key)
            if value is not None and not math.isnan(value) and (best is None or sign * value > sign * best):
                best = value
        metrics["best/" + metric_key] = best if best is not None else float("nan")

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "criterion": criterion.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "epoch": epoch + 1,
                    "best": best,
                    "last_val": last_val,
                    "config": cfg.model_dump(mode="json"),
                }
                torch.save(state, os.path.join(tmp, STATE_FILE))
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)  # Ray: a barrier; every rank calls it
        if rank == 0 and not loop_config.get("quiet"):
            done = epoch + 1 - start_epoch
            eta = (time.time() - started) / done * (cfg.max_epochs - epoch - 1)
            print(_format_epoch_line(epoch + 1, cfg.max_epochs, metrics, metric_key, eta), flush=True)

    return {"val": last_val, "epochs": cfg.max_epochs}

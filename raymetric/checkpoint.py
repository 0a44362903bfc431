"""What a checkpoint holds beyond module states: random-number states and per-step seeds, atomic writes.

Training draws its randomness from seeds derived from ``(seed, epoch, step, rank)``: the main
process is reseeded before every step, so a run resumed at any step draws the same numbers as an
uninterrupted one (augmentations included when they run in the main process, ``num_workers: 0``).
The RNG states are also saved, per rank, for completeness. Everything here loads with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "state.pt"
BEST_DIR = "best"  # <run_dir>/best/state.pt: the best-by-metric checkpoint, besides Ray's latest ones


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 32-bit seed that depends on ``(seed, epoch, step, rank)`` only.

    >>> step_seed(42, 0, 3, 1) == step_seed(42, 0, 3, 1) != step_seed(42, 0, 3, 0)
    True
    """
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy's global generator and Python's ``random``."""
    torch.manual_seed(seed)  # also every CUDA device
    np.random.seed(seed)
    random.seed(seed)


def capture_rng() -> dict:
    """The process's RNG states, in a form ``torch.load(weights_only=True)`` accepts.

    >>> state = capture_rng(); a = torch.rand(1); restore_rng(state); bool(torch.rand(1) == a)
    True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    """Set the process's RNG states from ``capture_rng()``'s output."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_atomic(state: dict, path: str) -> None:
    """``torch.save`` to ``path`` so that a crash mid-write leaves the previous file intact.

    Writes a temporary file next to it, flushes it to disk, then renames it over ``path``.
    """
    _write_atomic(path, lambda f: torch.save(state, f))


def copy_atomic(src: str, path: str) -> None:
    """Copy the file ``src`` to ``path`` as :func:`save_atomic` writes (a crash leaves the previous ``path``)."""
    _write_atomic(path, lambda f: _copy_into(src, f))


def _copy_into(src: str, f) -> None:
    with open(src, "rb") as source:
        shutil.copyfileobj(source, f)


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state(path: str, device: torch.device | str = "cpu") -> dict:
    """A state written by ``save_atomic`` (``weights_only``: no code runs on load)."""
    return torch.load(path, map_location=device, weights_only=True)


def training_state(extractor, criterion, optimizer, scheduler, **extra) -> dict:
    """The module and optimizer states of a checkpoint, plus ``extra`` (position, best metric, RNG states, config).

    ``criterion.state_dict()`` holds the loss parameters (ArcFace's class weights) and the miner's
    state (memory bank, call counter). Pass the unwrapped modules, not their DDP wrappers.
    """
    return {
        "model": extractor.state_dict(),
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    } | extra


# Scheduler state that is progress (kept from the checkpoint); every other entry is an argument.
_SCHEDULE_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step",
                      "_schedulers", "base_lrs"}


def _merge_schedule(saved: dict, fresh: dict) -> dict:
    """The checkpoint's scheduler state with the config's arguments and base learning rates (``fresh``)."""
    out = dict(saved)
    out.update({k: v for k, v in fresh.items() if k not in _SCHEDULE_PROGRESS})
    if "base_lrs" in fresh:
        out["base_lrs"] = fresh["base_lrs"]
    if "_schedulers" in saved:  # SequentialLR (warm-up, then the scheduler)
        out["_schedulers"] = [_merge_schedule(s, f) for s, f in zip(saved["_schedulers"], fresh["_schedulers"])]
    return out


def restore_training_state(state: dict, extractor, criterion, optimizer, scheduler) -> None:
    """Load what ``training_state`` saved into freshly built objects (strictly: a mismatch raises).

    The optimizer and the scheduler continue from the checkpoint's state (moments, step counts, the
    learning rate reached) under the config's arguments: a resumed run may change them. Every optimizer
    argument (weight decay, betas, fused, ...) is the config's; the learning rate reached is scaled by
    the config's base learning rate over the checkpoint's (unchanged when they are equal); the scheduler
    keeps its position and takes the config's arguments (``T_max``, ``gamma``, milestones, warm-up) for
    the steps that remain. With the same config, everything is the checkpoint's, bit for bit.
    """
    extractor.load_state_dict(state["model"])
    criterion.load_state_dict(state["criterion"])
    if (scheduler is None) != (state["scheduler"] is None):
        raise ValueError("the checkpoint and the config disagree on whether there is an LR scheduler")
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_schedule = scheduler.state_dict() if scheduler is not None else None
    optimizer.load_state_dict(state["optimizer"])
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        reached, old_base = group["lr"], group.get("initial_lr", group["lr"])
        new_base = fresh.get("initial_lr", fresh["lr"])
        group.update({k: v for k, v in fresh.items() if k not in ("lr", "initial_lr")})
        if "initial_lr" in fresh:
            group["initial_lr"] = new_base
        if scheduler is None:
            group["lr"] = fresh["lr"]
        elif new_base != old_base:
            group["lr"] = reached * new_base / old_base if old_base else new_base
    if scheduler is not None:
        scheduler.load_state_dict(_merge_schedule(state["scheduler"], fresh_schedule))
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ---------------------------------------------------------------- resuming


# Config keys that decide the shapes and meaning of what a checkpoint holds. Anything else (learning
# rate and other optimizer and scheduler arguments, margin, epochs, workers, data) may change when a
# run is resumed (restore_training_state applies them).
STRUCTURAL_KEYS = (
    "extractor.name",
    "extractor.args",
    "criterion.name",
    "criterion.miner.name",
    "optimizer.name",
    "scheduling.scheduler.name",
)
IGNORED_ARGS = {"extractor.args": ("weights",)}  # where the first weights came from no longer matters


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    if dotted in IGNORED_ARGS and isinstance(node, dict):
        node = {k: v for k, v in node.items() if k not in IGNORED_ARGS[dotted]}
    return node


def config_mismatches(saved: dict, current: dict) -> list[str]:
    """The structural keys on which a checkpoint's config and the current config differ.

    >>> a = {"extractor": {"name": "timm", "args": {"arch": "resnet18", "weights": "x.pth"}}}
    >>> config_mismatches(a, {"extractor": {"name": "timm", "args": {"arch": "resnet18"}}})
    []
    >>> config_mismatches(a, {"extractor": {"name": "timm", "args": {"arch": "resnet50"}}})
    ["extractor.args: checkpoint {'arch': 'resnet18'}, config {'arch': 'resnet50'}"]
    """
    out = []
    for key in STRUCTURAL_KEYS:
        old, new = _get(saved, key), _get(current, key)
        if old != new:
            out.append(f"{key}: checkpoint {old!r}, config {new!r}")
    return out


def state_mismatches(saved: dict, module: torch.nn.Module, name: str) -> list[str]:
    """Missing, unexpected and differently shaped tensors of ``saved`` against ``module``'s state.

    >>> state_mismatches({"weight": torch.zeros(2, 3)}, torch.nn.Linear(3, 4, bias=False), "model")
    ['model.weight: checkpoint shape [2, 3], model shape [4, 3]']
    """
    expected = module.state_dict()
    out = [f"{name}.{k}: missing from the checkpoint" for k in expected if k not in saved]
    out += [f"{name}.{k}: in the checkpoint, not in the model" for k in saved if k not in expected]
    for k, v in saved.items():
        if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape):
            out.append(f"{name}.{k}: checkpoint shape {list(v.shape)}, model shape {list(expected[k].shape)}")
    return out


def resume_target(path: str) -> tuple[str, str]:
    """What ``resume_from`` names: ``("run", run_dir)`` or ``("checkpoint", state_path)``.

    A run directory (Ray's ``checkpoint_manager_snapshot.json`` in it) is continued in place; a
    checkpoint folder or ``state.pt`` starts a new run from its state.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "checkpoint_manager_snapshot.json")):
        return "run", path
    if os.path.isfile(path):
        return "checkpoint", path
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return "checkpoint", os.path.join(path, STATE_FILE)
    raise FileNotFoundError(
        f"{path} is neither a run directory (with checkpoint_manager_snapshot.json) nor a checkpoint "
        f"(a folder with {STATE_FILE}, or the file)"
    )

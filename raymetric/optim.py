"""Optimizers and learning-rate schedulers by name, straight from ``torch.optim``; parameter groups; warm-up.

Parameters fall into three groups, each of which can get its own optimizer arguments (a learning
rate, a weight decay): ``backbone`` and ``head`` of the extractor (``Extractor.param_groups``) and
``loss``, the criterion's own parameters (ArcFace's class weights). ``freeze_n_epochs`` freezes the
``backbone`` group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from raymetric.distributed import unwrap

GROUPS = ("backbone", "head", "loss")


def build_optimizer(name: str, params: Iterable, args: dict | None = None) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` (tensors, or param-group dicts).

    >>> p = [torch.nn.Parameter(torch.zeros(2))]
    >>> type(build_optimizer("adamw", p, {"lr": 1e-3})).__name__
    'AdamW'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **(args or {}))


def has_fused(name: str) -> bool:
    """Whether the optimizer registered as ``name`` takes ``fused`` (a single fused kernel per step).

    >>> has_fused("adamw"), has_fused("rprop")
    (True, False)
    """
    import inspect

    return name in OPTIMIZERS and "fused" in inspect.signature(OPTIMIZERS[name]).parameters


def optimizer_args(name: str, args: dict, fused: bool | str, device_type: str) -> dict:
    """``args`` plus ``fused=True`` where wanted: ``fused`` true, or ``"auto"`` on a GPU; never over an
    explicit ``fused`` or ``foreach``.

    >>> optimizer_args("adam", {"lr": 0.1}, "auto", "cuda"), optimizer_args("adam", {"lr": 0.1}, "auto", "cpu")
    ({'lr': 0.1, 'fused': True}, {'lr': 0.1})
    """
    wanted = fused is True or (fused == "auto" and device_type == "cuda")
    if wanted and has_fused(name) and "fused" not in args and "foreach" not in args:
        return {**args, "fused": True}
    return dict(args)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, args: dict | None = None):
    """Build the LR scheduler registered as ``name`` for ``optimizer``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, **(args or {}))


def build_lr_schedule(
    name: str,
    optimizer: torch.optim.Optimizer,
    args: dict | None = None,
    warmup: int = 0,
    warmup_start_factor: float = 0.01,
):
    """The scheduler ``name``, preceded by ``warmup`` scheduler steps of linear warm-up when ``warmup > 0``.

    The warm-up scales every group's learning rate from ``warmup_start_factor`` to 1; the main
    scheduler starts counting after it (``torch.optim.lr_scheduler.SequentialLR``).

    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = build_lr_schedule("step", opt, {"step_size": 1, "gamma": 0.5}, warmup=2, warmup_start_factor=0.5)
    >>> lrs = []
    >>> for _ in range(5):
    ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    >>> lrs
    [0.5, 0.75, 1.0, 0.5, 0.25]
    """
    main = build_scheduler(name, optimizer, args)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, warmup_start_factor, 1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def param_groups(
    model: nn.Module, criterion: nn.Module, overrides: dict[str, dict] | None = None
) -> list[dict]:
    """Optimizer param groups ``backbone``, ``head`` and ``loss`` (empty ones left out), with per-group arguments.

    >>> groups = param_groups(nn.Linear(2, 2), nn.Identity(), {"backbone": {"lr": 0.1}})
    >>> [(g["name"], len(g["params"]), g.get("lr")) for g in groups]
    [('backbone', 2, 0.1)]
    """
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; known: {list(GROUPS)}")
    named = extractor_param_groups(model) | {"loss": list(criterion.parameters())}
    return [{"name": n, "params": named[n], **overrides.get(n, {})} for n in GROUPS if named.get(n)]


def extractor_param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{"backbone": [...], "head": [...]}`` of an extractor (all ``backbone`` when it does not say)."""
    model = unwrap(model)  # under DDP
    groups = model.param_groups() if hasattr(model, "param_groups") else {"backbone": list(model.parameters())}
    unknown = sorted(set(groups) - {"backbone", "head"})
    if unknown:
        raise ValueError(f"{type(model).__name__}.param_groups() returned unknown group(s) {unknown}")
    return groups


def set_trainable(params: Iterable[nn.Parameter], trainable: bool) -> None:
    """Freeze or unfreeze parameters (``requires_grad``); the optimizer skips parameters without a gradient."""
    for p in params:
        p.requires_grad_(trainable)


OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "radam": torch.optim.RAdam,
    "nadam": torch.optim.NAdam,
    "adamax": torch.optim.Adamax,
    "asgd": torch.optim.ASGD,
    "rprop": torch.optim.Rprop,
}

SCHEDULERS = {
    "multi_step": torch.optim.lr_scheduler.MultiStepLR,
    "step": torch.optim.lr_scheduler.StepLR,
    "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
    "cosine_annealing": torch.optim.lr_scheduler.CosineAnnealingLR,  # OML's name
    "cosine_warm_restarts": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
    "linear": torch.optim.lr_scheduler.LinearLR,
    "constant": torch.optim.lr_scheduler.ConstantLR,
    "polynomial": torch.optim.lr_scheduler.PolynomialLR,
    "cyclic": torch.optim.lr_scheduler.CyclicLR,
    "one_cycle": torch.optim.lr_scheduler.OneCycleLR,
}

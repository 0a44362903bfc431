"""Optimizers and learning-rate schedulers by name, straight from ``torch.optim``."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def build_optimizer(name: str, params: Iterable, args: dict | None = None) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params``.

    >>> p = [torch.nn.Parameter(torch.zeros(2))]
    >>> type(build_optimizer("adamw", p, {"lr": 1e-3})).__name__
    'AdamW'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **(args or {}))


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, args: dict | None = None):
    """Build the LR scheduler registered as ``name`` for ``optimizer``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, **(args or {}))


OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "radam": torch.optim.RAdam,
    "nadam": torch.optim.NAdam,
    "adamax": torch.optim.Adamax,
}

SCHEDULERS = {
    "multi_step": torch.optim.lr_scheduler.MultiStepLR,
    "step": torch.optim.lr_scheduler.StepLR,
    "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
    "cosine_warm_restarts": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
    "linear": torch.optim.lr_scheduler.LinearLR,
    "constant": torch.optim.lr_scheduler.ConstantLR,
    "one_cycle": torch.optim.lr_scheduler.OneCycleLR,
}

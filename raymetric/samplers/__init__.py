"""Batch samplers planned globally from ``(seed, epoch)`` and split across workers (REFERENCE.md §3).

Every sampler here is a DataLoader ``batch_sampler`` whose global step does not depend on the number
of workers: the rank-order concatenation of the workers' batches is the batch one process would
get. See ``base.py`` for the shared mechanism.

| name | batch |
|---|---|
| ``balance`` | P labels x K instances (OML's ``BalanceSampler``) |
| ``category_balance`` | C categories x P labels x K instances (OML's ``CategoryBalanceSampler``) |
| ``distinct_category_balance`` | the same, labels not reused until their category is exhausted |
| ``sampler: null`` | ``bs_train`` shuffled items (``ShuffledBatchSampler``) |
"""

from __future__ import annotations

import inspect

import numpy as np  # noqa: F401  (the doctests use it)

from raymetric.samplers.balance import BalancedBatchSampler, check_balance_args
from raymetric.samplers.base import GlobalPlanSampler, SamplerError
from raymetric.samplers.category import CategoryBalancedBatchSampler, DistinctCategoryBatchSampler
from raymetric.samplers.shuffle import ShuffledBatchSampler

__all__ = [
    "SAMPLERS",
    "BalancedBatchSampler",
    "CategoryBalancedBatchSampler",
    "DistinctCategoryBatchSampler",
    "GlobalPlanSampler",
    "SamplerError",
    "ShuffledBatchSampler",
    "build_sampler",
    "check_balance_args",
]

SAMPLERS = {
    "balance": BalancedBatchSampler,
    "category_balance": CategoryBalancedBatchSampler,
    "distinct_category_balance": DistinctCategoryBatchSampler,
}

# What the training code passes itself (not config arguments).
RUNTIME_ARGS = ("labels", "categories", "world_size", "rank", "seed")


def build_sampler(
    name: str | None,
    labels,
    args: dict,
    *,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    categories=None,
) -> GlobalPlanSampler:
    """Build the sampler registered as ``name``; ``name=None`` gives plain shuffled batches (``args={"batch_size": ...}``).

    ``categories`` (one per item, or None) goes to the samplers that use categories.

    >>> build_sampler(None, np.zeros(10), {"batch_size": 4}).n_steps
    2
    """
    if name is None:
        return ShuffledBatchSampler(labels, **args, world_size=world_size, rank=rank, seed=seed)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    factory = SAMPLERS[name]
    extra = {"categories": categories} if "categories" in inspect.signature(factory).parameters else {}
    return factory(labels, **extra, **args, world_size=world_size, rank=rank, seed=seed)

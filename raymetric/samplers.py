"""Batch samplers that form P labels x K instances batches, planned globally and split across workers.

Every worker draws the same global plan from ``(seed, epoch)`` and keeps its own slice of each global
step, so the plan does not depend on the world size: the concatenation of all workers' batches of a
step, in rank order, is exactly the batch that one process would get (OML's ``BalanceSampler``
semantics, REFERENCE.md §3). No communication is needed and every worker has the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class SamplerError(ValueError):
    """Sampler settings that cannot work with this dataset or this number of workers."""


class BalancedBatchSampler:
    """Distributed P x K batch sampler with OML's ``BalanceSampler`` semantics.

    Each epoch the labels are shuffled and dealt out ``n_labels`` at a time, so every label is used
    at most once per epoch and an epoch has ``L // n_labels`` global steps (leftover labels are
    dropped for that epoch). For each chosen label, ``n_instances`` of its items are drawn without
    replacement; a label with fewer items contributes all of them (shuffled) and then repeats some.
    Each global step's labels are split into ``world_size`` contiguous groups of
    ``n_labels // world_size``; worker ``rank`` gets group ``rank``.

    Use it as a DataLoader's ``batch_sampler``; call ``set_epoch`` before each epoch and
    ``set_start_step`` to resume in the middle of one.

    Args:
        labels: label of every item of the dataset (any hashable ints).
        n_labels: P, labels per global batch.
        n_instances: K, items per label.
        world_size: number of workers sharing each global batch.
        rank: this worker.
        seed: base seed; the plan of an epoch depends on ``(seed, epoch)`` only.

    >>> s = BalancedBatchSampler([0, 0, 1, 1, 2, 2, 3, 3], n_labels=2, n_instances=2)
    >>> len(s), [len(b) for b in s]
    (2, [4, 4])
    >>> halves = [BalancedBatchSampler([0, 0, 1, 1, 2, 2, 3, 3], 2, 2, world_size=2, rank=r) for r in (0, 1)]
    >>> [a + b for a, b in zip(*halves)] == list(s)
    True
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        n_labels: int,
        n_instances: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        labels = np.asarray(labels)
        check_balance_args(labels, n_labels, n_instances, world_size)
        if not 0 <= rank < world_size:
            raise SamplerError(f"rank {rank} is outside [0, {world_size})")
        self.n_labels = n_labels
        self.n_instances = n_instances
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.unique_labels, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))[:-1]
        self._items_of_label = np.split(order, bounds)  # list of [n_items] index arrays, one per label
        self.n_steps = len(self.unique_labels) // n_labels
        self.epoch = 0
        self.start_step = 0

    @property
    def batch_size_per_worker(self) -> int:
        return self.n_labels // self.world_size * self.n_instances

    @property
    def global_batch_size(self) -> int:
        return self.n_labels * self.n_instances

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields; resets the start step to 0."""
        self.epoch = epoch
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Skip the first ``step`` global steps of the current epoch (resume mid-epoch)."""
        if not 0 <= step <= self.n_steps:
            raise SamplerError(f"start step {step} is outside [0, {self.n_steps}]")
        self.start_step = step

    def global_plan(self, epoch: int) -> list[list[np.ndarray]]:
        """Global plan of an epoch: ``plan[step][j]`` holds the K item indices of the step's j-th label."""
        rng = np.random.default_rng([self.seed, epoch])
        label_order = rng.permutation(len(self.unique_labels))
        plan = []
        for step in range(self.n_steps):
            step_labels = label_order[step * self.n_labels : (step + 1) * self.n_labels]
            plan.append([self._draw_instances(rng, self._items_of_label[j]) for j in step_labels])
        return plan

    def _draw_instances(self, rng: np.random.Generator, items: np.ndarray) -> np.ndarray:
        if len(items) >= self.n_instances:
            return rng.choice(items, size=self.n_instances, replace=False)
        # All items first, then repeats, so a small label still shows every item it has.
        extra = rng.choice(items, size=self.n_instances - len(items), replace=True)
        return np.concatenate([rng.permutation(items), extra])

    def __iter__(self) -> Iterator[list[int]]:
        per_worker = self.n_labels // self.world_size
        mine = slice(self.rank * per_worker, (self.rank + 1) * per_worker)
        for step_labels in self.global_plan(self.epoch)[self.start_step :]:
            yield np.concatenate(step_labels[mine]).tolist()

    def __len__(self) -> int:
        return self.n_steps - self.start_step


def check_balance_args(labels: np.ndarray, n_labels: int, n_instances: int, world_size: int = 1) -> None:
    """Raise ``SamplerError`` naming the numbers when a P x K plan is impossible.

    >>> check_balance_args(np.array([0, 0, 1]), 2, 2)
    Traceback (most recent call last):
    ...
    raymetric.samplers.SamplerError: every label needs >= 2 items for a balanced sampler; 1 label(s) have 1: [1]
    """
    unique, counts = np.unique(labels, return_counts=True)
    if n_instances < 2:
        raise SamplerError(f"sampler.args.n_instances must be > 1 (got {n_instances})")
    if n_labels < 2:
        raise SamplerError(f"sampler.args.n_labels must be > 1 (got {n_labels})")
    single = unique[counts < 2]
    if len(single):
        raise SamplerError(
            "every label needs >= 2 items for a balanced sampler; "
            f"{len(single)} label(s) have 1: {single[:10].tolist()}{' ...' if len(single) > 10 else ''}"
        )
    if n_labels > len(unique):
        raise SamplerError(
            f"sampler.args.n_labels={n_labels} is more than the {len(unique)} labels in the training split"
        )
    if world_size < 1 or n_labels % world_size:
        raise SamplerError(
            f"sampler.args.n_labels={n_labels} must be divisible by the number of workers "
            f"(ray.num_workers={world_size}): each global step's labels are split evenly across workers"
        )


SAMPLERS = {"balance": BalancedBatchSampler}


def build_sampler(name: str, labels, args: dict, *, world_size: int = 1, rank: int = 0, seed: int = 0):
    """Build the sampler registered as ``name``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name](labels, **args, world_size=world_size, rank=rank, seed=seed)

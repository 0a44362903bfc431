"""The distributed global-plan batch sampler that every raymetric sampler builds on.

Every worker draws the same global plan of an epoch from ``(seed, epoch)`` and keeps its own slice of
each global step, so the plan does not depend on the world size: the concatenation of all workers'
batches of a step, in rank order, is exactly the batch that one process would get. No communication
is needed, every worker has the same number of steps, and a run resumes mid-epoch from a step index.

A plan is an integer array ``[n_steps, G, K]``: each global step holds ``G`` groups of ``K`` item
indices (a group is one label's ``K`` instances for the P x K samplers, one item for plain shuffled
batches). Worker ``rank`` gets the contiguous groups ``rank * G / W .. (rank + 1) * G / W`` of every
step, so a label's instances stay on one worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class SamplerError(ValueError):
    """Sampler settings that cannot work with this dataset or this number of workers."""


class GlobalPlanSampler:
    """Base class: a DataLoader ``batch_sampler`` that yields this worker's slice of a global plan.

    Subclasses implement ``_plan(rng, epoch) -> [n_steps, G, K]`` and set ``groups_per_step`` (G)
    and ``group_size`` (K) before calling ``_check_split``.

    Args:
        labels: label of every item of the dataset (any ints).
        world_size: number of workers sharing each global batch.
        rank: this worker.
        seed: base seed; the plan of an epoch depends on ``(seed, epoch)`` only.
    """

    groups_per_step: int
    group_size: int

    def __init__(self, labels: Sequence[int] | np.ndarray, *, world_size: int = 1, rank: int = 0, seed: int = 0):
        if not 0 <= rank < world_size:
            raise SamplerError(f"rank {rank} is outside [0, {world_size})")
        self.labels = np.asarray(labels)
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.unique_labels, inverse = np.unique(self.labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.unique_labels)))[:-1]
        self._items_of_label = np.split(order, bounds)  # list of [n_items] index arrays, one per label
        self.epoch = 0
        self.start_step = 0

    # -- what subclasses provide

    @property
    def n_steps(self) -> int:
        """Global steps per epoch."""
        raise NotImplementedError

    def _plan(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        raise NotImplementedError

    # -- shared behaviour

    @property
    def global_batch_size(self) -> int:
        return self.groups_per_step * self.group_size

    @property
    def batch_size_per_worker(self) -> int:
        return self.global_batch_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields; resets the start step to 0."""
        self.epoch = epoch
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Skip the first ``step`` global steps of the current epoch (resume mid-epoch)."""
        if not 0 <= step <= self.n_steps:
            raise SamplerError(f"start step {step} is outside [0, {self.n_steps}]")
        self.start_step = step

    def state_dict(self) -> dict[str, int]:
        """The sampler's position: the epoch and the next global step to yield."""
        return {"epoch": self.epoch, "step": self.start_step}

    def global_plan(self, epoch: int) -> np.ndarray:
        """The whole epoch's plan, ``[n_steps, G, K]`` item indices; the same on every worker."""
        plan = self._plan(np.random.default_rng([self.seed, epoch]), epoch)
        assert plan.shape == (self.n_steps, self.groups_per_step, self.group_size), plan.shape
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        per_worker = self.groups_per_step // self.world_size
        mine = slice(self.rank * per_worker, (self.rank + 1) * per_worker)
        for step_groups in self.global_plan(self.epoch)[self.start_step :]:
            yield step_groups[mine].reshape(-1).tolist()

    def __len__(self) -> int:
        return self.n_steps - self.start_step

    def _check_split(self, what: str) -> None:
        if self.world_size < 1 or self.groups_per_step % self.world_size:
            raise SamplerError(
                f"{what} must be divisible by the number of workers "
                f"(ray.num_workers={self.world_size}): each global step is split evenly across workers"
            )

    def _draw_instances(self, rng: np.random.Generator, label_index: int, k: int) -> np.ndarray:
        """``k`` items of a label without replacement; a label with fewer shows all of them first, then repeats."""
        items = self._items_of_label[label_index]
        if len(items) >= k:
            return rng.choice(items, size=k, replace=False)
        extra = rng.choice(items, size=k - len(items), replace=True)
        return np.concatenate([rng.permutation(items), extra])


def check_instances(labels: np.ndarray, n_labels: int, n_instances: int, what: str = "a balanced sampler") -> None:
    """Shared checks of the P x K samplers: ``n_instances > 1``, ``1 < n_labels <= labels``, >= 2 items per label.

    >>> check_instances(np.array([0, 0, 1]), 2, 2)
    Traceback (most recent call last):
    ...
    raymetric.samplers.base.SamplerError: every label needs >= 2 items for a balanced sampler; 1 label(s) have 1: [1]
    """
    if n_instances < 2:
        raise SamplerError(f"sampler.args.n_instances must be > 1 (got {n_instances})")
    if n_labels < 2:
        raise SamplerError(f"sampler.args.n_labels must be > 1 (got {n_labels})")
    unique, counts = np.unique(labels, return_counts=True)
    if n_labels > len(unique):
        raise SamplerError(f"sampler.args.n_labels={n_labels} is more than the {len(unique)} labels in the training split")
    single = unique[counts < 2]
    if len(single):
        raise SamplerError(
            f"every label needs >= 2 items for {what}; "
            f"{len(single)} label(s) have 1: {single[:10].tolist()}{' ...' if len(single) > 10 else ''}"
        )

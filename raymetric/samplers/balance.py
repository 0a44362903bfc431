"""P labels x K instances batches (OML's ``BalanceSampler``), planned globally and split across workers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raymetric.samplers.base import GlobalPlanSampler, SamplerError, check_instances


class BalancedBatchSampler(GlobalPlanSampler):
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
        labels: label of every item of the dataset (any ints).
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
        check_balance_args(np.asarray(labels), n_labels, n_instances, world_size)
        super().__init__(labels, world_size=world_size, rank=rank, seed=seed)
        self.n_labels = n_labels
        self.n_instances = n_instances
        self.groups_per_step, self.group_size = n_labels, n_instances

    @property
    def n_steps(self) -> int:
        return len(self.unique_labels) // self.n_labels

    def _plan(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        label_order = rng.permutation(len(self.unique_labels))
        plan = np.empty((self.n_steps, self.n_labels, self.n_instances), dtype=np.int64)
        for step in range(self.n_steps):
            for j, label in enumerate(label_order[step * self.n_labels : (step + 1) * self.n_labels]):
                plan[step, j] = self._draw_instances(rng, label, self.n_instances)
        return plan


def check_balance_args(labels: np.ndarray, n_labels: int, n_instances: int, world_size: int = 1) -> None:
    """Raise ``SamplerError`` naming the numbers when a P x K plan is impossible.

    >>> check_balance_args(np.array([0, 0, 1, 1]), 3, 2)
    Traceback (most recent call last):
    ...
    raymetric.samplers.base.SamplerError: sampler.args.n_labels=3 is more than the 2 labels in the training split
    """
    check_instances(labels, n_labels, n_instances)
    if world_size < 1 or n_labels % world_size:
        raise SamplerError(
            f"sampler.args.n_labels={n_labels} must be divisible by the number of workers "
            f"(ray.num_workers={world_size}): each global step's labels are split evenly across workers"
        )

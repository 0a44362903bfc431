"""Plain shuffled batches (``sampler: null``), planned globally and split across workers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raymetric.samplers.base import GlobalPlanSampler, SamplerError


class ShuffledBatchSampler(GlobalPlanSampler):
    """Every item once per epoch in a random order, ``batch_size`` items per global step, last partial batch dropped.

    This is what OML does without a sampler (``shuffle=True, drop_last=True`` with ``bs_train``), except
    that ``batch_size`` is the global batch: each worker takes ``batch_size / world_size`` consecutive
    items of each global step.

    Args:
        labels: label of every item (only their number matters).
        batch_size: items per global step (``bs_train``).
        world_size: number of workers sharing each global batch.
        rank: this worker.
        seed: base seed; the plan of an epoch depends on ``(seed, epoch)`` only.

    >>> s = ShuffledBatchSampler([0, 1, 2, 3, 4], batch_size=2)
    >>> len(s), sorted(i for b in s for i in b) != list(range(5))
    (2, True)
    """

    def __init__(
        self, labels: Sequence[int] | np.ndarray, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0
    ):
        super().__init__(labels, world_size=world_size, rank=rank, seed=seed)
        if batch_size < 1 or batch_size > len(self.labels):
            raise SamplerError(f"bs_train={batch_size} must be in [1, {len(self.labels)}] (the training items)")
        self.batch_size = batch_size
        self.groups_per_step, self.group_size = batch_size, 1
        self._check_split(f"bs_train={batch_size}")

    @property
    def n_steps(self) -> int:
        return len(self.labels) // self.batch_size

    def _plan(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        order = rng.permutation(len(self.labels))[: self.n_steps * self.batch_size]
        return order.reshape(self.n_steps, self.batch_size, 1)

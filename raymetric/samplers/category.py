"""Category-balanced batches (OML's ``CategoryBalanceSampler`` and ``DistinctCategoryBalanceSampler``).

A global batch holds ``n_categories`` categories x ``n_labels`` labels of each x ``n_instances`` items
of each label, planned globally from ``(seed, epoch)`` and split across workers by label, like
``BalancedBatchSampler``. Categories come from the dataset's ``category`` column, one per item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raymetric.samplers.base import GlobalPlanSampler, SamplerError, check_instances


class _CategorySampler(GlobalPlanSampler):
    """Shared set-up: the categories of the labels, and the checks OML makes (as real errors)."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        categories: Sequence | np.ndarray | None,
        n_categories: int,
        n_labels: int,
        n_instances: int,
        *,
        world_size: int,
        rank: int,
        seed: int,
    ):
        name = type(self).__name__
        labels = np.asarray(labels)
        if categories is None:
            raise SamplerError(f"{name} needs a 'category' column in the dataset CSV (none was found)")
        check_instances(labels, n_labels, n_instances, what=name)
        super().__init__(labels, world_size=world_size, rank=rank, seed=seed)
        categories = np.asarray(categories, dtype=object)
        if categories.shape != labels.shape:
            raise SamplerError(f"{name}: {len(categories)} categories given for {len(labels)} items")
        first = np.array([categories[items[0]] for items in self._items_of_label], dtype=object)
        for j, items in enumerate(self._items_of_label):
            if any(c != first[j] for c in categories[items]):
                raise SamplerError(
                    f"{name}: label {self.unique_labels[j]} is in several categories: {sorted(set(categories[items]))}"
                )
        self.category_names = sorted(set(first))
        index = {c: i for i, c in enumerate(self.category_names)}
        self.category_of_label = np.array([index[c] for c in first], dtype=np.int64)  # [L]
        # label indices of each category, ascending: a fixed order for the seeded draws
        self.labels_of_category = [np.flatnonzero(self.category_of_label == c) for c in range(len(self.category_names))]
        n_cat = len(self.category_names)
        if not 1 <= n_categories <= n_cat:
            raise SamplerError(f"sampler.args.n_categories={n_categories} must be in [1, {n_cat}] (the categories)")
        self.n_categories = n_categories
        self.n_labels = n_labels
        self.n_instances = n_instances
        self.groups_per_step, self.group_size = n_categories * n_labels, n_instances
        self._check_split(f"sampler.args.n_categories x n_labels = {n_categories} x {n_labels} = {n_categories * n_labels}")

    def _check_labels_per_category(self, hint: str = "") -> None:
        short = {
            self.category_names[c]: len(labs) for c, labs in enumerate(self.labels_of_category) if len(labs) < self.n_labels
        }
        if short:
            raise SamplerError(
                f"sampler.args.n_labels={self.n_labels}: every category needs >= {self.n_labels} labels{hint}; "
                f"categories with fewer (labels): {short}"
            )


class CategoryBalancedBatchSampler(_CategorySampler):
    """OML's ``CategoryBalanceSampler``, distributed.

    Every global step independently picks ``n_categories`` categories without replacement (weighted
    by their number of labels when ``weight_categories``), ``n_labels`` labels of each (all of a
    category's labels and then repeats when it has fewer and ``resample_labels`` is set), and
    ``n_instances`` items of each label. An epoch has ``ceil(L / n_labels)`` global steps, as in OML.

    Args:
        labels: label of every item.
        categories: category of every item (the dataset's ``category`` column).
        n_categories: categories per global batch.
        n_labels: labels per category in a batch.
        n_instances: items per label.
        resample_labels: allow categories with fewer than ``n_labels`` labels (a label then repeats
            within a batch, and its two groups may land on different workers).
        weight_categories: pick categories with probability proportional to their number of labels.
        world_size: number of workers sharing each global batch.
        rank: this worker.
        seed: base seed; the plan of an epoch depends on ``(seed, epoch)`` only.

    >>> s = CategoryBalancedBatchSampler([0, 0, 1, 1, 2, 2, 3, 3], list("aabbccdd"), 1, 2, 2, resample_labels=True)
    >>> len(s), [len(b) for b in s]
    (2, [4, 4])
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        categories: Sequence | np.ndarray | None,
        n_categories: int,
        n_labels: int,
        n_instances: int,
        resample_labels: bool = False,
        weight_categories: bool = True,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        super().__init__(
            labels, categories, n_categories, n_labels, n_instances, world_size=world_size, rank=rank, seed=seed
        )
        if not resample_labels:
            self._check_labels_per_category(" (or set sampler.args.resample_labels=true)")
        counts = np.array([len(labs) for labs in self.labels_of_category], dtype=np.float64)
        self.category_weights = counts / counts.sum() if weight_categories else None

    @property
    def n_steps(self) -> int:
        return -(-len(self.unique_labels) // self.n_labels)

    def _plan(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        plan = np.empty((self.n_steps, self.groups_per_step, self.n_instances), dtype=np.int64)
        for step in range(self.n_steps):
            cats = rng.choice(len(self.category_names), size=self.n_categories, replace=False, p=self.category_weights)
            chosen = [_smart_sample(rng, self.labels_of_category[c], self.n_labels) for c in cats]
            for j, label in enumerate(np.concatenate(chosen)):
                plan[step, j] = self._draw_instances(rng, label, self.n_instances)
        return plan


class DistinctCategoryBatchSampler(_CategorySampler):
    """OML's ``DistinctCategoryBalanceSampler``, distributed.

    Like ``CategoryBalancedBatchSampler``, but a label is not used again until its category has no
    unused labels left: each step picks ``n_categories`` of the categories that still have unused
    labels, and ``n_labels`` unused labels of each (when fewer are left, all of them plus some
    already used ones of the same category). When fewer than ``n_categories`` categories have unused
    labels, every label becomes unused again. An epoch has ``epoch_size`` global steps.

    Args:
        labels: label of every item.
        categories: category of every item (the dataset's ``category`` column).
        n_categories: categories per global batch.
        n_labels: labels per category in a batch; every category needs at least this many.
        n_instances: items per label.
        epoch_size: global steps per epoch.
        world_size: number of workers sharing each global batch.
        rank: this worker.
        seed: base seed; the plan of an epoch depends on ``(seed, epoch)`` only.

    >>> labels = [0, 0, 1, 1, 2, 2, 3, 3]  # all in one category: steps 1 and 2 use each label once
    >>> s = DistinctCategoryBatchSampler(labels, ["a"] * 8, 1, 2, 2, epoch_size=2)
    >>> sorted(labels[i] for b in s for i in b)
    [0, 0, 1, 1, 2, 2, 3, 3]
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        categories: Sequence | np.ndarray | None,
        n_categories: int,
        n_labels: int,
        n_instances: int,
        epoch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        super().__init__(
            labels, categories, n_categories, n_labels, n_instances, world_size=world_size, rank=rank, seed=seed
        )
        if epoch_size < 1:
            raise SamplerError(f"sampler.args.epoch_size must be >= 1 (got {epoch_size})")
        self._check_labels_per_category()
        self.epoch_size = epoch_size

    @property
    def n_steps(self) -> int:
        return self.epoch_size

    def _plan(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        plan = np.empty((self.n_steps, self.groups_per_step, self.n_instances), dtype=np.int64)
        n_cat = len(self.category_names)
        unused: list[np.ndarray] = []
        used: list[np.ndarray] = []
        for step in range(self.n_steps):
            open_cats = [c for c in range(n_cat) if unused and len(unused[c])]
            if len(open_cats) < self.n_categories:  # also the first step: every label unused
                unused = [labs.copy() for labs in self.labels_of_category]
                used = [np.empty(0, dtype=np.int64) for _ in range(n_cat)]
                open_cats = list(range(n_cat))
            chosen = []
            for c in rng.choice(open_cats, size=self.n_categories, replace=False):
                if len(unused[c]) >= self.n_labels:
                    labs = rng.choice(unused[c], size=self.n_labels, replace=False)
                else:
                    refill = rng.choice(used[c], size=self.n_labels - len(unused[c]), replace=False)
                    labs = np.concatenate([unused[c], refill])
                chosen.append(labs)
                unused[c] = np.setdiff1d(unused[c], labs)  # sorted: a fixed order for the next draw
                used[c] = np.union1d(used[c], labs)
            for j, label in enumerate(np.concatenate(chosen)):
                plan[step, j] = self._draw_instances(rng, label, self.n_instances)
        return plan


def _smart_sample(rng: np.random.Generator, items: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``items`` without replacement; when there are fewer, all of them and then repeats (OML's ``smart_sample``)."""
    if len(items) >= k:
        return rng.choice(items, size=k, replace=False)
    return np.concatenate([rng.permutation(items), rng.choice(items, size=k - len(items), replace=True)])

"""Ray Data streaming ingest of the training batches (``loader.source: ray_data``).

With DataLoader processes, images are decoded and augmented on the node of the GPU that trains on them,
by that node's CPUs. With ``ray_data`` each Ray Train worker streams its batches from a Ray Data pipeline
instead: Ray tasks decode and augment whole steps wherever the cluster has free CPUs (CPU-only nodes
too), and the worker reads finished batches, in its sampler's order, a few steps ahead
(``loader.prefetch_factor``).

The batches are the ones the in-process loader (``num_workers: 0``) makes: each task takes whole steps
of this worker's share of the global plan, seeds every step as the worker would
(``seed_everything(step_seed(seed, epoch, step, rank))``) and runs the dataset and the collate function of
the worker on its rows in order. So a run gives the same weights either way (tests/test_ray_ingest.py), and
a resumed run picks up at its step. What finishes on the device (``loader.augment_on: device``) still does.

Each task asks for ``loader.ray_data_cpus`` CPUs; on a node whose CPUs the Ray Train workers hold, leave
some free (``ray.cpus_per_worker`` below the node's share) or add CPU nodes, or the tasks wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from raymetric.checkpoint import seed_everything, step_seed


def _steps_task(batch: dict, refs: list, seed: int, epoch: int, rank: int, threads: int) -> dict:
    """Ray Data task: rows of whole steps (``step``, ``row``) -> one collated batch per step, flattened."""
    import ray

    torch.set_num_threads(threads)
    dataset, collate = ray.get(refs[0])
    steps, rows = np.asarray(batch["step"]), np.asarray(batch["row"])
    out: dict[str, list] = {"step": [], "image": [], "label": [], "index": [], "n_bad_images": []}
    for step in dict.fromkeys(steps.tolist()):  # in order of appearance: the plan's order
        seed_everything(step_seed(seed, epoch, int(step), rank))  # as the worker seeds its in-process loader
        items = [dataset[int(i)] for i in rows[steps == step]]
        collated = collate(items)
        n = len(collated["label"])
        out["step"].append(np.full(n, step))
        out["image"].append(collated["image"].numpy())
        out["label"].append(collated["label"].numpy())
        out["index"].append(np.asarray(collated["index"]))
        bad = np.zeros(n, np.int64)
        bad[0] = collated.get("n_bad_images", 0)
        out["n_bad_images"].append(bad)
    return {k: np.concatenate(v) for k, v in out.items()}


class RayDataBatches:
    """A worker's training batches from Ray Data, one epoch at a time (``DeviceBatches``' interface).

    Args:
        dataset: The worker's training dataset (what the in-process loader would read).
        collate: Its collate function (None: torch's default).
        sampler: The worker's ``GlobalPlanSampler`` (epoch and start step set by the recipe).
        to_device: What turns a collated batch into device tensors.
        seed, rank: The run's seed and this worker's rank (the per-step seeds).
        cpus: CPUs per Ray task; threads: torch threads in a task.
        steps_per_task: Steps one task decodes (a Ray Data block).
        prefetch: Batches read ahead.
    """

    def __init__(self, dataset, collate: Callable | None, sampler, to_device, *, seed: int, rank: int,
                 cpus: float = 1.0, steps_per_task: int = 4, prefetch: int = 2):
        self.dataset, self.collate, self.sampler, self.to_device = dataset, collate, sampler, to_device
        self.seed, self.rank, self.cpus, self.steps_per_task, self.prefetch = seed, rank, cpus, steps_per_task, prefetch
        self._refs = None

    def epoch(self, seeds: Iterable[int]) -> Iterator[dict]:
        """The epoch's batches from the sampler's start step; the ``i``-th finished on the device with ``seeds[i]``."""
        import ray
        import ray.data

        from raymetric.ray_env import quiet_ray_data

        quiet_ray_data().execution_options.preserve_order = True  # batches in the plan's order
        if self._refs is None:  # the dataset goes to the object store once per run
            self._refs = [ray.put((self.dataset, self.collate or torch.utils.data.default_collate))]
        start = self.sampler.start_step
        plan = list(self.sampler)  # this worker's rows of each remaining step
        if not plan:
            return iter(())
        batch_size = len(plan[0])
        blocks = []
        for first in range(0, len(plan), self.steps_per_task):
            steps = plan[first:first + self.steps_per_task]
            blocks.append({"step": np.repeat(np.arange(start + first, start + first + len(steps)), batch_size),
                           "row": np.asarray(steps, np.int64).reshape(-1)})
        # Blocks built here, one per task: no repartition (../shared/RAY_NOTES.md section 5).
        ds = ray.data.from_pandas([pd.DataFrame(b) for b in blocks])
        ds = ds.map_batches(_steps_task, fn_kwargs={"refs": self._refs, "seed": self.seed, "epoch": self.sampler.epoch,
                                                    "rank": self.rank, "threads": max(1, int(self.cpus))},
                            batch_size=None, batch_format="numpy", num_cpus=self.cpus)
        batches = ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=self.prefetch)
        return (self.to_device(_as_torch(b), s) for s, b in zip(seeds, batches))


def _as_torch(batch: dict) -> dict:
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if k not in ("step", "n_bad_images")}
    out["n_bad_images"] = int(batch["n_bad_images"].sum())
    return out

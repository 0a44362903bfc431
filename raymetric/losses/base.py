"""The cross-worker loss protocol: per-term values on each worker, one global reduction.

A criterion returns ``LossTerms``: one loss value per term (a mined triplet, a pair, a sample) that
this worker owns, plus per-worker sums for logging; a loss made of several separately averaged parts
(PML's contrastive loss) returns a list of them. ``reduce_loss`` turns those into the scalar to
back-propagate: with terms from all workers ``T`` in total, worker ``r`` returns
``W * sum(values_r) / T`` for ``reduction="mean"``. Gathering with autograd sums every worker's
gradient into each local embedding, and DDP then averages over the ``W`` workers, so the model (and
loss-parameter) gradient equals one process's gradient of ``sum(all values) / T`` on the concatenated
batch (REFERENCE.md §4; proven in tests/test_distributed_grad.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from raymetric.distributed import all_reduce_sum, world

REDUCTIONS = ("mean", "sum")


@dataclass
class LossTerms:
    """What a criterion computed on this worker (one part of its loss)."""

    values: torch.Tensor  # [T_local] per-term losses, with autograd
    reduction: str = "mean"
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-worker sums (detached) for logging


def reduce_loss(
    terms: LossTerms | Sequence[LossTerms], *, sync_logs: bool = True
) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """Scalar loss to back-propagate on this worker, and globally reduced logs.

    Collective: every worker must call it at every step, with the same number of parts.

    Args:
        terms: the criterion's output; several parts are each reduced over their own global number
            of terms, then added.
        sync_logs: return the logs as Python floats (a device-to-host copy); ``False`` keeps them
            as 0-dim tensors, so a training step needs no host synchronisation for logging.

    Returns:
        ``(loss, logs)``. ``logs["loss"]`` is the global loss value (the same on every worker);
        every ``stats`` entry ``name`` becomes ``logs[name]``: its global sum divided by the global
        number of terms of its part (a mean per term).

    >>> loss, logs = reduce_loss(LossTerms(torch.tensor([1.0, 3.0]), stats={"n": torch.tensor(4.0)}))
    >>> loss.item(), logs
    (2.0, {'loss': 2.0, 'n': 2.0})
    """
    parts = [terms] if isinstance(terms, LossTerms) else list(terms)
    _, world_size = world()
    local_sums = [p.values.sum() for p in parts]
    names = [sorted(p.stats) for p in parts]
    if len({n for part in names for n in part}) != sum(len(part) for part in names):
        raise ValueError(f"loss parts log the same stat twice: {names}")
    device = local_sums[0].device
    packed = []
    for part, local_sum, part_names in zip(parts, local_sums, names):
        if part.reduction not in REDUCTIONS:
            raise ValueError(f"criterion reduction must be one of {REDUCTIONS} for training, got {part.reduction!r}")
        # torch.full, not torch.tensor: a fill on the device instead of a host-to-device copy
        packed += [local_sum.detach().double(), torch.full((), float(len(part.values)), device=device, dtype=torch.float64)]
        packed += [part.stats[n].detach().double().reshape(()).to(device) for n in part_names]
    totals = all_reduce_sum(torch.stack(packed))  # float64, so the loss scale W / T does not round; one collective
    loss = torch.zeros((), device=device, dtype=local_sums[0].dtype)
    logged = torch.zeros((), device=device, dtype=torch.float64)
    logs: dict[str, torch.Tensor] = {}
    offset = 0
    for part, local_sum, part_names in zip(parts, local_sums, names):
        global_sum, n_terms = totals[offset], totals[offset + 1].clamp(min=1.0)
        if part.reduction == "mean":
            loss = loss + local_sum * (world_size / n_terms).to(local_sum.dtype)
            logged = logged + global_sum / n_terms
        else:
            loss = loss + local_sum * world_size
            logged = logged + global_sum
        for i, name in enumerate(part_names):
            logs[name] = totals[offset + 2 + i] / n_terms
        offset += 2 + len(part_names)
    logs = {"loss": logged} | logs
    if sync_logs:
        return loss, {k: float(v) for k, v in logs.items()}
    return loss, logs


def reference_or_local(
    emb: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    anchor_ref_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference batch, or the local batch itself when none is given (one process, no gather)."""
    if ref_emb is None:
        return emb, labels, torch.arange(len(emb), device=emb.device)
    if ref_labels is None or anchor_ref_index is None:
        raise ValueError("ref_labels and anchor_ref_index are needed with ref_emb")
    return ref_emb, ref_labels, anchor_ref_index


def exact_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-squared Euclidean distances ``[len(x), len(y)]`` with autograd, from the differences (no ``x.y`` shortcut).

    Exact zeros where rows are equal, with a zero gradient there.

    >>> exact_distances(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[5.0, 0.0]]
    """
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

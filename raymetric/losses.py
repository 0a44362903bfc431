"""Losses over the global batch, with OML's semantics, that give single-process gradients on many workers.

A criterion returns ``LossTerms``: one loss value per term (a mined triplet, a sample) whose anchor
lives on this worker, plus per-worker sums for logging. ``reduce_loss`` turns those into the scalar to
back-propagate: with terms from all workers ``T`` in total, worker ``r`` returns
``W * sum(values_r) / T`` for ``reduction="mean"``. Gathering with autograd sums every worker's
gradient into each local embedding, and DDP then averages over the ``W`` workers, so the model
gradient equals one process's gradient of ``sum(all values) / T`` on the concatenated batch
(REFERENCE.md §4; proven in tests/test_distributed_grad.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raymetric.distributed import all_reduce_sum, world
from raymetric.miners import build_miner


@dataclass
class LossTerms:
    """What a criterion computed on this worker."""

    values: torch.Tensor  # [T_local] per-term losses, with autograd
    reduction: str = "mean"
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-worker sums (detached) for logging


def reduce_loss(terms: LossTerms) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss to back-propagate on this worker, and globally reduced logs.

    Collective: every worker must call it at every step.

    Returns:
        ``(loss, logs)``. ``logs["loss"]`` is the global loss value (the same on every worker);
        every ``stats`` entry ``name`` becomes ``logs[name]``: its global sum divided by the global
        number of terms (a mean per term).
    """
    _, world_size = world()
    local_sum = terms.values.sum()
    names = sorted(terms.stats)
    packed = torch.stack(
        [local_sum.detach().double(), torch.tensor(float(len(terms.values)), device=local_sum.device, dtype=torch.float64)]
        + [terms.stats[n].detach().double().reshape(()) for n in names]
    )  # float64: the loss scale W / T must not round
    totals = all_reduce_sum(packed)  # one collective for everything logged
    global_sum, n_terms = totals[0], totals[1].clamp(min=1.0)
    if terms.reduction == "mean":
        loss = local_sum * (world_size / n_terms).to(local_sum.dtype)
        logged = global_sum / n_terms
    elif terms.reduction == "sum":
        loss = local_sum * world_size
        logged = global_sum
    else:
        raise ValueError(f"criterion reduction must be 'mean' or 'sum' for training, got {terms.reduction!r}")
    logs = {"loss": float(logged)} | {n: float(v / n_terms) for n, v in zip(names, totals[2:])}
    return loss, logs


def triplet_values(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float | None) -> torch.Tensor:
    """Per-triplet loss: ``relu(d_ap - d_an + margin)``, or ``log1p(exp(d_ap - d_an))`` (soft) when ``margin`` is None.

    >>> triplet_values(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), margin=0.5).tolist()
    [0.0, 0.5]
    >>> round(triplet_values(torch.tensor([1.0]), torch.tensor([1.0]), margin=None).item(), 4)
    0.6931
    """
    if margin is None:
        return nn.functional.softplus(d_ap - d_an)  # = log1p(exp(x)), without overflow
    return torch.relu(d_ap - d_an + margin)


class TripletLoss(nn.Module):
    """Triplet loss on given triplets, OML's definition: non-squared Euclidean distances.

    Args:
        margin: hinge margin; None for the soft-margin form.
        reduction: ``mean`` (over all triplets, zeros included) or ``sum``.
    """

    def __init__(self, margin: float | None = None, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or null, got {margin}")
        self.margin = margin
        self.reduction = reduction

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> LossTerms:
        d_ap = torch.linalg.vector_norm(anchor - positive, dim=-1)  # [T]
        d_an = torch.linalg.vector_norm(anchor - negative, dim=-1)  # [T]
        values = triplet_values(d_ap, d_an, self.margin)
        active = (values > 0) if self.margin is not None else (d_ap > d_an)
        stats = {
            "active_triplets": active.sum(),
            "pos_dist": d_ap.detach().sum(),
            "neg_dist": d_an.detach().sum(),
        }
        return LossTerms(values, self.reduction, stats)


class TripletLossWithMiner(nn.Module):
    """Triplet loss on triplets mined from the reference (global) batch with local anchors.

    Args:
        margin: hinge margin; None for the soft-margin form (OML's default).
        reduction: ``mean`` or ``sum`` over mined triplets.
        miner: ``{"name": ..., "args": {...}}`` from the miner registry.
    """

    def __init__(self, margin: float | None = None, reduction: str = "mean", miner: dict | None = None):
        super().__init__()
        miner = miner or {"name": "hard_triplets", "args": {}}
        self.miner = build_miner(miner["name"], miner.get("args"))
        self.triplet = TripletLoss(margin, reduction)
        self.reduction = reduction

    def forward(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        anchor_ref_index: torch.Tensor | None = None,
    ) -> LossTerms:
        """Loss terms for the anchors ``emb`` [B, D] against ``ref_emb`` [N, D] (default: ``emb``)."""
        if ref_emb is None:
            ref_emb, ref_labels = emb, labels
            anchor_ref_index = torch.arange(len(emb), device=emb.device)
        t = self.miner.mine(emb, labels, ref_emb, ref_labels, anchor_ref_index)
        return self.triplet(emb[t.anchor], ref_emb[t.positive], ref_emb[t.negative])


CRITERIA = {"triplet_with_miner": TripletLossWithMiner}


def build_criterion(name: str, args: dict | None = None, miner: dict | None = None) -> nn.Module:
    """Build the criterion registered as ``name``; ``miner`` goes to criteria that mine."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {sorted(CRITERIA)}")
    args = dict(args or {})
    if miner is not None:
        args["miner"] = miner
    return CRITERIA[name](**args)

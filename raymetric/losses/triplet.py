"""Triplet losses (OML's definitions): mined triplets, or all of them."""

from __future__ import annotations

import torch
from torch import nn

from raymetric.losses.base import LossTerms, check_reduction, exact_distances, reference_or_local
from raymetric.miners import MinedTriplets, Triplets, build_miner


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


def triplet_terms(
    candidates: torch.Tensor,
    triplets: Triplets,
    margin: float | None,
    reduction: str = "mean",
    stats: dict[str, torch.Tensor] | None = None,
) -> LossTerms:
    """Triplet-loss terms for index triplets into ``candidates`` ([C, D], with autograd).

    Distances come per triplet, or, when there are more triplets than candidate pairs (all triplets),
    from one ``[anchors, C]`` distance matrix: the same values, far less memory than ``[T, D]`` gathers.

    >>> c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    >>> terms = triplet_terms(c, Triplets(*torch.tensor([[0], [1], [2]])), margin=0.5)
    >>> terms.values.tolist(), {k: v.item() for k, v in terms.stats.items()}
    ([0.0], {'active_triplets': 0, 'pos_dist': 1.0, 'neg_dist': 2.0})
    """
    anchor, positive, negative = triplets
    if 2 * len(anchor) > len(candidates) ** 2:  # decided without a device sync: there are at most C anchors
        unique_anchors, inverse = torch.unique(anchor, return_inverse=True)
        dist = exact_distances(candidates[unique_anchors], candidates)  # [U, C]
        d_ap, d_an = dist[inverse, positive], dist[inverse, negative]  # [T]
    else:
        d_ap = torch.linalg.vector_norm(candidates[anchor] - candidates[positive], dim=-1)  # [T]
        d_an = torch.linalg.vector_norm(candidates[anchor] - candidates[negative], dim=-1)  # [T]
    values = triplet_values(d_ap, d_an, margin)
    active = (values > 0) if margin is not None else (d_ap > d_an)
    logged = {"active_triplets": active.sum(), "pos_dist": d_ap.detach().sum(), "neg_dist": d_an.detach().sum()}
    return LossTerms(values, reduction, logged | (stats or {}))


class TripletLossWithMiner(nn.Module):
    """Triplet loss on triplets mined from the reference (global) batch with local anchors (OML's ``triplet_with_miner``).

    Non-squared Euclidean distances; ``reduction: mean`` averages over all mined triplets of the
    global batch, zeros included. Logged: the share of active triplets (``active_triplets``; with the
    soft margin, those with ``d_ap > d_an``), the mean positive and negative distances, and the
    miner's own counts.

    Args:
        margin: hinge margin; None for the soft-margin form (OML's default).
        reduction: ``mean`` or ``sum`` over mined triplets.
        miner: ``{"name": ..., "args": {...}}`` from the miner registry; OML's default is all triplets.
        seed: the run's seed, for miners that draw random numbers.
    """

    def __init__(self, margin: float | None = None, reduction: str = "mean", miner: dict | None = None, *, seed: int = 0):
        super().__init__()
        check_reduction(reduction)
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or null, got {margin}")
        miner = miner or {"name": "all_triplets", "args": {}}
        self.miner = build_miner(miner["name"], miner.get("args"), seed=seed)
        self.margin = margin
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
        ref_emb, ref_labels, anchor_ref_index = reference_or_local(emb, labels, ref_emb, ref_labels, anchor_ref_index)
        mined: MinedTriplets = self.miner.sample(emb, labels, ref_emb, ref_labels, anchor_ref_index)
        return triplet_terms(mined.candidates, mined.triplets, self.margin, self.reduction, mined.stats)

    # The miner's state (a memory bank, a call counter) travels in the criterion's state_dict.
    def get_extra_state(self) -> dict:
        return {"miner": self.miner.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.miner.load_state_dict(state["miner"])


class TripletLoss(TripletLossWithMiner):
    """Triplet loss over every triplet of the global batch (OML's ``TripletLossWithMiner`` default, ``AllTripletsMiner``).

    Args:
        margin: hinge margin; None for the soft-margin form.
        reduction: ``mean`` or ``sum`` over all triplets.
        seed: unused (no randomness).
    """

    def __init__(self, margin: float | None = None, reduction: str = "mean", *, seed: int = 0):
        super().__init__(margin, reduction, {"name": "all_triplets", "args": {}}, seed=seed)

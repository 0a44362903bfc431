"""Triplet miners over a reference batch, with anchors taken from the local batch.

A miner sees this worker's embeddings (the anchors) and the reference batch they are compared
against: the global batch gathered from all workers in rank order, which contains the local rows at
``anchor_ref_index``. Mining runs on detached features; the loss recomputes distances with autograd.
With one process the reference batch is the local batch itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Triplets(NamedTuple):
    """Indices of mined triplets: ``anchor`` into the local batch, ``positive``/``negative`` into the reference batch."""

    anchor: torch.Tensor  # [T]
    positive: torch.Tensor  # [T]
    negative: torch.Tensor  # [T]


class HardTripletMiner:
    """Batch-hard mining: for every anchor, its farthest positive and its nearest negative.

    Distances are non-squared Euclidean on detached features. The anchor itself is never its own
    positive; anchors without a positive or without a negative in the reference batch yield no
    triplet. Ties pick the smallest reference index.

    >>> emb = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    >>> labels = torch.tensor([0, 0, 0, 1])
    >>> t = HardTripletMiner().mine(emb, labels, emb, labels, torch.arange(4))
    >>> t.anchor.tolist(), t.positive.tolist(), t.negative.tolist()
    ([0, 1, 2], [2, 2, 0], [3, 3, 3])
    """

    def mine(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
        anchor_ref_index: torch.Tensor,
    ) -> Triplets:
        """Mine triplets for the anchors ``emb`` ([B, D], labels [B]) against ``ref_emb`` ([N, D])."""
        with torch.no_grad():
            dist = torch.cdist(emb.detach().float(), ref_emb.detach().float())  # [B, N]
            same = labels[:, None] == ref_labels[None, :]  # [B, N]
            is_self = torch.zeros_like(same)
            is_self[torch.arange(len(emb), device=emb.device), anchor_ref_index] = True
            pos_mask = same & ~is_self
            neg_mask = ~same
            hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).argmax(dim=1)  # [B]
            hardest_neg = dist.masked_fill(~neg_mask, float("inf")).argmin(dim=1)  # [B]
            valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
            anchors = torch.nonzero(valid).flatten()
        return Triplets(anchors, hardest_pos[anchors], hardest_neg[anchors])


MINERS = {"hard_triplets": HardTripletMiner}


def build_miner(name: str, args: dict | None = None):
    """Build the miner registered as ``name``."""
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; known: {sorted(MINERS)}")
    return MINERS[name](**(args or {}))

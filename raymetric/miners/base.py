"""What every miner shares: the triplet containers, the base class, the distance function.

A miner sees this worker's embeddings (the anchors) and the reference batch they are compared
against: the global batch gathered from all workers in rank order, which contains the local rows at
``anchor_ref_index``. It mines on detached features and returns *indices*; the loss recomputes the
distances with autograd. Each worker mines only triplets whose anchor it owns (its local rows, or for
``hard_cluster`` the labels whose first row is local), so the workers' triplets together are exactly
the triplets one process would mine from the concatenated batch. With one process the reference
batch is the local batch itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Triplets(NamedTuple):
    """Indices of mined triplets into the rows of the candidate matrix (the reference batch, for most miners)."""

    anchor: torch.Tensor  # [T]
    positive: torch.Tensor  # [T]
    negative: torch.Tensor  # [T]


class MinedTriplets(NamedTuple):
    """Triplets and the rows they index.

    ``candidates`` keeps autograd where its rows come from the batch: the reference batch itself, or
    the reference batch followed by memory-bank rows (detached) or label means (with autograd).
    """

    candidates: torch.Tensor  # [C, D]
    triplets: Triplets
    stats: dict[str, torch.Tensor]  # per-worker sums over this worker's triplets, for logging


class TripletMiner:
    """Base class of the miners.

    Subclasses implement ``mine`` (indices into the reference rows) or override ``sample``. Miners
    with state (a memory bank, a call counter) override ``state_dict``/``load_state_dict``; the
    criterion stores that state in its own ``state_dict``, so checkpoints carry it.

    Args:
        seed: the run's seed, for miners that draw random numbers (set by ``build_miner``).
    """

    def __init__(self, *, seed: int = 0):
        self.seed = seed

    def mine(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
        anchor_ref_index: torch.Tensor,
    ) -> Triplets:
        """Triplets for the anchors ``emb`` [B, D] (rows ``anchor_ref_index`` of ``ref_emb`` [N, D])."""
        raise NotImplementedError(f"{type(self).__name__} mines through sample()")

    def sample(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
        anchor_ref_index: torch.Tensor,
    ) -> MinedTriplets:
        """Mined triplets with the candidate rows they index (here: the reference batch)."""
        return MinedTriplets(ref_emb, self.mine(emb, labels, ref_emb, ref_labels, anchor_ref_index), {})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


def mining_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-squared Euclidean distances ``[len(x), len(y)]`` on detached features, for choosing triplets."""
    x, y = x.detach(), y.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    return torch.cdist(x, y)


def pair_masks(
    labels: torch.Tensor, ref_labels: torch.Tensor, anchor_ref_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)`` masks ``[B, N]``: same label but not the anchor's own row; other label.

    >>> pos, neg = pair_masks(torch.tensor([0, 1]), torch.tensor([0, 1, 0]), torch.tensor([0, 1]))
    >>> pos.int().tolist(), neg.int().tolist()
    ([[0, 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 0, 1]])
    """
    same = labels[:, None] == ref_labels[None, :]  # [B, N]
    is_self = anchor_ref_index[:, None] == torch.arange(len(ref_labels), device=labels.device)[None, :]  # [B, N]
    return same & ~is_self, ~same

"""Miners over the reference batch: all triplets, batch-hard, n-hard, hard cluster (OML's semantics, REFERENCE.md §4)."""

from __future__ import annotations

import numpy as np
import torch

from raymetric.miners.base import MinedTriplets, TripletMiner, Triplets, mining_distances, pair_masks


class AllTripletsMiner(TripletMiner):
    """Every (anchor, positive, negative) with a local anchor, optionally a random subset of them.

    Triplets come in the order (anchor, positive, negative) of reference indices. With
    ``max_output_triplets``, the subset is drawn from the triplets of the *whole global batch*, with a
    generator seeded from ``(seed, number of calls so far)``: every worker draws the same subset and
    keeps the triplets whose anchor it owns, so the workers together use exactly the triplets one
    process would (OML caps each process's triplets separately). The call counter is part of the
    miner's state, so a resumed run draws the same subsets.

    Args:
        max_output_triplets: at most this many triplets per global batch; None for all of them.
        seed: the run's seed (set by ``build_miner``).

    >>> labels = torch.tensor([0, 0, 1])
    >>> t = AllTripletsMiner().mine(torch.zeros(3, 2), labels, torch.zeros(3, 2), labels, torch.arange(3))
    >>> [tuple(x) for x in zip(*(v.tolist() for v in t))]
    [(0, 1, 2), (1, 0, 2)]
    """

    def __init__(self, max_output_triplets: int | None = None, *, seed: int = 0):
        super().__init__(seed=seed)
        if max_output_triplets is not None and max_output_triplets < 1:
            raise ValueError(f"max_output_triplets must be >= 1 or null, got {max_output_triplets}")
        self.max_output_triplets = max_output_triplets
        self.calls = 0

    def mine(self, emb, labels, ref_emb, ref_labels, anchor_ref_index, n_anchor_rows: int | None = None) -> Triplets:
        """``n_anchor_rows``: only the first rows of the reference batch can be anchors (the global batch
        before a memory bank's rows); None: all of them."""
        self.calls += 1
        if self.max_output_triplets is None:
            pos_mask, neg_mask = pair_masks(labels, ref_labels, anchor_ref_index)
            return _all_triplets(pos_mask, neg_mask, anchor_ref_index)
        # Every worker enumerates the global triplets (anchors: the global batch) the same way and draws the
        # same subset.
        n = len(ref_labels) if n_anchor_rows is None else n_anchor_rows
        all_rows = torch.arange(n, device=ref_labels.device)
        pos_mask, neg_mask = pair_masks(ref_labels[:n], ref_labels, all_rows)  # [n, N]
        n_pos, n_neg = torch.stack([pos_mask.sum(1), neg_mask.sum(1)]).cpu().numpy()  # [n] each: one host copy
        per_anchor = n_pos * n_neg
        total = int(per_anchor.sum())
        rng = np.random.default_rng([self.seed, self.calls - 1])
        chosen = np.sort(rng.choice(total, size=min(self.max_output_triplets, total), replace=False))
        # Decode a global triplet number into (anchor, positive rank, negative rank), lexicographic order.
        starts = np.cumsum(per_anchor) - per_anchor
        anchor = np.searchsorted(starts, chosen, side="right") - 1
        rest = chosen - starts[anchor]
        n_neg_np = n_neg[anchor]
        pos_rank, neg_rank = rest // n_neg_np, rest % n_neg_np
        anchor_t = torch.as_tensor(anchor, device=ref_labels.device)
        pos_sorted = _true_first(pos_mask)  # [N, N]: positives' columns first, ascending
        neg_sorted = _true_first(neg_mask)
        positive = pos_sorted[anchor_t, torch.as_tensor(pos_rank, device=ref_labels.device)]
        negative = neg_sorted[anchor_t, torch.as_tensor(neg_rank, device=ref_labels.device)]
        mine = torch.isin(anchor_t, anchor_ref_index)
        return Triplets(anchor_t[mine], positive[mine], negative[mine])

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


class HardTripletMiner(TripletMiner):
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

    def mine(self, emb, labels, ref_emb, ref_labels, anchor_ref_index) -> Triplets:
        dist = mining_distances(emb, ref_emb)  # [B, N]
        pos_mask, neg_mask = pair_masks(labels, ref_labels, anchor_ref_index)
        hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).argmax(dim=1)  # [B]
        hardest_neg = dist.masked_fill(~neg_mask, float("inf")).argmin(dim=1)  # [B]
        anchors = torch.nonzero(pos_mask.any(dim=1) & neg_mask.any(dim=1)).flatten()
        return Triplets(anchor_ref_index[anchors], hardest_pos[anchors], hardest_neg[anchors])


class NHardTripletMiner(TripletMiner):
    """For every anchor, its n hardest positives x n hardest negatives (OML's ``NHardTripletsMiner``).

    ``n_positive=n`` keeps the ``n`` farthest positives; ``n_positive=[a, b]`` keeps the ``a``-th to
    the ``b``-th farthest (1-based, inclusive), skipping the very hardest, which are often label
    noise. ``n_negative`` likewise for the nearest negatives. An anchor with fewer candidates uses
    what it has. Ties pick the smallest reference index; triplets come ordered by anchor, then
    positive rank, then negative rank. ``n_positive=n_negative=1`` is ``hard_triplets``.

    Args:
        n_positive: ``n`` or ``[from, to]``.
        n_negative: ``n`` or ``[from, to]``.
        seed: unused (no randomness).

    >>> emb = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.0]])
    >>> labels = torch.tensor([0, 0, 0, 1, 1])
    >>> t = NHardTripletMiner(n_positive=[2, 2], n_negative=2).mine(emb[:1], labels[:1], emb, labels, torch.tensor([0]))
    >>> t.positive.tolist(), t.negative.tolist()
    ([1, 1], [3, 4])
    """

    def __init__(self, n_positive: int | list[int] = 1, n_negative: int | list[int] = 1, *, seed: int = 0):
        super().__init__(seed=seed)
        self.positive_slice = _parse_range("n_positive", n_positive)
        self.negative_slice = _parse_range("n_negative", n_negative)

    def mine(self, emb, labels, ref_emb, ref_labels, anchor_ref_index) -> Triplets:
        dist = mining_distances(emb, ref_emb)  # [B, N]
        pos_mask, neg_mask = pair_masks(labels, ref_labels, anchor_ref_index)
        pos, pos_ok = _ranked(dist.masked_fill(~pos_mask, float("-inf")), pos_mask.sum(1), self.positive_slice, True)
        neg, neg_ok = _ranked(dist.masked_fill(~neg_mask, float("inf")), neg_mask.sum(1), self.negative_slice, False)
        a, i, j = torch.nonzero(pos_ok[:, :, None] & neg_ok[:, None, :], as_tuple=True)  # [B, n_pos, n_neg] grid
        return Triplets(anchor_ref_index[a], pos[a, i], neg[a, j])


class HardClusterMiner(TripletMiner):
    """Hard cluster mining (OML's ``HardClusterMiner``) over the global batch.

    For every label of the reference batch with at least two rows: anchor = the label's mean
    embedding, positive = its row farthest from that mean, negative = the nearest other label's mean.
    The means keep autograd. They are appended to the candidates after the reference rows, so
    ``anchor`` and ``negative`` index rows ``N + label`` (labels of the reference batch in ascending
    order). A label's triplet belongs to the worker that holds the label's first reference row.
    OML requires equal counts per label; this miner does not.
    """

    def sample(self, emb, labels, ref_emb, ref_labels, anchor_ref_index) -> MinedTriplets:
        n = len(ref_labels)
        unique, inverse, counts = torch.unique(ref_labels, return_inverse=True, return_counts=True)  # [U]
        means = torch.zeros(len(unique), ref_emb.shape[1], dtype=ref_emb.dtype, device=ref_emb.device)
        means = means.index_add(0, inverse, ref_emb) / counts[:, None].to(ref_emb.dtype)  # [U, D], with autograd
        candidates = torch.cat([ref_emb, means])
        if len(unique) < 2:
            empty = torch.zeros(0, dtype=torch.int64, device=ref_emb.device)
            return MinedTriplets(candidates, Triplets(empty, empty, empty), {})
        with torch.no_grad():
            rows = torch.arange(n, device=ref_emb.device)
            to_mean = torch.linalg.vector_norm(ref_emb.detach() - means.detach()[inverse], dim=1)  # [N]
            member = inverse[None, :] == torch.arange(len(unique), device=ref_emb.device)[:, None]  # [U, N]
            positive = to_mean[None, :].expand_as(member).masked_fill(~member, float("-inf")).argmax(dim=1)  # [U]
            between = mining_distances(means, means).fill_diagonal_(float("inf"))  # [U, U]
            negative = between.argmin(dim=1) + n
            first_row = torch.full((len(unique),), n, device=ref_emb.device).scatter_reduce(0, inverse, rows, "amin")
            owned = torch.nonzero(torch.isin(first_row, anchor_ref_index) & (counts >= 2)).flatten()
        return MinedTriplets(candidates, Triplets(owned + n, positive[owned], negative[owned]), {})


def _all_triplets(pos_mask: torch.Tensor, neg_mask: torch.Tensor, anchor_ref_index: torch.Tensor) -> Triplets:
    """Every (a, p, n) of the masks ``[B, N]``, ordered by anchor, positive, negative."""
    pos = torch.nonzero(pos_mask)  # [P, 2] (local anchor, ref index), row-major order
    n_neg = neg_mask.sum(1)  # [B]
    repeats = n_neg[pos[:, 0]]  # [P]
    a = torch.repeat_interleave(pos[:, 0], repeats)
    p = torch.repeat_interleave(pos[:, 1], repeats)
    group_start = torch.repeat_interleave(torch.cumsum(repeats, 0) - repeats, repeats)
    rank = torch.arange(len(a), device=a.device) - group_start
    negative = _true_first(neg_mask)[a, rank]
    return Triplets(anchor_ref_index[a], p, negative)


def _true_first(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column indices where ``mask`` is True (ascending), then the others.

    >>> _true_first(torch.tensor([[False, True, True, False]])).tolist()
    [[1, 2, 0, 3]]
    """
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices


def _ranked(
    dist: torch.Tensor, available: torch.Tensor, which: slice, descending: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns ranked ``which`` by distance per row ``[B, r]``, and whether each rank exists ``[B, r]``."""
    order = torch.sort(dist, dim=1, descending=descending, stable=True).indices[:, which]
    ranks = torch.arange(dist.shape[1], device=dist.device)[which]
    return order, ranks[None, :] < available[:, None]


def _parse_range(key: str, n: int | list[int]) -> slice:
    """OML's argument forms: ``n`` -> ranks ``0 .. n-1``; ``[a, b]`` -> ranks ``a-1 .. b-1``.

    >>> _parse_range("n_positive", 3), _parse_range("n_positive", [2, 5])
    (slice(0, 3, None), slice(1, 5, None))
    """
    if isinstance(n, int) and not isinstance(n, bool):
        if n < 1:
            raise ValueError(f"{key} must be >= 1, got {n}")
        return slice(0, n)
    if isinstance(n, (list, tuple)) and len(n) == 2 and all(isinstance(v, int) for v in n):
        if not 1 <= n[0] <= n[1]:
            raise ValueError(f"{key}=[from, to] needs 1 <= from <= to, got {list(n)}")
        return slice(n[0] - 1, n[1])
    raise ValueError(f"{key} must be an int or a [from, to] pair of ints, got {n!r}")

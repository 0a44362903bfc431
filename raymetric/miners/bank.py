"""A memory bank of the last global batches, for mining positives and negatives beyond the current batch."""

from __future__ import annotations

import torch

from raymetric.miners.base import MinedTriplets, TripletMiner
from raymetric.miners.batch import AllTripletsMiner


class MinerWithBank(TripletMiner):
    """Mines with an inner miner over the reference batch *and* the last ``bank_size_in_batches`` global batches.

    Anchors stay the local rows of the current batch; positives and negatives may also be bank rows,
    which are detached embeddings from earlier steps. After mining, the current global batch (the
    gathered reference batch, identical on every worker) enters the bank, so every worker holds the
    same bank without any communication of its own. Unlike OML's ``MinerWithBank``, which waits until
    the bank is full, the bank is used from the first step on with the rows it already holds. The
    bank is part of the miner's state and so of every checkpoint.

    Args:
        bank_size_in_batches: how many past global batches the bank holds.
        miner: the inner miner, ``{"name": ..., "args": {...}}``: ``n_hard_triplets`` (OML's only
            choice), ``hard_triplets`` or ``all_triplets``.
        seed: the run's seed, passed on to the inner miner.
    """

    def __init__(self, bank_size_in_batches: int, miner: dict | None = None, *, seed: int = 0):
        super().__init__(seed=seed)
        from raymetric.miners import INDEX_MINERS, build_miner

        if not isinstance(bank_size_in_batches, int) or bank_size_in_batches < 1:
            raise ValueError(f"bank_size_in_batches must be an int >= 1, got {bank_size_in_batches!r}")
        miner = miner or {"name": "n_hard_triplets", "args": {}}
        if miner.get("name") not in INDEX_MINERS:
            raise ValueError(f"miner_with_bank's inner miner must be one of {sorted(INDEX_MINERS)}, got {miner.get('name')!r}")
        self.miner = build_miner(miner["name"], miner.get("args"), seed=seed)
        self.bank_size_in_batches = bank_size_in_batches
        self.bank_emb: torch.Tensor | None = None  # [S, D], S = bank_size_in_batches x global batch size
        self.bank_labels: torch.Tensor | None = None  # [S]
        self.ptr = 0  # where the next batch goes
        self.filled = 0  # rows holding data

    def sample(self, emb, labels, ref_emb, ref_labels, anchor_ref_index) -> MinedTriplets:
        n = len(ref_labels)
        if self.bank_emb is None:
            self.bank_emb = ref_emb.new_zeros((self.bank_size_in_batches * n, ref_emb.shape[1]))
            self.bank_labels = ref_labels.new_zeros(self.bank_size_in_batches * n)
        if len(self.bank_emb) != self.bank_size_in_batches * n:
            raise ValueError(
                f"miner_with_bank needs the same global batch size at every step: the bank holds batches of "
                f"{len(self.bank_emb) // self.bank_size_in_batches} rows, this batch has {n}"
            )
        candidates = torch.cat([ref_emb, self.bank_emb[: self.filled]])  # [N + filled, D]
        cand_labels = torch.cat([ref_labels, self.bank_labels[: self.filled]])
        # A capped all_triplets draws its subset among the global batch's anchors, not the bank's rows.
        extra = {"n_anchor_rows": n} if isinstance(self.miner, AllTripletsMiner) else {}
        t = self.miner.mine(emb, labels, candidates, cand_labels, anchor_ref_index, **extra)
        stats = {"bank_positives": (t.positive >= n).sum(), "bank_negatives": (t.negative >= n).sum()}
        self.push(ref_emb, ref_labels)
        return MinedTriplets(candidates, t, stats)

    @torch.no_grad()
    def push(self, ref_emb: torch.Tensor, ref_labels: torch.Tensor) -> None:
        """Put a global batch into the bank, overwriting the oldest one when full."""
        n = len(ref_labels)
        self.bank_emb[self.ptr : self.ptr + n] = ref_emb.detach()
        self.bank_labels[self.ptr : self.ptr + n] = ref_labels
        self.ptr = (self.ptr + n) % len(self.bank_emb)
        self.filled = min(self.filled + n, len(self.bank_emb))

    def state_dict(self) -> dict:
        return {
            "bank_emb": self.bank_emb,
            "bank_labels": self.bank_labels,
            "ptr": self.ptr,
            "filled": self.filled,
            "miner": self.miner.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.bank_emb, self.bank_labels = state["bank_emb"], state["bank_labels"]
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
        self.miner.load_state_dict(state["miner"])

"""Triplet miners over the global batch with local anchors (REFERENCE.md §4).

| name | triplets per anchor |
|---|---|
| ``all_triplets`` | every (a, p, n); optionally a random subset of the global batch's, the same on every worker |
| ``hard_triplets`` | farthest positive x nearest negative |
| ``n_hard_triplets`` | n farthest positives x n nearest negatives, or a ``[from, to]`` range of them |
| ``hard_cluster`` | per label: mean, farthest member, nearest other mean |
| ``miner_with_bank`` | an inner miner over the batch plus the last N global batches |
"""

from __future__ import annotations

from raymetric.miners.bank import MinerWithBank
from raymetric.miners.base import MinedTriplets, TripletMiner, Triplets, mining_distances, pair_masks
from raymetric.miners.batch import AllTripletsMiner, HardClusterMiner, HardTripletMiner, NHardTripletMiner

__all__ = [
    "INDEX_MINERS",
    "MINERS",
    "AllTripletsMiner",
    "HardClusterMiner",
    "HardTripletMiner",
    "MinedTriplets",
    "MinerWithBank",
    "NHardTripletMiner",
    "TripletMiner",
    "Triplets",
    "build_miner",
    "mining_distances",
    "pair_masks",
]

MINERS = {
    "all_triplets": AllTripletsMiner,
    "hard_triplets": HardTripletMiner,
    "n_hard_triplets": NHardTripletMiner,
    "hard_cluster": HardClusterMiner,
    "miner_with_bank": MinerWithBank,
}

# Miners whose triplets are plain indices into the rows they are given (usable inside a bank).
INDEX_MINERS = {"all_triplets", "hard_triplets", "n_hard_triplets"}


def build_miner(name: str, args: dict | None = None, *, seed: int = 0) -> TripletMiner:
    """Build the miner registered as ``name``; ``seed`` is the run's seed, for miners that draw random numbers.

    >>> type(build_miner("n_hard_triplets", {"n_positive": [2, 4]})).__name__
    'NHardTripletMiner'
    """
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; known: {sorted(MINERS)}")
    return MINERS[name](**(args or {}), seed=seed)

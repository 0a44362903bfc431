"""Criteria by name, each correct across workers (see ``base.py`` for the protocol).

| name | terms | source of the definition |
|---|---|---|
| ``triplet`` | every triplet of the global batch | OML ``TripletLossWithMiner`` default |
| ``triplet_with_miner`` | mined triplets (``criterion.miner``) | OML |
| ``arcface``, ``mlp_arcface`` | one per sample; class weights trained under DDP | OML |
| ``surrogate_precision`` | one per anchor | OML |
| ``contrastive`` | positive and negative pairs, non-zero ones averaged | pytorch-metric-learning |
| ``multi_similarity`` | one per anchor | pytorch-metric-learning |
"""

from __future__ import annotations

import inspect

from torch import nn

from raymetric.distributed import unwrap

from raymetric.losses.arcface import ArcFaceLoss, ArcFaceLossWithMLP
from raymetric.losses.base import LossTerms, exact_distances, reduce_loss
from raymetric.losses.pairs import ContrastiveLoss, MultiSimilarityLoss, SurrogatePrecisionLoss
from raymetric.losses.triplet import TripletLoss, TripletLossWithMiner, triplet_terms, triplet_values

__all__ = [
    "CRITERIA",
    "RUNTIME_ARGS",
    "STATED_RUNTIME_ARGS",
    "ArcFaceLoss",
    "ArcFaceLossWithMLP",
    "ContrastiveLoss",
    "LossTerms",
    "MultiSimilarityLoss",
    "SurrogatePrecisionLoss",
    "TripletLoss",
    "TripletLossWithMiner",
    "build_criterion",
    "exact_distances",
    "needs_reference",
    "reduce_loss",
    "triplet_terms",
    "triplet_values",
]

CRITERIA = {
    "triplet": TripletLoss,
    "triplet_with_miner": TripletLossWithMiner,
    "arcface": ArcFaceLoss,
    "mlp_arcface": ArcFaceLossWithMLP,
    "surrogate_precision": SurrogatePrecisionLoss,
    "contrastive": ContrastiveLoss,
    "multi_similarity": MultiSimilarityLoss,
}

# Arguments the training code passes itself (from the model and the dataset), to the criteria that take them.
RUNTIME_ARGS = ("miner", "seed", "in_features", "num_classes", "label2category")
# Of those, the ones OML's configs spell out in ``criterion.args``: accepted there when they match the run.
STATED_RUNTIME_ARGS = {"in_features": "the extractor's embedding size", "num_classes": "the number of training labels"}


def build_criterion(name: str, args: dict | None = None, miner: dict | None = None, **runtime) -> nn.Module:
    """Build the criterion registered as ``name``.

    Args:
        name: a key of ``CRITERIA``.
        args: the config's ``criterion.args``.
        miner: ``{"name", "args"}`` for criteria that mine.
        **runtime: values from the run (``seed``, ``in_features``, ``num_classes``, ``label2category``);
            each goes only to criteria whose constructor takes it.

    >>> type(build_criterion("arcface", {"m": 0.4}, in_features=8, num_classes=3, seed=1)).__name__
    'ArcFaceLoss'
    """
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {sorted(CRITERIA)}")
    unknown = set(runtime) - set(RUNTIME_ARGS)
    if unknown:
        raise TypeError(f"build_criterion: unknown runtime argument(s) {sorted(unknown)}")
    factory = CRITERIA[name]
    accepted = inspect.signature(factory).parameters
    kwargs = dict(args or {})
    for key, what in STATED_RUNTIME_ARGS.items():
        if key in kwargs and runtime.get(key) is not None and kwargs[key] != runtime[key]:
            raise ValueError(f"criterion.args.{key}={kwargs[key]} does not match {what}, {runtime[key]}")
    if miner is not None:
        kwargs["miner"] = miner
    kwargs |= {k: v for k, v in runtime.items() if k in accepted and (v is not None or k not in kwargs)}
    return factory(**kwargs)


def needs_reference(criterion: nn.Module) -> bool:
    """Whether the criterion compares local anchors with the gathered global batch (else: per-sample terms)."""
    criterion = unwrap(criterion)  # under DDP
    return getattr(criterion, "needs_reference", True)

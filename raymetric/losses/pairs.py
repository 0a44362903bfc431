"""Losses over all pairs of a local anchor and the reference batch: surrogate precision (OML), contrastive and
multi-similarity (pytorch-metric-learning's definitions and defaults)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raymetric.losses.base import LossTerms, check_reduction, exact_distances, reference_or_local
from raymetric.miners import pair_masks


class SurrogatePrecisionLoss(nn.Module):
    """``1 - precision@k`` made differentiable with two sigmoids (OML's ``surrogate_precision``, arXiv:2108.11179).

    Per local anchor ``i`` against the reference batch (itself included, at distance 0, hence ``k + 1``
    as in OML): ``rank_ij = sum_m sigmoid((d_ij - d_im) / t2)``,
    ``precision_i = sum_j sigmoid((k + 1 - rank_ij) / t1) [y_i = y_j] / min(#{j: y_i = y_j}, k + 1)``;
    the term is ``1 - precision_i``. Memory grows as ``B x N x N``.

    Args:
        k: the k of precision@k.
        temperature1: temperature of the outer sigmoid.
        temperature2: temperature of the rank sigmoid.
        reduction: ``mean`` (OML's ``1 - mean precision``) or ``sum`` (of ``1 - precision_i``).
    """

    def __init__(self, k: int, temperature1: float = 1.0, temperature2: float = 0.01, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        if k < 1 or temperature1 <= 0 or temperature2 <= 0:
            raise ValueError(f"need k >= 1 and positive temperatures, got k={k}, {temperature1}, {temperature2}")
        self.k = k + 1
        self.temperature1, self.temperature2 = temperature1, temperature2
        self.reduction = reduction

    def forward(self, emb, labels, ref_emb=None, ref_labels=None, anchor_ref_index=None) -> LossTerms:
        ref_emb, ref_labels, _ = reference_or_local(emb, labels, ref_emb, ref_labels, anchor_ref_index)
        dist = exact_distances(emb, ref_emb)  # [B, N]
        gt = (labels[:, None] == ref_labels[None, :]).to(dist.dtype)  # [B, N], the anchor itself included
        rank = torch.sigmoid((dist[:, :, None] - dist[:, None, :]) / self.temperature2).sum(2)  # [B, N]
        hits = torch.sigmoid((self.k - rank) / self.temperature1) * gt
        precision = hits.sum(1) / gt.sum(1).clamp(max=self.k)  # [B]
        return LossTerms(1.0 - precision, self.reduction, {"precision": precision.detach().sum()})


class ContrastiveLoss(nn.Module):
    """Contrastive loss with pytorch-metric-learning's definition and defaults.

    Euclidean distance between L2-normalised embeddings; every ordered pair of a local anchor and a
    reference row: positive pairs (same label, not the anchor itself) cost ``relu(d - pos_margin)``,
    negative pairs ``relu(neg_margin - d)``. Like PML's ``AvgNonZeroReducer``, each part is averaged
    over its non-zero pairs of the global batch, and the two averages are added.

    Args:
        pos_margin: distance below which a positive pair costs nothing.
        neg_margin: distance above which a negative pair costs nothing.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0):
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, emb, labels, ref_emb=None, ref_labels=None, anchor_ref_index=None) -> list[LossTerms]:
        ref_emb, ref_labels, anchor_ref_index = reference_or_local(emb, labels, ref_emb, ref_labels, anchor_ref_index)
        dist = exact_distances(F.normalize(emb, dim=1), F.normalize(ref_emb, dim=1))  # [B, N]
        pos_mask, neg_mask = pair_masks(labels, ref_labels, anchor_ref_index)
        pos = torch.relu(dist[pos_mask] - self.pos_margin)
        neg = torch.relu(self.neg_margin - dist[neg_mask])
        pos, neg = pos[pos > 0], neg[neg > 0]
        return [
            LossTerms(pos, "mean", {"pos_loss": pos.detach().sum()}),
            LossTerms(neg, "mean", {"neg_loss": neg.detach().sum()}),
        ]


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss (arXiv:1904.06627) with pytorch-metric-learning's definition and defaults.

    Cosine similarity ``S`` of a local anchor ``i`` to the reference rows; per anchor
    ``(1/alpha) log(1 + sum_pos exp(-alpha (S_ip - base))) + (1/beta) log(1 + sum_neg exp(beta (S_in - base)))``,
    averaged over all anchors of the global batch.

    Args:
        alpha: weight of the positive pairs.
        beta: weight of the negative pairs.
        base: the similarity the exponents are shifted by.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5):
        super().__init__()
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.base = alpha, beta, base

    def forward(self, emb, labels, ref_emb=None, ref_labels=None, anchor_ref_index=None) -> LossTerms:
        ref_emb, ref_labels, anchor_ref_index = reference_or_local(emb, labels, ref_emb, ref_labels, anchor_ref_index)
        sim = F.normalize(emb, dim=1) @ F.normalize(ref_emb, dim=1).T  # [B, N]
        pos_mask, neg_mask = pair_masks(labels, ref_labels, anchor_ref_index)
        pos = _log1p_sum_exp(-self.alpha * (sim - self.base), pos_mask) / self.alpha
        neg = _log1p_sum_exp(self.beta * (sim - self.base), neg_mask) / self.beta
        return LossTerms(pos + neg, "mean")


def _log1p_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(x_ij))`` over the kept entries of each row, computed stably; 0 for an empty row.

    >>> _log1p_sum_exp(torch.tensor([[0.0, 5.0]]), torch.tensor([[True, False]])).tolist()
    [0.6931471824645996]
    """
    x = x.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(torch.cat([x, torch.zeros_like(x[:, :1])], dim=1), dim=1)

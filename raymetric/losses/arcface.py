"""ArcFace (OML's ``arcface`` and ``mlp_arcface``): a classification loss with a trainable class-weight matrix.

Its terms are per sample and need no reference batch. Its class weights are parameters of the
criterion, so the training recipe puts the criterion under DDP too: every worker's weight gradient
is averaged like the model's, and the weights stay identical on every worker.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from raymetric.losses.base import LossTerms, check_reduction


class ArcFaceLoss(nn.Module):
    """ArcFace loss (additive angular margin, arXiv:1801.07698) with OML's defaults and label smoothing.

    ``logit_j = s * cos(theta_j + m)`` for the true class (``s * (cos theta_j - m sin m)`` past
    ``theta_j > pi - m``, as in OML) and ``s * cos(theta_j)`` for the others; cross-entropy per sample.

    Args:
        in_features: embedding size (given by the training code).
        num_classes: number of training labels; labels must be ``0 .. num_classes - 1`` (given by the
            training code, which remaps labels).
        m: angular margin (OML's configs use 0.4).
        s: logit scale.
        smoothing_epsilon: label smoothing; with ``label2category``, spread only over the classes of
            the sample's own category (OML's behaviour when the dataset has categories).
        label2category: category of every class (given by the training code when the dataset has a
            ``category`` column).
        reduction: ``mean`` or ``sum`` over samples of the global batch.
    """

    needs_reference = False  # per-sample terms: no gathered batch needed

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 0.5,
        s: float = 64.0,
        smoothing_epsilon: float = 0.0,
        label2category: dict[int, Any] | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        check_reduction(reduction)
        if not 0 <= smoothing_epsilon < 1:
            raise ValueError(f"smoothing_epsilon must be in [0, 1), got {smoothing_epsilon}")
        if s <= 0 or not 0 <= m < math.pi / 2:
            raise ValueError(f"need s > 0 and 0 <= m < pi/2, got s={s}, m={m}")
        if num_classes < 2 or in_features < 1:
            raise ValueError(f"need num_classes >= 2 and in_features >= 1, got {num_classes}, {in_features}")
        self.num_classes = num_classes
        self.m, self.s = m, s
        self.smoothing_epsilon = smoothing_epsilon
        self.reduction = reduction
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        if label2category is not None:
            missing = sorted(set(range(num_classes)) - set(label2category))[:10]
            if missing:
                raise ValueError(f"label2category has no category for classes {missing}")
            names = {c: i for i, c in enumerate(sorted({label2category[j] for j in range(num_classes)}, key=str))}
            categories = torch.tensor([names[label2category[j]] for j in range(num_classes)])
        else:
            categories = None
        # Not a parameter: no gradient, and not part of the state (it comes from the dataset).
        self.register_buffer("class_category", categories, persistent=False)

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits with the margin on the true class, cosines)``, both ``[B, num_classes]``."""
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))  # [B, L]
        # clamp: cos can exceed 1 by rounding, and sqrt has an infinite slope at 0
        sin = (1.0 - cos**2).clamp(min=1e-12).sqrt()
        cos_margin = cos * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
        cos_margin = torch.where(cos > -math.cos(self.m), cos_margin, cos - math.sin(self.m) * self.m)
        is_target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels[:, None], True)
        return torch.where(is_target, cos_margin, cos) * self.s, cos

    def targets(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Smoothed target distributions ``[B, num_classes]`` (OML's ``label_smoothing``).

        >>> loss = ArcFaceLoss(2, 4, smoothing_epsilon=0.2, label2category={0: "a", 1: "a", 2: "b", 3: "b"})
        >>> [round(v, 3) for v in loss.targets(torch.tensor([0]))[0].tolist()]
        [0.9, 0.1, 0.0, 0.0]
        """
        eps = self.smoothing_epsilon
        one_hot = torch.zeros(len(labels), self.num_classes, device=labels.device, dtype=dtype).scatter_(1, labels[:, None], 1.0)
        if eps == 0:
            return one_hot
        if self.class_category is None:
            return one_hot * (1 - eps) + eps / self.num_classes
        same = self.class_category[labels][:, None] == self.class_category[None, :]  # [B, L]
        same = same.to(dtype)
        return one_hot * (1 - eps) + same * (eps / same.sum(1, keepdim=True))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, *_: Any, **__: Any) -> LossTerms:
        """Per-sample terms for the local batch ``emb`` [B, D]; the reference batch is not used."""
        logits, cos = self.logits(emb, labels)
        values = -(self.targets(labels, logits.dtype) * F.log_softmax(logits, dim=1)).sum(1)  # [B]
        stats = {"accuracy": (cos.detach().argmax(1) == labels).sum()}
        return LossTerms(values, self.reduction, stats)


class ArcFaceLossWithMLP(nn.Module):
    """ArcFace after an MLP projector (OML's ``mlp_arcface``); the MLP lives in the criterion and is not used at inference.

    Args:
        in_features: embedding size (given by the training code).
        num_classes: number of training labels (given by the training code).
        mlp_features: layer sizes of the MLP (``torchvision.ops.MLP``: Linear + ReLU, no activation after the last).
        m: angular margin.
        s: logit scale.
        smoothing_epsilon: label smoothing.
        label2category: category of every class (given by the training code).
        reduction: ``mean`` or ``sum``.
    """

    needs_reference = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        mlp_features: list[int],
        m: float = 0.5,
        s: float = 64.0,
        smoothing_epsilon: float = 0.0,
        label2category: dict[int, Any] | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        from torchvision.ops import MLP

        if not mlp_features or not all(isinstance(n, int) and n > 0 for n in mlp_features):
            raise ValueError(f"mlp_features must be a non-empty list of positive ints, got {mlp_features!r}")
        self.mlp = MLP(in_features, list(mlp_features))
        self.arcface = ArcFaceLoss(mlp_features[-1], num_classes, m, s, smoothing_epsilon, label2category, reduction)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, *_: Any, **__: Any) -> LossTerms:
        return self.arcface(self.mlp(emb), labels)

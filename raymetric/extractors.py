"""Feature extractors: images ``[B, 3, H, W]`` to embeddings ``[B, D]``.

Any timm backbone by name (timm's registry is ours), built with ``pretrained=False`` since nothing is
downloaded at run time; pretrained weights come from a local file. A user's own ``nn.Module`` works
too: subclass ``Extractor`` and pass it to the training entry point by name
(``raymetric.train.fit(cfg, extractors={"mine": MyExtractor})``), no global registry to mutate.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn


class Extractor(nn.Module):
    """Interface every extractor follows (like OML's IExtractor).

    Subclasses set ``feat_dim`` and implement ``forward(images) -> [B, feat_dim]``.
    """

    feat_dim: int

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings for inference: eval mode is the caller's business, no autograd here."""
        return self(images)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: ``backbone`` (frozen by ``freeze_n_epochs``) and ``head``, each with its own
        optimizer arguments (``optimizer.groups``). Subclasses with a head override this; by default
        everything is backbone."""
        return {"backbone": list(self.parameters())}


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file (``weights_only``: no code runs on load).

    A directory names a raymetric extractor: a run directory (its best checkpoint, else its latest),
    a checkpoint directory or an export folder (``raymetric.export``). A raymetric checkpoint's
    tensors are its extractor's (``state["model"]``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if os.path.isdir(path):
        from raymetric.export import extractor_weights_file

        path = extractor_weights_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers around the tensors
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


class TimmExtractor(Extractor):
    """A timm backbone (global-pooled features), an optional linear projection, L2 normalisation.

    Args:
        arch: any name from ``timm.list_models()``, e.g. ``resnet18``, ``vit_small_patch16_224``.
        embedding_size: output dimension of a linear projection after the backbone; None keeps the
            backbone's feature size.
        normalise_features: L2-normalise the output (OML's key name).
        weights: local path of backbone weights (``.pth`` or ``.safetensors``), loaded strictly
            except for the classifier head timm drops; or a raymetric run directory, checkpoint
            (directory or ``state.pt``) or export folder, whose projection and neck are loaded too
            when their shapes fit.
        drop_rate: dropout before the projection (timm's ``drop_rate``).
        batchnorm_neck: a BatchNorm1d on the embedding before normalisation ("BNNeck"). It centres
            the features of an untrained backbone, which all point the same way; without it, hard
            triplet mining from scratch tends to collapse every embedding to one point.
        model_args: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        embedding_size: int | None = None,
        normalise_features: bool = True,
        weights: str | None = None,
        drop_rate: float = 0.0,
        batchnorm_neck: bool = False,
        model_args: dict | None = None,
    ):
        super().__init__()
        import timm

        self.backbone = timm.create_model(
            arch, pretrained=False, num_classes=0, drop_rate=drop_rate, **(model_args or {})
        )
        head_state: dict[str, torch.Tensor] = {}
        if weights:
            state = load_state_dict_file(weights)
            if any(k.startswith("backbone.") for k in state):
                # A raymetric extractor (checkpoint or export): backbone, projection and neck.
                head_state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
                state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected if not k.startswith(("fc.", "head", "classifier"))]
            if missing or unexpected:
                raise ValueError(
                    f"extractor.args.weights={weights!r} does not fit {arch}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        backbone_dim = self.backbone.num_features
        self.proj = nn.Linear(backbone_dim, embedding_size) if embedding_size else nn.Identity()
        self.feat_dim = embedding_size or backbone_dim
        self.neck = nn.BatchNorm1d(self.feat_dim) if batchnorm_neck else nn.Identity()
        self.normalise_features = normalise_features
        if head_state:
            self._load_head(head_state, weights)

    def _load_head(self, head_state: dict[str, torch.Tensor], weights: str) -> None:
        """Projection and neck from a raymetric extractor, when they have the same shapes here;
        otherwise (another embedding size, no neck) they keep their fresh initialisation."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        if own.keys() == head_state.keys() and all(own[k].shape == head_state[k].shape for k in own):
            self.load_state_dict(head_state, strict=False)
        else:
            logging.getLogger(__name__).warning(
                "extractor.args.weights=%r: backbone loaded; its head (%s) does not fit this extractor's "
                "(%s) and starts fresh", weights, sorted(head_state), sorted(own)
            )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The timm backbone, and the head: projection and BN neck.

        >>> groups = TimmExtractor("resnet10t", embedding_size=8, batchnorm_neck=True).param_groups()
        >>> len(groups["head"])  # projection weight and bias, BN weight and bias
        4
        """
        return {"backbone": list(self.backbone.parameters()), "head": [*self.proj.parameters(), *self.neck.parameters()]}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.neck(self.proj(self.backbone(images)))  # [B, D]
        if self.normalise_features:
            emb = nn.functional.normalize(emb.float(), dim=1)
        return emb


EXTRACTORS = {"timm": TimmExtractor}


def build_extractor(name: str, args: dict | None = None, extra: dict | None = None) -> Extractor:
    """Build the extractor registered as ``name`` (in ``EXTRACTORS`` or the caller's ``extra``)."""
    registry = EXTRACTORS | (extra or {})
    if name not in registry:
        raise ValueError(f"unknown extractor {name!r}; known: {sorted(registry)}")
    return registry[name](**(args or {}))

"""Image transforms by name (torchvision.transforms.v2), named as in OML so its users recognise them.

Every transform takes an RGB PIL image (from :func:`raymetric.data.dataset.read_image`) and returns a
plain float32 tensor ``[3, H, W]``, normalised. Resizing happens on the PIL image, before the tensor
conversion, so ``norm_resize_torch`` gives the same numbers as OML's ``get_normalisation_resize_torch``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def augs_torch(
    *,
    im_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """Training augmentation: random resized crop, horizontal flip, colour jitter; ``[3, im_size, im_size]``.

    Stronger than OML's ``augs_torch`` (a square resize, a flip and a ``ColorJitter()`` whose defaults do
    nothing): a crop of 30-100% of the image at a random aspect ratio, then a mild jitter. No rotation:
    the crop already varies geometry, and rotating adds black corners.

    Args:
        im_size: Side of the square output.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by.
    """
    _check_size("im_size", im_size)
    return v2.Compose(
        [
            v2.RandomResizedCrop((im_size, im_size), scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25),
            *_to_normalised_tensor(mean, std),
        ]
    )


def norm_resize_torch(
    *,
    im_size: int = 224,
    crop_size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """Validation: a square resize to ``im_size`` (aspect ratio not kept, as in OML), optionally a centre crop.

    Output ``[3, im_size, im_size]``, or ``[3, crop_size, crop_size]`` with a crop. Bilinear with
    antialiasing, as OML's ``get_normalisation_resize_torch``, which this matches exactly without a crop.

    Args:
        im_size: Side of the square the image is resized to.
        crop_size: Side of the centre crop taken after the resize; no crop when None.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by.
    """
    return v2.Compose([*resize_steps(im_size, crop_size), *_to_normalised_tensor(mean, std)])


def norm_torch(
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """Only to tensor and normalise, for images that are already sized: ``[3, H, W]`` of the input.

    Args:
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by.
    """
    return v2.Compose(_to_normalised_tensor(mean, std))


def _to_normalised_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std positive; got mean={mean}, std={std}")
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        # A plain Tensor, not a tv_tensors.Image: nothing downstream needs the subclass.
        v2.ToPureTensor(),
    ]


def resize_steps(im_size: int, crop_size: int | None) -> list[Callable]:
    """Resize to ``im_size`` squared, then a centre crop of ``crop_size`` when given (checked)."""
    _check_size("im_size", im_size)
    steps = [v2.Resize((im_size, im_size), antialias=True)]
    if crop_size is not None:
        _check_size("crop_size", crop_size)
        if crop_size > im_size:
            raise ValueError(f"crop_size ({crop_size}) must not exceed im_size ({im_size})")
        steps.append(v2.CenterCrop(crop_size))
    return steps


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def build_transforms(name: str, args: dict | None = None) -> Callable:
    """Builds the transform registered as ``name`` with keyword ``args``.

    >>> from PIL import Image
    >>> build_transforms("norm_resize_torch", {"im_size": 32})(Image.new("RGB", (50, 20))).shape
    torch.Size([3, 32, 32])

    Raises:
        ValueError: The name is unknown, or ``args`` holds names the factory does not take.
    """
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transforms {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
    factory = TRANSFORMS[name]
    args = dict(args or {})
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(
            f"transforms {name!r} takes no argument(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    return factory(**args)


TRANSFORMS: dict[str, Callable[..., Callable]] = {
    "augs_torch": augs_torch,
    "norm_resize_torch": norm_resize_torch,
    "norm_torch": norm_torch,
}

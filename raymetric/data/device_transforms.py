"""The training transforms in batched form, for the worker's device (GPU, or the CPU in tests): plain torch.

A transform of ``raymetric.data.transforms`` is split in two. The *host part* runs per image in the
DataLoader processes and ends in a uint8 tensor: the geometry (resize, random crop, flip), which
fixes the image size so images can be batched. The *device part* runs on a whole uint8 batch on the
training device: to float, colour jitter, normalise. A uint8 batch is a quarter of the float one, so
less memory travels from the DataLoader processes to the GPU, and the per-pixel float work leaves the
CPUs. With JPEGs decoded on the GPU (``loader.decode: gpu``) the geometry runs on the device too
(``from_decoded``): each decoded image is cropped and resized on its own, then the batch goes on as above.

Same names and arguments as ``TRANSFORMS`` (``DEVICE_TRANSFORMS`` below). Differences from the per-image
CPU transforms, by design: the colour jitter applies brightness, contrast and saturation in this
fixed order (torchvision draws an order per image) on float pixels (Pillow rounds to uint8 between
them); on decoded images, resizing is ``torch.nn.functional.interpolate`` (bilinear, antialiased)
rather than Pillow's, which differs by about one grey level. ``norm_resize_torch`` through the host
and device parts gives exactly the CPU transform's numbers.

Random draws come from explicit generators (one on the CPU for crop boxes, one on the device for
flips and jitter factors), seeded per step by the caller, so a batch's augmentation does not depend on
when it is prepared. Nothing here synchronises the device with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from raymetric.data.transforms import IMAGENET_MEAN, IMAGENET_STD, _check_size, resize_steps

Generators = tuple[torch.Generator, torch.Generator]  # (on the CPU: crop boxes; on the device: flips, jitter)


@dataclass
class DeviceTransform:
    """A transform split into its host part and its batched device part.

    Attributes:
        host: per RGB PIL image, in the DataLoader processes: ``uint8 [3, S, S]``.
        finish: ``(uint8 [B, 3, S, S] on the device, generators) -> float32 [B, 3, S, S]``, normalised.
        from_decoded: ``(list of uint8 [3, h, w] on the device, generators) -> float32 [B, 3, S, S]``:
            the host part's geometry too, for images decoded on the device.
    """

    host: Callable
    finish: Callable[[torch.Tensor, Generators], torch.Tensor]
    from_decoded: Callable[[list[torch.Tensor], Generators], torch.Tensor]


# ---------------------------------------------------------------- batched pieces


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` to float32 in [0, 1], as ``v2.ToDtype(torch.float32, scale=True)`` computes it.

    >>> to_unit_float(torch.tensor([[[[0, 255]]]], dtype=torch.uint8)).tolist()
    [[[[0.0, 1.0]]]]
    """
    return images.to(torch.float32).mul_(1.0 / 255)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel of a float ``[B, 3, H, W]`` batch."""
    return F.normalize(images, mean=list(mean), std=list(std))


def random_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Each image of ``[B, C, H, W]`` mirrored left-right with probability ``p``."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < p  # [B]
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` with torchvision's weights."""
    r, g, b = images.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


def color_jitter(
    images: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float, saturation: float
) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of a float ``[B, 3, H, W]`` batch in [0, 1], a factor per image.

    Each factor is drawn uniformly from ``[max(0, 1 - v), 1 + v]`` (torchvision's ``ColorJitter``) and
    applied as torchvision's ``adjust_*`` functions do on float images, in the order brightness,
    contrast, saturation.
    """
    def factors(v: float) -> torch.Tensor:
        low, high = max(0.0, 1.0 - v), 1.0 + v
        u = torch.rand(len(images), generator=generator, device=images.device)
        return (low + (high - low) * u)[:, None, None, None]  # [B, 1, 1, 1]

    if brightness:
        images = (images * factors(brightness)).clamp_(0, 1)
    if contrast:
        mean = _grey(images).mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
        c = factors(contrast)
        images = (c * images + (1 - c) * mean).clamp_(0, 1)
    if saturation:
        s = factors(saturation)
        images = (s * images + (1 - s) * _grey(images)).clamp_(0, 1)
    return images


def resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area at an aspect ratio in ``ratio``.

    torchvision's ``RandomResizedCrop`` rule (ten tries, then a centre crop at the nearest allowed ratio),
    drawing from ``generator``.

    >>> resized_crop_box(100, 200, (1.0, 1.0), (2.0, 2.0), torch.Generator().manual_seed(0))
    (0, 0, 100, 200)
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()  # on the CPU: no device sync
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_each(images: Sequence[torch.Tensor], size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """Images of any sizes (uint8 ``[3, h, w]``), each cropped to its box ``(top, left, h, w)`` and resized: float ``[B, 3, *size]`` in [0, 255].

    Bilinear with antialiasing, as Pillow's resize; one interpolation per image (sizes differ).
    """
    if not images:
        raise ValueError("resize_each needs at least one image")
    out = torch.empty((len(images), 3, *size), dtype=torch.float32, device=images[0].device)
    for i, image in enumerate(images):
        if boxes is not None:
            top, left, h, w = boxes[i]
            image = image[:, top:top + h, left:left + w]
        out[i] = torch.nn.functional.interpolate(
            image[None].to(torch.float32), size=size, mode="bilinear", antialias=True, align_corners=False
        )[0]
    return out


# ---------------------------------------------------------------- the transforms, split


def augs_torch(
    *,
    im_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> DeviceTransform:
    """``augs_torch`` split: random resized crop and flip on the host, jitter and normalisation on the device."""
    _check_size("im_size", im_size)
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)  # as raymetric.data.transforms.augs_torch
    jitter = dict(brightness=0.25, contrast=0.25, saturation=0.25)
    host = v2.Compose([
        v2.RandomResizedCrop((im_size, im_size), scale=scale, ratio=ratio, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])

    def finish(images: torch.Tensor, gens: Generators) -> torch.Tensor:
        return normalise(color_jitter(to_unit_float(images), gens[1], **jitter), mean, std)

    def from_decoded(images: list[torch.Tensor], gens: Generators) -> torch.Tensor:
        boxes = [resized_crop_box(im.shape[1], im.shape[2], scale, ratio, gens[0]) for im in images]
        batch = resize_each(images, (im_size, im_size), boxes).mul_(1.0 / 255).clamp_(0, 1)
        batch = random_flip(batch, gens[1])
        return normalise(color_jitter(batch, gens[1], **jitter), mean, std)

    return DeviceTransform(host, finish, from_decoded)


def norm_resize_torch(
    *,
    im_size: int = 224,
    crop_size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> DeviceTransform:
    """``norm_resize_torch`` split: resize (and centre crop) on the host, normalisation on the device."""
    host = v2.Compose([*resize_steps(im_size, crop_size), v2.PILToTensor()])

    def finish(images: torch.Tensor, gens: Generators) -> torch.Tensor:
        return normalise(to_unit_float(images), mean, std)

    def from_decoded(images: list[torch.Tensor], gens: Generators) -> torch.Tensor:
        batch = resize_each(images, (im_size, im_size)).round_().clamp_(0, 255)  # Pillow gives whole grey levels
        if crop_size is not None:
            batch = F.center_crop(batch, [crop_size, crop_size])
        return normalise(batch.mul_(1.0 / 255), mean, std)

    return DeviceTransform(host, finish, from_decoded)


def norm_torch(
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> DeviceTransform:
    """``norm_torch`` split: nothing on the host but the tensor conversion (images must share one size)."""

    def finish(images: torch.Tensor, gens: Generators) -> torch.Tensor:
        return normalise(to_unit_float(images), mean, std)

    def from_decoded(images: list[torch.Tensor], gens: Generators) -> torch.Tensor:
        return finish(torch.stack(images), gens)

    return DeviceTransform(v2.PILToTensor(), finish, from_decoded)


def build_device_transform(name: str, args: dict | None = None) -> DeviceTransform:
    """The split form of the transform registered as ``name`` in ``TRANSFORMS``, with the same ``args``.

    >>> t = build_device_transform("norm_resize_torch", {"im_size": 8})
    >>> gens = (torch.Generator(), torch.Generator())
    >>> t.finish(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gens).shape
    torch.Size([2, 3, 8, 8])

    Raises:
        ValueError: No split form exists for ``name``, or the arguments are wrong.
    """
    if name not in DEVICE_TRANSFORMS:
        raise ValueError(
            f"transforms {name!r} has no device form; known: {', '.join(sorted(DEVICE_TRANSFORMS))}"
        )
    try:
        return DEVICE_TRANSFORMS[name](**(args or {}))
    except TypeError as err:
        raise ValueError(f"transforms {name!r}: {err}") from None


DEVICE_TRANSFORMS: dict[str, Callable[..., DeviceTransform]] = {
    "augs_torch": augs_torch,
    "norm_resize_torch": norm_resize_torch,
    "norm_torch": norm_torch,
}

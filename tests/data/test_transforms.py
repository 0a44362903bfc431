"""Tests of the transforms registry: every entry builds and gives the documented shape and dtype."""

import inspect

import pytest
import torch
import torchvision.transforms as v1
from PIL import Image

from raymetric.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TRANSFORMS, build_transforms


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy(), "RGB")


def expected_side(name: str) -> int | None:
    """The fixed output side a factory documents by its size arguments, None if it keeps the input's size."""
    defaults = {p.name: p.default for p in inspect.signature(TRANSFORMS[name]).parameters.values()}
    return defaults.get("crop_size") or defaults.get("im_size")


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_entry_builds_with_defaults_and_gives_float_chw(name):
    for parameter in inspect.signature(TRANSFORMS[name]).parameters.values():
        # The config layer validates user args against the signature: keyword-only, no **kwargs.
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    transform = build_transforms(name)
    side = expected_side(name)
    for width, height in [(50, 30), (31, 64)]:
        out = transform(image(width, height))
        assert type(out) is torch.Tensor and out.dtype == torch.float32
        assert out.shape == ((3, side, side) if side else (3, height, width))
        assert torch.isfinite(out).all()


def test_norm_resize_matches_oml():
    # OML's get_normalisation_resize_torch, written with torchvision's v1 API.
    oml = v1.Compose(
        [v1.Resize(size=(40, 40), antialias=True), v1.ToTensor(), v1.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    )
    picture = image(57, 33)
    assert torch.allclose(build_transforms("norm_resize_torch", {"im_size": 40})(picture), oml(picture), atol=1e-6)


def test_norm_resize_crop_and_norm_keep_pixels():
    picture = image(20, 20)
    resized = build_transforms("norm_resize_torch", {"im_size": 20})(picture)
    cropped = build_transforms("norm_resize_torch", {"im_size": 20, "crop_size": 10})(picture)
    assert cropped.shape == (3, 10, 10)
    assert torch.equal(cropped, resized[:, 5:15, 5:15])  # a resize to the same size leaves pixels alone
    normalised = build_transforms("norm_torch")(picture)
    assert torch.equal(normalised, resized)


def test_augs_are_random_but_seedable():
    picture = image(64, 48)
    augs = build_transforms("augs_torch", {"im_size": 32})
    torch.manual_seed(0)
    first = augs(picture)
    torch.manual_seed(0)
    assert torch.equal(augs(picture), first)
    assert any(not torch.equal(augs(picture), first) for _ in range(5))


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as error:
        build_transforms("augs_albu")
    for name in TRANSFORMS:
        assert name in str(error.value)


def test_bad_args_are_named():
    with pytest.raises(ValueError, match="takes no argument.* size; it takes: im_size"):
        build_transforms("augs_torch", {"size": 10})
    with pytest.raises(ValueError, match="crop_size"):
        build_transforms("norm_resize_torch", {"im_size": 10, "crop_size": 20})
    with pytest.raises(ValueError, match="im_size"):
        build_transforms("norm_resize_torch", {"im_size": 0})

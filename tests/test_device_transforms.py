"""The transforms' batched device forms against the per-image CPU transforms (torchvision as the oracle)."""

import inspect

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from raymetric.data.dataset import read_image
from raymetric.data.device_transforms import (
    DEVICE_TRANSFORMS,
    build_device_transform,
    color_jitter,
    resize_each,
    resized_crop_box,
)
from raymetric.data.transforms import TRANSFORMS, build_transforms


def _images(tiny_demo, n=6):
    import pandas as pd

    df = pd.read_csv(f"{tiny_demo}/df.csv")
    return [read_image(f"{tiny_demo}/{p}") for p in df["path"][:n]]


def _gens(seed=0):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_has_a_device_form_with_the_same_arguments(name):
    assert name in DEVICE_TRANSFORMS, f"add {name!r} to raymetric/data/device_transforms.py"
    cpu = inspect.signature(TRANSFORMS[name]).parameters
    device = inspect.signature(DEVICE_TRANSFORMS[name]).parameters
    assert [(p.name, p.default) for p in cpu.values()] == [(p.name, p.default) for p in device.values()]


@pytest.mark.parametrize("args", [{"im_size": 40}, {"im_size": 40, "crop_size": 32}])
def test_norm_resize_split_gives_exactly_the_cpu_transform(tiny_demo, args):
    images = _images(tiny_demo)
    cpu = torch.stack([build_transforms("norm_resize_torch", args)(im) for im in images])
    split = build_device_transform("norm_resize_torch", args)
    host = torch.stack([split.host(im) for im in images])
    assert host.dtype == torch.uint8
    assert torch.equal(split.finish(host, _gens()), cpu)


def test_norm_resize_from_decoded_is_within_a_grey_level_of_pillow(tiny_demo):
    images = _images(tiny_demo)
    cpu = torch.stack([build_transforms("norm_resize_torch", {"im_size": 40})(im) for im in images])
    decoded = [F.pil_to_tensor(im) for im in images]
    ours = build_device_transform("norm_resize_torch", {"im_size": 40}).from_decoded(decoded, _gens())
    # In normalised units one grey level is 1 / (255 * std) ~ 0.018; interpolation kernels differ slightly.
    assert (ours - cpu).abs().mean() < 0.02
    assert (ours - cpu).abs().max() < 0.2


def test_color_jitter_matches_torchvision_factor_by_factor():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 8, 9, generator=g)
    out = color_jitter(images.clone(), torch.Generator().manual_seed(7), brightness=0.25, contrast=0.25, saturation=0.25)
    draws = torch.Generator().manual_seed(7)
    factors = [0.75 + 0.5 * torch.rand(5, generator=draws) for _ in range(3)]  # the same draws, in order
    for i in range(5):
        expected = F.adjust_brightness(images[i], factors[0][i].item())
        expected = F.adjust_contrast(expected, factors[1][i].item())
        expected = F.adjust_saturation(expected, factors[2][i].item())
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)


def test_resized_crop_box_stays_inside_and_within_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for height, width in [(50, 80), (80, 50), (64, 64)]:
        for _ in range(200):
            top, left, h, w = resized_crop_box(height, width, (0.3, 1.0), (3 / 4, 4 / 3), g)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert 0.3 * 0.9 <= h * w / (height * width) <= 1.0
            assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_resize_each_with_a_whole_box_is_a_plain_resize():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    whole = resize_each([image], (10, 10), [(0, 0, 20, 30)])
    plain = torch.nn.functional.interpolate(image[None].float(), size=(10, 10), mode="bilinear", antialias=True)
    assert torch.equal(whole, plain)


def test_augs_from_decoded_is_seeded_and_varies_between_seeds(tiny_demo):
    decoded = [F.pil_to_tensor(im) for im in _images(tiny_demo)]
    t = build_device_transform("augs_torch", {"im_size": 24})
    a, b, c = (t.from_decoded(decoded, _gens(s)) for s in (3, 3, 4))
    assert a.shape == (len(decoded), 3, 24, 24) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augs_split_host_gives_uint8_and_finish_normalises():
    t = build_device_transform("augs_torch", {"im_size": 16})
    host = t.host(Image.new("RGB", (40, 30), (200, 100, 50)))
    assert host.dtype == torch.uint8 and host.shape == (3, 16, 16)
    out = t.finish(torch.stack([host, host]), _gens())
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)


def test_unknown_name_and_bad_args_are_refused():
    with pytest.raises(ValueError, match="has no device form"):
        build_device_transform("nope")
    with pytest.raises(ValueError, match="im_sze"):
        build_device_transform("augs_torch", {"im_sze": 3})

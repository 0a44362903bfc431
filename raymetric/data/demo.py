"""A seeded, procedurally drawn image-retrieval dataset in OML's CSV format (demos, tests, benchmarks).

Every label is one synthetic *object* with its own identity: a shape from a family (the label's
``category``: star, polygon, ring, cross, ...) with label-specific parameters, a texture (stripes, checker,
dots, gradient, concentric rings) with its own frequency and orientation, and two colours. Every image of
a label is a different *view* of that object: rotation, scale, aspect, position (a quarter of the views
are partial crops), background (gradient, noise or clutter), lighting (shading, brightness, contrast,
gamma, colour cast), sometimes blur, always a little sensor noise. Labels of one category share a shape
family, so they look more alike than labels of different categories.

The split is zero-shot, as in CUB or SOP: training and validation labels are disjoint, and every
validation row is both a query and a gallery item ("1 vs rest"). A share of the validation labels come as
bursts of 2-3 near-identical frames that share a ``sequence`` id (retrieval ignores same-sequence gallery
items), and a share of the images are larger cluttered canvases whose row carries the object's box in
``x_1, x_2, y_1, y_2`` (left, right, top, bottom; empty cells mean "no box").

Written under ``out_dir``::

    df.csv                           label,path,split,is_query,is_gallery,category,sequence,x_1,x_2,y_1,y_2
    images/train/0003/0001.jpg       paths in df.csv are relative to out_dir
    images/validation/0050/0000.jpg
    demo_spec.json                   the spec; written last, it marks the dataset as complete

Generation is deterministic: each image draws from its own ``numpy.random.default_rng`` seeded with
``(seed, stream, label, image index)``, so one spec gives the same CSV and JPEG bytes with any number of
processes.

Command line (prints the CSV's path)::

    python -m raymetric.data.demo --out data/demo                     # "default": 720 images, a few seconds
    python -m raymetric.data.demo --out data/tiny --size tiny          # 56 images, for tests
    python -m raymetric.data.demo --out data/large --size large --n-procs 16
    python -m raymetric.data.demo --out data/demo --seed 1 --force    # regenerate even if complete
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import dataclasses
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CSV_NAME = "df.csv"
SPEC_NAME = "demo_spec.json"
COLUMNS = ("label", "path", "split", "is_query", "is_gallery", "category", "sequence",
           "x_1", "x_2", "y_1", "y_2")
# Bump when the drawing changes, so that ensure_demo redraws datasets made by older code.
GENERATOR_VERSION = 1

FAMILIES = ("star", "polygon", "ring", "cross", "blob", "ellipse", "crescent", "arrow")
TEXTURES = ("stripes", "checker", "dots", "gradient", "rings")

# Stream ids keep identity, view, frame and plan draws independent even where their other keys coincide.
_IDENTITY, _VIEW, _FRAME, _PLAN = 0, 1, 2, 3


@dataclass(frozen=True)
class DemoSpec:
    """What to generate; equal specs give byte-identical datasets.

    Attributes:
        n_train_labels: Labels in the ``train`` split (ids ``0 .. n_train_labels - 1``).
        n_val_labels: Labels in the ``validation`` split (the ids that follow; disjoint from train).
        images_per_label: Images of every label (at least 2).
        image_size: Side in pixels of the square JPEGs; boxed canvases are 1.4-2.2 times larger.
        n_categories: Shape families in use, the first ``n_categories`` of ``FAMILIES``.
        bbox_fraction: Chance that an image is a larger cluttered canvas whose row carries a box.
        sequence_fraction: Share of validation labels whose images come as bursts sharing a sequence id
            (labels with fewer than 4 images never do, so every query keeps a relevant gallery item).
        jpeg_quality: Pillow's JPEG quality.
        seed: Root of every random draw (a non-negative integer).
    """

    n_train_labels: int = 48
    n_val_labels: int = 24
    images_per_label: int = 10
    image_size: int = 96
    n_categories: int = 4
    bbox_fraction: float = 0.3
    sequence_fraction: float = 0.3
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "n_train_labels": self.n_train_labels >= 1,
            "n_val_labels": self.n_val_labels >= 1,
            "images_per_label": self.images_per_label >= 2,
            "image_size": self.image_size >= 16,
            "n_categories": 1 <= self.n_categories <= len(FAMILIES),
            "bbox_fraction": 0.0 <= self.bbox_fraction <= 1.0,
            "sequence_fraction": 0.0 <= self.sequence_fraction <= 1.0,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
            "seed": self.seed >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DemoSpec.{name}={getattr(self, name)!r} is out of range")


SIZES: dict[str, DemoSpec] = {
    # 56 images at 48 px: generates in well under a second, for unit tests.
    "tiny": DemoSpec(n_train_labels=8, n_val_labels=6, images_per_label=4, image_size=48),
    # 720 images: trains a small CNN for a few minutes on 2 CPU cores at 64 px input.
    "default": DemoSpec(),
    # 100k images in all eight families, for throughput benchmarks.
    "large": DemoSpec(n_train_labels=7000, n_val_labels=3000, n_categories=8),
}


# ---------------------------------------------------------------------------------------------------
# Plan: which rows exist, with their splits, categories and sequences (cheap, in the main process).


def category_of(label: int, n_categories: int) -> str:
    """The category (shape family) of a label: families are dealt round-robin, so they stay balanced.

    >>> [category_of(label, 3) for label in range(4)]
    ['star', 'polygon', 'ring', 'star']
    """
    return FAMILIES[label % n_categories]


def split_into_bursts(n_images: int, rng: np.random.Generator) -> list[int]:
    """Random burst lengths of 2 or 3 that add up to ``n_images`` (at least 2).

    >>> sizes = split_into_bursts(10, np.random.default_rng(0))
    >>> sum(sizes), set(sizes) <= {2, 3}
    (10, True)
    """
    sizes: list[int] = []
    left = n_images
    while left > 0:
        if left in (2, 3):
            size = left
        elif left == 4:  # 3 would leave a single frame behind
            size = 2
        else:
            size = int(rng.integers(2, 4))
        sizes.append(size)
        left -= size
    return sizes


@dataclass(frozen=True)
class _LabelTask:
    """Everything a worker needs to draw and write one label's images."""

    spec: DemoSpec
    out_dir: str
    label: int
    split: str
    sequences: tuple[str, ...]  # per image: "" or the sequence id
    view_keys: tuple[int, ...]  # per image: whose view it draws (a burst shares its first frame's view)


def plan_labels(spec: DemoSpec, out_dir: str | os.PathLike = ".") -> list[_LabelTask]:
    """One task per label, in label order: train labels first, then validation labels.

    >>> tasks = plan_labels(SIZES["tiny"])
    >>> [t.split for t in tasks].count("validation"), sum(any(t.sequences) for t in tasks)
    (6, 2)
    """
    n = spec.images_per_label
    val_labels = list(range(spec.n_train_labels, spec.n_train_labels + spec.n_val_labels))
    # Bursts need at least two per label, or a query would have no relevant item left in the gallery.
    n_seq = int(spec.sequence_fraction * len(val_labels) + 0.5) if n >= 4 else 0
    plan_rng = np.random.default_rng([spec.seed, _PLAN])
    seq_labels = {int(x) for x in plan_rng.choice(val_labels, size=n_seq, replace=False)}

    tasks = []
    n_sequences = 0
    for label in range(spec.n_train_labels + spec.n_val_labels):
        sequences, view_keys = [""] * n, list(range(n))
        if label in seq_labels:
            start = 0
            for size in split_into_bursts(n, np.random.default_rng([spec.seed, _PLAN, label])):
                for i in range(start, start + size):
                    sequences[i], view_keys[i] = f"seq_{n_sequences:04d}", start
                start += size
                n_sequences += 1
        split = "train" if label < spec.n_train_labels else "validation"
        tasks.append(_LabelTask(spec, str(out_dir), label, split, tuple(sequences), tuple(view_keys)))
    return tasks


def image_path(spec: DemoSpec, label: int, index: int) -> str:
    """The image's path relative to the dataset folder.

    >>> image_path(SIZES["tiny"], 9, 3)
    'images/validation/0009/0003.jpg'
    """
    split = "train" if label < spec.n_train_labels else "validation"
    width = max(4, len(str(spec.n_train_labels + spec.n_val_labels - 1)))
    return f"images/{split}/{label:0{width}d}/{index:04d}.jpg"


# ---------------------------------------------------------------------------------------------------
# Identity: what one label's object looks like, in object units (the object fits the unit disc).


@dataclass(frozen=True)
class ObjectIdentity:
    """One label's object.

    Attributes:
        category: The shape family.
        ops: Polygons drawn in order, as ``(fill, [N, 2] vertices)``; fill 255 adds, 0 cuts a hole.
        texture: One of ``TEXTURES``.
        freq: Texture cycles per object unit.
        direction: Texture orientation in radians.
        phase: Texture phase in radians.
        colors: ``[2, 3]`` RGB in [0, 1], the texture's two colours.
    """

    category: str
    ops: tuple[tuple[int, np.ndarray], ...]
    texture: str
    freq: float
    direction: float
    phase: float
    colors: np.ndarray


def _radial(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _ellipse(rx: float, ry: float, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _shape_ops(family: str, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """The label-specific polygons of one shape family."""
    if family == "star":
        k = int(rng.integers(4, 9))
        radii = np.where(np.arange(2 * k) % 2 == 0, 1.0, rng.uniform(0.35, 0.65))
        return [(255, _radial(radii, np.arange(2 * k) * np.pi / k))]
    if family == "polygon":
        k = int(rng.integers(3, 9))
        # Irregular corners make two hexagons of different labels tell apart.
        radii = 1.0 - rng.uniform(0.0, 0.25, k)
        angles = (np.arange(k) + rng.uniform(-0.15, 0.15, k)) * 2 * np.pi / k
        return [(255, _radial(radii, angles))]
    if family == "ring":
        hole = rng.uniform(0.35, 0.6)
        dx, dy = rng.uniform(-0.15, 0.15, 2)
        ops = [(255, _ellipse(1.0, rng.uniform(0.75, 1.0))), (0, _ellipse(hole, hole, dx, dy))]
        if rng.random() < 0.5:  # a notch turns the ring into a "C"
            a, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.9)
            ops.append((0, np.array([[0.0, 0.0], [1.5 * np.cos(a - width / 2), 1.5 * np.sin(a - width / 2)],
                                     [1.5 * np.cos(a + width / 2), 1.5 * np.sin(a + width / 2)]])))
        return ops
    if family == "cross":
        h = rng.uniform(0.12, 0.25)
        a0, a1, a2, a3 = rng.uniform(0.55, 1.0, 4)
        return [(255, np.array([[a0, -h], [a0, h], [h, h], [h, a1], [-h, a1], [-h, h], [-a2, h],
                                [-a2, -h], [-h, -h], [-h, -a3], [h, -a3], [h, -h]]))]
    if family == "blob":
        t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
        radii = 1.0 + sum(rng.uniform(0.0, 0.2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
                          for k in range(2, 6))
        return [(255, _radial(radii / radii.max(), t))]
    if family == "ellipse":
        ops = [(255, _ellipse(1.0, rng.uniform(0.4, 0.85)))]
        if rng.random() < 0.5:  # an off-centre eye
            ops.append((0, _ellipse(0.18, 0.18, rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.2), n=24)))
        return ops
    if family == "crescent":
        r = rng.uniform(0.7, 0.95)
        return [(255, _ellipse(1.0, 1.0)), (0, _ellipse(r, r, rng.uniform(0.3, 0.6), 0.0))]
    if family == "arrow":
        shaft, head, head_len = rng.uniform(0.1, 0.25), rng.uniform(0.35, 0.7), rng.uniform(0.4, 0.9)
        x = 1.0 - head_len
        return [(255, np.array([[-1.0, -shaft], [x, -shaft], [x, -head], [1.0, 0.0], [x, head],
                                [x, shaft], [-1.0, shaft]]))]
    raise ValueError(f"unknown shape family {family!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def make_identity(seed: int, label: int, n_categories: int) -> ObjectIdentity:
    """Draw one label's object; the same ``(seed, label)`` always gives the same object."""
    rng = np.random.default_rng([seed, _IDENTITY, label])
    category = category_of(label, n_categories)
    hue = rng.uniform()
    colors = np.stack([_hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)),
                       _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.3, 1.0), rng.uniform(0.2, 0.95))])
    return ObjectIdentity(
        category=category,
        ops=tuple(_shape_ops(category, rng)),
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        freq=float(rng.uniform(1.0, 2.5)),
        direction=float(rng.uniform(0, np.pi)),
        phase=float(rng.uniform(0, 2 * np.pi)),
        colors=colors,
    )


def _texture(identity: ObjectIdentity, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mixing weight in [0, 1] between the two colours, at object coordinates ``(u, v)``."""
    c, s = np.cos(identity.direction), np.sin(identity.direction)
    d, e = c * u + s * v, c * v - s * u
    f, p = identity.freq * 2 * np.pi, identity.phase
    if identity.texture == "stripes":
        w = np.sin(f * d + p)
    elif identity.texture == "checker":
        w = np.sin(f * d + p) * np.sin(f * e)
    elif identity.texture == "dots":
        w = np.cos(f * d + p) + np.cos(f * e) - 0.8
    elif identity.texture == "rings":
        w = np.sin(f * np.sqrt(u * u + v * v) + p)
    else:  # gradient
        w = 0.7 * d
    # Steep but smooth edges: crisp patterns without aliasing at small sizes.
    return np.clip(0.5 + 2.0 * w, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# View: how one image shows the object (pure values; a burst shares one view plus a tiny jitter).


@dataclass(frozen=True)
class View:
    """Pose, canvas and lighting of one image (pixel units)."""

    width: int
    height: int
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    background: str
    bg_seed: int
    light: float
    brightness: float
    contrast: float
    gamma: float
    cast: tuple[float, float, float]
    blur: float
    noise: float
    has_bbox: bool


def sample_view(rng: np.random.Generator, image_size: int, bbox_fraction: float) -> View:
    """Draw a random view of an object for a square image of ``image_size`` pixels."""
    size = image_size
    has_bbox = bool(rng.random() < bbox_fraction)
    radius = size / 2 * rng.uniform(0.45, 0.85)
    aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    if has_bbox:
        width, height = (int(x) for x in np.round(size * rng.uniform(1.4, 2.2, 2)))
        # Keep the whole object on the canvas, so that the box is its full extent.
        margin = radius * max(aspect, 1 / aspect) + 2
        cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        background = "clutter"
    else:
        width = height = size
        # A quarter of the views are partial crops; the centre always stays in the frame.
        spread = 0.3 if rng.random() < 0.25 else 0.12
        cx, cy = size / 2 + rng.uniform(-spread, spread, 2) * size
        background = ("gradient", "noise", "clutter")[int(rng.integers(3))]
    return View(
        width=width, height=height, cx=float(cx), cy=float(cy), radius=float(radius),
        angle=float(rng.uniform(0, 2 * np.pi)), aspect=aspect, background=background,
        bg_seed=int(rng.integers(2**62)), light=float(rng.uniform(0, 2 * np.pi)),
        brightness=float(rng.uniform(0.7, 1.3)), contrast=float(rng.uniform(0.7, 1.3)),
        gamma=float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))),
        cast=tuple(float(x) for x in rng.uniform(0.85, 1.15, 3)),
        blur=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.3 else 0.0,
        noise=float(rng.uniform(0.0, 0.03)), has_bbox=has_bbox,
    )


def jitter_view(view: View, rng: np.random.Generator) -> View:
    """A near-identical frame of ``view``: the camera shakes a little, the background stays."""
    shake = 0.02 * min(view.width, view.height)
    return dataclasses.replace(
        view,
        cx=view.cx + float(rng.uniform(-shake, shake)),
        cy=view.cy + float(rng.uniform(-shake, shake)),
        radius=view.radius * float(rng.uniform(0.97, 1.03)),
        angle=view.angle + float(rng.uniform(-0.05, 0.05)),
        brightness=view.brightness * float(rng.uniform(0.97, 1.03)),
    )


# ---------------------------------------------------------------------------------------------------
# Rendering.


def mask_bbox(mask: np.ndarray, threshold: float = 0.25) -> tuple[int, int, int, int] | None:
    """Tight ``(x_1, x_2, y_1, y_2)`` box (right and bottom exclusive) of ``mask > threshold``.

    >>> mask = np.zeros((4, 5)); mask[1:3, 2] = 1.0
    >>> mask_bbox(mask)
    (2, 3, 1, 3)
    >>> mask_bbox(np.zeros((4, 5))) is None
    True
    """
    inside = mask > threshold
    cols, rows = np.flatnonzero(inside.any(axis=0)), np.flatnonzero(inside.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.05, 0.95, 3).astype(np.float32)


def _background(view: View) -> np.ndarray:
    """``[H, W, 3]`` float background; a function of the view alone, so burst frames share it."""
    rng = np.random.default_rng(view.bg_seed)
    w, h = view.width, view.height
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * np.arange(w)[None, :] / w + np.sin(a) * np.arange(h)[:, None] / h)
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)).astype(np.float32)[..., None]
    img = _random_color(rng) * (1 - ramp) + _random_color(rng) * ramp
    if view.background == "noise":
        cells = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        low = np.asarray(Image.fromarray(cells).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
        img = 0.4 * img + 0.6 * low
    elif view.background == "clutter":
        canvas = Image.fromarray((img * 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        # Distractors smaller than the object, as many per area on large canvases as on small ones.
        side = min(w, h)
        for _ in range(int(rng.integers(3, 9) * w * h / side**2)):
            color = tuple(int(x) for x in rng.integers(0, 256, 3))
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            r = side * rng.uniform(0.04, 0.16)
            kind = int(rng.integers(3))
            if kind == 0:
                draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=color)
            elif kind == 1:
                k = int(rng.integers(3, 6))
                pts = _radial(r * rng.uniform(0.5, 1.0, k), np.sort(rng.uniform(0, 2 * np.pi, k)))
                draw.polygon((pts + [x, y]).ravel().tolist(), fill=color)
            else:
                draw.line([x, y, x + rng.uniform(-2, 2) * r, y + rng.uniform(-2, 2) * r], fill=color,
                          width=max(1, int(r / 4)))
        img = np.asarray(canvas, dtype=np.float32) / 255
    return img


def _rasterize(ops: Sequence[tuple[int, np.ndarray]], to_pixels: np.ndarray, view: View) -> np.ndarray:
    """Anti-aliased ``[H, W]`` coverage in [0, 1] of the object's polygons, drawn at 2x and averaged."""
    ss = 2
    mask = Image.new("L", (view.width * ss, view.height * ss), 0)
    draw = ImageDraw.Draw(mask)
    for fill, poly in ops:
        # -0.5: PIL puts integer coordinates at pixel centres, our pixel grid at pixel corners.
        pts = (poly @ to_pixels.T + [view.cx, view.cy]) * ss - 0.5
        draw.polygon(pts.ravel().tolist(), fill=fill)
    return np.asarray(mask.reduce(ss), dtype=np.float32) / 255


def render_view(identity: ObjectIdentity, view: View, rng: np.random.Generator
                ) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """Draw ``identity`` as seen in ``view``.

    Args:
        identity: The label's object.
        view: Pose, canvas and lighting.
        rng: This frame's generator (sensor noise).

    Returns:
        The RGB image and, for boxed views, the object's ``(x_1, x_2, y_1, y_2)`` box; else None.
    """
    c, s = np.cos(view.angle), np.sin(view.angle)
    # Object units -> pixels: anisotropic scale, then rotation.
    to_pixels = np.array([[c, -s], [s, c]]) @ np.diag([view.radius * view.aspect, view.radius / view.aspect])
    mask = _rasterize(identity.ops, to_pixels, view)[..., None]  # [H, W, 1]

    ys, xs = np.mgrid[0:view.height, 0:view.width].astype(np.float32) + 0.5
    inv = np.linalg.inv(to_pixels).astype(np.float32)
    u = inv[0, 0] * (xs - view.cx) + inv[0, 1] * (ys - view.cy)  # [H, W]
    v = inv[1, 0] * (xs - view.cx) + inv[1, 1] * (ys - view.cy)
    weight = _texture(identity, u, v)[..., None]
    obj = identity.colors[0] * (1 - weight) + identity.colors[1] * weight
    # A soft light from one side gives the flat shape some volume, and differs between views.
    obj = obj * (1.0 + 0.25 * (np.cos(view.light) * u + np.sin(view.light) * v))[..., None]
    img = _background(view) * (1 - mask) + obj * mask

    img = np.clip(img, 0.0, 1.0) ** view.gamma
    mean = img.mean()
    img = ((img - mean) * view.contrast + mean) * view.brightness * np.asarray(view.cast, np.float32)
    pil = Image.fromarray((np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    if view.blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(view.blur))
    if view.noise > 0:
        noisy = np.asarray(pil, np.float32) + rng.normal(0.0, 255 * view.noise, (view.height, view.width, 3))
        pil = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    return pil, mask_bbox(mask[..., 0]) if view.has_bbox else None


def _render_label(task: _LabelTask) -> list[dict[str, str]]:
    """Draw and write one label's images; returns their CSV rows. Runs in worker processes."""
    spec = task.spec
    identity = make_identity(spec.seed, task.label, spec.n_categories)
    is_val = "True" if task.split == "validation" else ""
    rows = []
    for index in range(spec.images_per_label):
        view = sample_view(np.random.default_rng([spec.seed, _VIEW, task.label, task.view_keys[index]]),
                           spec.image_size, spec.bbox_fraction)
        frame_rng = np.random.default_rng([spec.seed, _FRAME, task.label, index])
        if task.sequences[index]:
            view = jitter_view(view, frame_rng)
        image, bbox = render_view(identity, view, frame_rng)
        rel = image_path(spec, task.label, index)
        path = Path(task.out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # No temp file + rename per image: the marker JSON, written last, already tells a run that
        # finished from one that did not, and the next run redraws every file.
        image.save(path, format="JPEG", quality=spec.jpeg_quality)
        box = [str(x) for x in bbox] if bbox else ["", "", "", ""]
        rows.append(dict(zip(COLUMNS, [str(task.label), rel, task.split, is_val, is_val,
                                       identity.category, task.sequences[index], *box])))
    return rows


# ---------------------------------------------------------------------------------------------------
# Files.


def _spec_record(spec: DemoSpec) -> dict:
    return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(spec)}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _prune_stale_images(out: Path, keep: set[str]) -> None:
    """Delete JPEGs under ``out/images`` that the new CSV does not list (left by a larger spec)."""
    images = out / "images"
    if not images.is_dir():
        return
    for dirpath, _, filenames in os.walk(images, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".jpg") and path.relative_to(out).as_posix() not in keep:
                path.unlink()
        if not os.listdir(dirpath):
            os.rmdir(dirpath)


def generate_demo(out_dir: str | os.PathLike, spec: DemoSpec = DemoSpec(), *, n_procs: int = 1) -> Path:
    """Draw the dataset into ``out_dir`` (overwriting any previous one) and return the CSV's path.

    Args:
        out_dir: Dataset folder; created if missing.
        spec: What to draw.
        n_procs: Worker processes; the bytes written do not depend on it.

    Returns:
        ``out_dir / "df.csv"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A run cut short must not leave an old marker beside half-new files.
    (out / SPEC_NAME).unlink(missing_ok=True)
    tasks = plan_labels(spec, out)
    if n_procs > 1:
        # spawn, not fork: callers may hold threads (Ray, torch), and a forked lock can deadlock.
        # An executor, not a Pool: a worker that cannot start raises BrokenProcessPool instead of hanging.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(n_procs, len(tasks)), mp_context=context) as pool:
            chunks = list(pool.map(_render_label, tasks, chunksize=max(1, len(tasks) // (8 * n_procs))))
    else:
        chunks = [_render_label(task) for task in tasks]
    rows = [row for chunk in chunks for row in chunk]
    _prune_stale_images(out, {row["path"] for row in rows})

    csv_path = out / CSV_NAME
    tmp = csv_path.with_name(CSV_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    _write_atomic(out / SPEC_NAME, json.dumps(_spec_record(spec), indent=2, sort_keys=True) + "\n")
    return csv_path


def is_complete(out_dir: str | os.PathLike, spec: DemoSpec) -> bool:
    """Whether ``out_dir`` holds a finished dataset drawn for exactly ``spec`` by this generator."""
    out = Path(out_dir)
    try:
        record = json.loads((out / SPEC_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == _spec_record(spec) and (out / CSV_NAME).is_file()


def ensure_demo(out_dir: str | os.PathLike, spec: DemoSpec = DemoSpec(), *, n_procs: int = 1) -> Path:
    """Like :func:`generate_demo`, but leave a complete dataset for the same spec untouched.

    Args:
        out_dir: Dataset folder.
        spec: What it must hold; any difference (or an unfinished run) redraws it.
        n_procs: Worker processes, if it must be drawn.

    Returns:
        ``out_dir / "df.csv"``.
    """
    if is_complete(out_dir, spec):
        return Path(out_dir) / CSV_NAME
    return generate_demo(out_dir, spec, n_procs=n_procs)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: draw (or find) a demo dataset and print its CSV's path."""
    parser = argparse.ArgumentParser(prog="python -m raymetric.data.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset folder")
    parser.add_argument("--size", choices=list(SIZES), default="default", help="preset (default: default)")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    parser.add_argument("--n-procs", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--force", action="store_true", help="redraw even if the dataset is complete")
    args = parser.parse_args(argv)
    spec = SIZES[args.size] if args.seed is None else dataclasses.replace(SIZES[args.size], seed=args.seed)
    make = generate_demo if args.force else ensure_demo
    csv_path = make(args.out, spec, n_procs=args.n_procs)
    print(csv_path)
    return csv_path


if __name__ == "__main__":
    main()

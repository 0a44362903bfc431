"""A line plot of the validation metric per epoch of every trial, drawn with Pillow (no matplotlib)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

# Tableau's 10 colours: distinct, readable on white.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def nice_ticks(low: float, high: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[low, high]``.

    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    >>> nice_ticks(3.0, 3.0)
    [3.0]
    """
    if high <= low:
        return [low]
    raw = (high - low) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def plot_curves(
    curves: dict[str, list[tuple[float, float]]],
    path: str,
    *,
    title: str,
    xlabel: str = "epoch",
    ylabel: str = "",
    size: tuple[int, int] = (960, 560),
) -> None:
    """Write a PNG with one line (and markers) per curve and a legend.

    Args:
        curves: label -> ``(x, y)`` points; NaN values are skipped, empty curves only get a legend entry.
        path: where the PNG goes.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    legend = max((draw.textlength(label, font=font) for label in curves), default=0)
    left, top, bottom = 70, 40, 50
    right = int(min(width / 2, legend + 60))  # the legend sits on the right
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # the plot area

    points = [(x, y) for pts in curves.values() for x, y in pts if not math.isnan(y)]
    xs = [x for x, _ in points] or [0.0, 1.0]
    ys = [y for _, y in points] or [0.0, 1.0]
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_low, y_high = min(ys), max(ys)
    if 0.0 <= y_low and y_high <= 1.0:  # retrieval metrics: show them on their whole range
        y_low, y_high = 0.0, 1.0
    elif y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            x0 + (x - x_low) / (x_high - x_low) * (x1 - x0),
            y1 - (y - y_low) / (y_high - y_low) * (y1 - y0),
        )

    draw.text((width / 2, 12), title, fill="black", font=font, anchor="mt")
    for tick in nice_ticks(y_low, y_high):
        _, py = to_px(x_low, tick)
        draw.line([(x0, py), (x1, py)], fill=(230, 230, 230))
        draw.text((x0 - 6, py), f"{tick:g}", fill="black", font=font, anchor="rm")
    for tick in nice_ticks(x_low, x_high, n=min(10, max(1, int(x_high - x_low)))):
        px, _ = to_px(tick, y_low)
        draw.line([(px, y1), (px, y1 + 4)], fill="black")
        draw.text((px, y1 + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, height - 14), xlabel, fill="black", font=font, anchor="mm")
    draw.text((10, y0 - 22), ylabel, fill="black", font=font, anchor="lt")

    for i, (label, pts) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in pts if not math.isnan(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = y0 + 8 + 18 * i
        draw.line([(x1 + 15, ly), (x1 + 35, ly)], fill=colour, width=3)
        draw.text((x1 + 42, ly), label, fill="black", font=font, anchor="lm")
    image.save(path)

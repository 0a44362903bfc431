"""The retrieval picture: the worst queries, each with what it retrieved and a relevant item it missed.

One row per query, worst first: the query (blue frame), its top retrieved items (green frame when
relevant, red when not) and the nearest relevant gallery item that is not among them (gray frame,
"missed"), as OML draws it. Drawn with Pillow; images come from a callback, so the picture works from
a dataset CSV (with its boxes), from an embeddings table's ``path`` column, or with placeholders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BLUE, GREEN, RED, GRAY = (40, 90, 220), (30, 170, 60), (215, 40, 40), (150, 150, 150)
FRAME = 4  # frame width, pixels
GAP = 6  # space between tiles
CAPTION = 14  # caption height under a tile
HEADER = 18  # legend above the grid


@dataclass
class PictureRow:
    """One query's row of the picture."""

    query_id: int
    title: str  # e.g. "#12 label 3  cmc@1=0"
    retrieved: Sequence[tuple[int, float, bool]]  # (gallery id, distance, relevant)
    missed: tuple[int, float] | None  # nearest relevant gallery item not shown: (id, distance)


def picture_size(n_rows: int, n_retrieved: int, tile_size: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a picture with ``n_rows`` rows.

    >>> picture_size(2, 5, 100)
    (748, 264)
    """
    columns = n_retrieved + 2  # query, retrieved items, missed item
    width = columns * tile_size + (columns + 1) * GAP
    height = HEADER + n_rows * (tile_size + CAPTION + GAP) + GAP
    return width, height


def worst_queries(values: torch.Tensor, n: int, tiebreak: torch.Tensor | None = None) -> list[int]:
    """Positions of the ``n`` lowest per-query values (NaN counts as lowest); ties by ``tiebreak``, then position.

    >>> worst_queries(torch.tensor([1.0, 0.0, float("nan"), 0.0]), 3)
    [2, 1, 3]
    >>> worst_queries(torch.tensor([0.0, 0.0, 1.0]), 2, tiebreak=torch.tensor([0.5, 0.2, 0.0]))
    [1, 0]
    """
    values = torch.nan_to_num(values.double(), nan=-1.0)
    order = torch.arange(len(values))
    if tiebreak is not None:
        order = torch.sort(torch.nan_to_num(tiebreak.double(), nan=-1.0), stable=True).indices
    order = order[torch.sort(values[order], stable=True).indices]
    return order[:n].tolist()


def badness_tiebreak(per_query: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[Q]`` sum of every per-query metric (NaN as 0): among queries equally bad by one metric, the
    lowest sum failed on more of them (e.g. ``cmc@1 = 0`` and ``cmc@5 = 0`` before ``cmc@5 = 1``).
    """
    return sum(torch.nan_to_num(v.double(), nan=0.0) for v in per_query.values())


def nearest_missed(query_emb: np.ndarray, query_id: int, shown: set[int], relevant_ids: np.ndarray,
                   relevant_emb: np.ndarray) -> tuple[int, float] | None:
    """The relevant gallery item nearest to the query among those not shown, with its distance.

    >>> nearest_missed(np.zeros(2), 0, {5}, np.array([5, 7, 9]), np.array([[1.0, 0], [3, 4], [0, 2]]))
    (9, 2.0)
    """
    keep = np.array([i not in shown and i != query_id for i in relevant_ids], bool)
    if not keep.any():
        return None
    dist = np.sqrt(((relevant_emb[keep].astype(np.float64) - query_emb.astype(np.float64)) ** 2).sum(1))
    best = int(np.lexsort((relevant_ids[keep], dist))[0])
    return int(relevant_ids[keep][best]), float(dist[best])


def frame_image(frame, row: int) -> Image.Image | None:
    """The image of a dataset frame's row (``path``, cropped to its box when the bbox columns hold one).

    None when the file is missing or broken: the picture shows a placeholder tile and still helps.
    """
    import pandas as pd

    from raymetric.data.dataset import read_image

    try:
        box = [frame.at[row, c] for c in ("x_1", "y_1", "x_2", "y_2")] if "x_1" in frame else None
        box = None if box is None or any(pd.isna(v) for v in box) else [int(v) for v in box]
        return read_image(frame.at[row, "path"], box)
    except Exception:
        return None


def _tile(image: Image.Image | None, size: int, color: tuple[int, int, int], placeholder: str) -> Image.Image:
    tile = Image.new("RGB", (size, size), color)
    inner = size - 2 * FRAME
    if image is None:
        body = Image.new("RGB", (inner, inner), (225, 225, 225))
        ImageDraw.Draw(body).text((6, inner // 2 - 6), placeholder, fill=(90, 90, 90), font=ImageFont.load_default())
    else:
        image = image.convert("RGB")
        image.thumbnail((inner, inner))
        body = Image.new("RGB", (inner, inner), (255, 255, 255))
        body.paste(image, ((inner - image.width) // 2, (inner - image.height) // 2))
    tile.paste(body, (FRAME, FRAME))
    return tile


def retrieval_picture(rows: Sequence[PictureRow], load_image: Callable[[int], Image.Image | None],
                      n_retrieved: int, tile_size: int = 128, title: str = "") -> Image.Image:
    """Draws the picture (see the module docstring); ``load_image(id)`` returns an image or None."""
    width, height = picture_size(len(rows), n_retrieved, tile_size)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    legend = "query: blue   relevant: green   not relevant: red   missed relevant: gray"
    draw.text((GAP, 3), f"{title}   {legend}" if title else legend, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = HEADER + r * (tile_size + CAPTION + GAP)
        cells = [(row.query_id, BLUE, row.title)]
        for gallery_id, dist, relevant in list(row.retrieved)[:n_retrieved]:
            cells.append((gallery_id, GREEN if relevant else RED, f"#{gallery_id} d={dist:.3f}"))
        cells += [None] * (n_retrieved + 1 - len(cells))
        if row.missed is not None:
            cells.append((row.missed[0], GRAY, f"missed #{row.missed[0]} d={row.missed[1]:.3f}"))
        for c, cell in enumerate(cells):
            if cell is None:
                continue
            item_id, color, caption = cell
            x = GAP + c * (tile_size + GAP)
            canvas.paste(_tile(load_image(item_id), tile_size, color, f"#{item_id}"), (x, y))
            draw.text((x, y + tile_size + 1), caption[: max(4, tile_size // 6)], fill=(0, 0, 0), font=font)
    return canvas

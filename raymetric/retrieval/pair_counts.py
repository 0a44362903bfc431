"""Counts of the distances of all (query, gallery item) pairs, split into relevant and not, in key windows.

``fnmr@fmr`` needs an order statistic of the distances of *every* non-relevant pair, which OML gets
from a full ranking (``queries x gallery`` values). Counts in buckets are small, add up across gallery
shards and query chunks, and are filled block by block, so no full distance matrix is ever held.
:func:`raymetric.metrics.fnmr_at_fmr` narrows a window around the order statistic pass by pass until
a bucket holds one float32 value: the result is exact, not binned.

A distance's **key** is its float32 bit pattern read as an integer, which orders non-negative floats as
their values do; ``+inf`` is :data:`KEY_INF`. A window ``(lo, shift)`` is ``n_buckets`` (a power of
two) buckets of ``2**shift`` keys from key ``lo``, and every pair is counted in slot 0 (key below
``lo``), ``1 + bucket`` (in the window) or ``n_buckets + 1`` (above it).
"""

from __future__ import annotations

import contextlib
import struct

import torch

from raymetric.retrieval.candidates import fill_skipped

KEY_INF = 0x7F800000  # the key of +inf; every finite non-negative float32 has a smaller one
# Pairs per block, by device type: small on a CPU, so that a block's passes run from the cache.
BLOCK_ELEMS = {"cpu": 2**18, "cuda": 2**26}


def distance_key(value: float) -> int:
    """The key of the float32 ``value`` (non-negative; ``-0.0`` counts as ``0.0``).

    >>> distance_key(0.0), distance_key(1.0), distance_key(float("inf")) == KEY_INF
    (0, 1065353216, True)
    """
    return max(struct.unpack("<i", struct.pack("<f", value))[0], 0)


def key_value(key: int) -> float:
    """The float32 value of a key (inverse of :func:`distance_key`).

    >>> key_value(1065353216)
    1.0
    """
    return struct.unpack("<f", struct.pack("<i", key))[0]


def first_window(n_buckets: int) -> tuple[int, int]:
    """The window ``(0, shift)`` whose ``n_buckets`` buckets of ``2**shift`` keys hold every distance.

    >>> first_window(65536)
    (0, 15)
    """
    shift = 0
    while n_buckets << shift <= KEY_INF:
        shift += 1
    return 0, shift


def check_buckets(n_buckets: int) -> None:
    if n_buckets < 2 or n_buckets & (n_buckets - 1):
        raise ValueError(f"the number of buckets must be a power of two >= 2, got {n_buckets}")


def _slots(keys: torch.Tensor, lo: int, shift: int, n_buckets: int) -> torch.Tensor:
    """Slot of each key (int32, >= 0): 0 below the window, ``1 + bucket`` in it, ``n_buckets + 1`` above."""
    if lo == 0 and lo + (n_buckets << shift) > KEY_INF:  # the window holds every key
        return (keys >> shift).add_(1)
    # Below -> -1, above -> n_buckets (no key reaches 2**31 - 1), then all shifted by one.
    slots = (keys - lo).clamp_(min=-1, max=min(n_buckets << shift, 2**31 - 1)) >> shift
    return slots.add_(1)


def _check_no_overflow(query_sq: torch.Tensor, gallery_sq: torch.Tensor) -> None:
    """Refuses embeddings so large that float32 distances could overflow (to inf or NaN), from their
    float32 squared norms (an overflowed one is inf, and refused too)."""
    largest = [float(sq.max()) ** 0.5 for sq in (query_sq, gallery_sq)]
    if not (largest[0] + largest[1]) ** 2 <= 0.25 * torch.finfo(torch.float32).max:
        raise ValueError(f"fnmr@fmr: embedding norms up to {max(largest):.3g} overflow float32 distances; "
                         "scale the embeddings down")


@contextlib.contextmanager
def _full_float32():
    """Full float32 matmuls (no TF32 or bfloat16 inputs on any device), as OML's distances are."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def pair_distance_counts(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    *,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    windows: list[tuple[int, int]],
    n_buckets: int,
    self_row: torch.Tensor | None = None,
    query_sequences: torch.Tensor | None = None,
    gallery_sequences: torch.Tensor | None = None,
    max_block_elems: int | None = None,
) -> torch.Tensor:
    """Counts of pair distances in the buckets of each key window (see the module docstring).

    Skipped pairs (the query's own item, the same sequence) are not counted. Distances are float32,
    ``sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0))``, as ``torch.cdist`` (and so OML) computes them; every call
    over the same data computes the same values, which the passes of
    :func:`raymetric.metrics.fnmr_at_fmr` rely on.

    Args:
        query_emb: ``[Q, D]``.
        gallery_emb: ``[G, D]``.
        query_labels: ``[Q]`` int64.
        gallery_labels: ``[G]`` int64.
        windows: Key windows ``(lo, shift)``: ``n_buckets`` buckets of ``2**shift`` keys from ``lo``.
        n_buckets: Buckets per window, a power of two.
        self_row: ``[Q]`` gallery row of each query's own item, ``-1`` if none
            (:func:`raymetric.retrieval.own_rows`).
        query_sequences: ``[Q]`` sequence codes (``-1`` = none).
        gallery_sequences: ``[G]`` sequence codes.
        max_block_elems: Most pairs held at once, at most (and by default) :data:`BLOCK_ELEMS` of the device type.

    Returns:
        ``[n_windows, 2, n_buckets + 2]`` int64 (CPU): row 0 non-relevant pairs, row 1 relevant pairs;
        slot 0 below the window, slot ``n_buckets + 1`` above it.

    Example:
        >>> q, g = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0], [3.0, 4.0], [0.0, 0.0]])
        >>> one = distance_key(1.0)  # two buckets of 2**22 keys from 1.0: [1, 2) and [2, 4); 5 lies above
        >>> pair_distance_counts(q, g, query_labels=torch.tensor([1]), gallery_labels=torch.tensor([1, 2, 1]),
        ...                      windows=[(one, 22)], n_buckets=2, self_row=torch.tensor([2]))
        tensor([[[0, 0, 0, 1],
                 [0, 1, 0, 0]]])
    """
    check_buckets(n_buckets)
    for lo, shift in windows:
        if lo < 0 or shift < 0 or lo > KEY_INF:
            raise ValueError(f"a key window needs 0 <= lo <= {KEY_INF} and shift >= 0, got {(lo, shift)}")
    device = query_emb.device
    n_query, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
    slots = n_buckets + 2
    counts = torch.zeros(len(windows), 3 * slots, dtype=torch.int64, device=device)  # rows: not relevant, relevant, skipped
    if n_query and n_gallery and windows:
        limit = BLOCK_ELEMS.get(device.type, 2**18)
        max_block_elems = min(max_block_elems, limit) if max_block_elems else limit
        gallery = gallery_emb.float()
        gallery_sq = gallery.square().sum(1)  # [G]
        cols_per_block = max(1, min(n_gallery, max_block_elems // 256))  # >= 256 rows: an efficient matmul
        rows_per_block = max(1, max_block_elems // cols_per_block)
        query = query_emb.float()
        query_sq = query.square().sum(1)  # [Q]
        _check_no_overflow(query_sq, gallery_sq)
        blocks = [(rs, min(rs + rows_per_block, n_query), cs, min(cs + cols_per_block, n_gallery))
                  for rs in range(0, n_query, rows_per_block) for cs in range(0, n_gallery, cols_per_block)]
        with _full_float32():
            for rs, re, cs, ce in blocks:
                d = torch.addmm(gallery_sq[None, cs:ce], query[rs:re], gallery[cs:ce].T, alpha=-2.0)  # [r, c]
                keys = d.add_(query_sq[rs:re, None]).clamp_min_(0).sqrt_().view(torch.int32).clamp_min_(0)  # -0.0: 0
                # Each pair's row of counts, as an offset: 0 not relevant, slots relevant, 2 slots skipped.
                row = (query_labels[rs:re, None] == gallery_labels[None, cs:ce]).to(torch.int32).mul_(slots)
                fill_skipped(row, 2 * slots, cs, self_row=None if self_row is None else self_row[rs:re],
                             query_sequences=None if query_sequences is None else query_sequences[rs:re],
                             gallery_sequences=None if gallery_sequences is None else gallery_sequences[cs:ce])
                for i, (lo, shift) in enumerate(windows):
                    counts[i] += torch.bincount(_slots(keys, lo, shift, n_buckets).add_(row).view(-1),
                                                minlength=3 * slots)
    return counts.view(len(windows), 3, slots)[:, :2].cpu()


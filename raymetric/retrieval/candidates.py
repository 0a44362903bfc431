"""Candidate lists from fast low-precision scores, with a rigorous bound on every score's error.

Ranking by distance is ranking by the score ``s(q, g) = q.g - |g|^2 / 2`` (largest first), since
``d^2 = |q|^2 - 2 s`` and ``|q|^2`` is fixed per query. Scores come from one matmul per block in the
score dtype (bfloat16 where the hardware multiplies it fast, else float32). A block's top ``width``
scores are found without a full ``torch.topk`` over the block: the maximum of each group of columns
first (16 on a CPU, 32 on a GPU; one cheap pass), then the ``width`` best groups, then the best
``width`` of their members. Every one of the block's top ``width`` items lies in one of those groups,
so this is exact for the low-precision scores.

Each query also gets ``outside``: no unmasked gallery item left off its list has a low-precision score
above it (``-inf`` when the list holds every unmasked item). With the error bound of
:func:`score_error_bound`, ``raymetric.retrieval.shard`` turns this into a proof that the exact top-k
lies inside the list.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

# Unit roundoff (half an ulp of 1.0) of the dtypes scores are computed in.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Columns per group of the group-maximum pre-selection, and query rows per score block, by device
# type: a GPU wants larger blocks and cheaper selections (measured in bench/validation.py).
GROUP = {"cpu": 16, "cuda": 32}
ROWS_PER_BLOCK = {"cpu": 1024, "cuda": 4096}
# Absolute slack for flushed denormals (bf16 dot-product instructions flush them to zero).
_TINY = 1e-30


def resolve_score_dtype(name: str, device: torch.device) -> torch.dtype:
    """The score dtype for a config value: ``float32``, ``bfloat16`` or ``auto``.

    ``auto`` picks bfloat16 on GPUs that support it and on CPUs with bfloat16 dot-product instructions
    (AVX512-BF16 or AMX; there a bf16 matmul is about twice as fast), float32 elsewhere.

    >>> resolve_score_dtype("float32", torch.device("cpu"))
    torch.float32
    """
    if name in SCORE_DTYPES:
        return SCORE_DTYPES[name]
    if name != "auto":
        raise ValueError(f"score dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def scoring_dtype(backend: str, score_dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype candidates are scored in: float32 with faiss, else :func:`resolve_score_dtype` (a
    ``torch.dtype`` is taken as it is).

    >>> scoring_dtype("faiss", "bfloat16", torch.device("cpu")), scoring_dtype("torch", torch.bfloat16, None)
    (torch.float32, torch.bfloat16)
    """
    if backend == "faiss":
        return torch.float32
    return score_dtype if isinstance(score_dtype, torch.dtype) else resolve_score_dtype(score_dtype, device)


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: play safe
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class ScoringGallery:
    """A gallery shard prepared for low-precision scoring.

    Attributes:
        matrix: ``[G, K]`` in the score dtype: the embeddings, plus the column ``-|g|^2 / 2`` when
            ``with_bias``.
        with_bias: Whether the bias is in the matrix. Left out (K = D, the faster matmul) when the
            bias hardly varies, as for L2-normalised embeddings; then the constant ``offset`` stands in
            for it and ``spread`` = ``max |bias - offset|`` joins the error bound.
        offset: Added to every low-precision score to get the score ``s``.
        spread: See ``with_bias``.
        max_norm: Largest ``|g|``.
        max_bias: Largest ``|g|^2 / 2`` in the matrix (0 without bias).
        coefficient: Relative error factor of one low-precision dot product (see :func:`score_error_bound`).
    """

    matrix: torch.Tensor
    with_bias: bool
    offset: float
    spread: float
    max_norm: float
    max_bias: float
    coefficient: float

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype


def _dot_error_coefficient(dtype: torch.dtype, source_dtype: torch.dtype, length: int, device: torch.device) -> float:
    """Relative error of a dot product of ``length`` terms: ``|fl(x.y) - x.y| <= c * sum |x_i y_i|``.

    Inputs rounded to ``dtype`` (none when they already are float32 and the matmul runs in full
    float32), accumulated in float32 in any order (cuBLAS, oneDNN and MKL all do), the result rounded
    to ``dtype``.
    """
    u_in = 0.0 if (dtype == torch.float32 and source_dtype in UNIT_ROUNDOFF) else UNIT_ROUNDOFF.get(dtype, 2.0**-8)
    if dtype == torch.float32:
        # Reduced-precision float32 matmuls round their inputs to TF32 (CUDA) or bfloat16 (CPU).
        if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            u_in = max(u_in, 2.0**-11)
        elif torch.get_float32_matmul_precision() != "highest":
            u_in = max(u_in, 2.0**-8)
    u_acc, u_out = 2.0**-24, UNIT_ROUNDOFF[dtype]
    gamma = length * u_acc / (1 - length * u_acc)
    products = 2 * u_in + u_in**2  # x_i y_i against its rounded-input value
    accumulated = products + gamma * (1 + u_in) ** 2
    return 1.01 * (accumulated + u_out * (1 + accumulated))  # 1% for the bound's own rounding


def squared_norms(emb: torch.Tensor, rows_per_block: int = 65536) -> torch.Tensor:
    """``[N]`` float64 ``|x|^2``, in blocks: no float64 copy of a large gallery.

    >>> squared_norms(torch.tensor([[3.0, 4.0], [1.0, 1.0]]))
    tensor([25.,  2.], dtype=torch.float64)
    """
    out = torch.empty(emb.shape[0], dtype=torch.float64, device=emb.device)
    for start in range(0, emb.shape[0], rows_per_block):
        out[start:start + rows_per_block] = emb[start:start + rows_per_block].to(torch.float64).square().sum(1)
    return out


def scoring_gallery(gallery: torch.Tensor, dtype: torch.dtype) -> ScoringGallery:
    """Prepares a gallery shard ``[G, D]`` for :func:`torch_candidates` (O(G * D) work)."""
    sq = squared_norms(gallery)  # [G]
    max_norm = float(sq.max().sqrt()) if len(sq) else 0.0
    bias = -0.5 * sq  # [G]
    lo, hi = (float(bias.min()), float(bias.max())) if len(sq) else (0.0, 0.0)
    offset, spread = (hi + lo) / 2, (hi - lo) / 2
    dim = gallery.shape[1]
    coefficient = _dot_error_coefficient(dtype, gallery.dtype, dim, gallery.device)
    # Leave the bias out when its spread adds at most 5% to the error of the largest dot product.
    with_bias = spread > 0.05 * coefficient * max_norm**2
    if with_bias:
        coefficient = _dot_error_coefficient(dtype, gallery.dtype, dim + 1, gallery.device)
        matrix = torch.cat([gallery.to(dtype), bias.to(dtype)[:, None]], 1)  # [G, D + 1]
        return ScoringGallery(matrix, True, 0.0, 0.0, max_norm, -lo, coefficient)
    return ScoringGallery(gallery.to(dtype).contiguous(), False, offset, spread, max_norm, 0.0, coefficient)


def score_error_bound(query_norm: torch.Tensor, gallery: ScoringGallery) -> torch.Tensor:
    """``[Q]`` float64 bound on ``|s - (s_low + offset)|`` for every gallery item of the shard.

    ``sum |q_i g_i| <= |q| |g|`` (Cauchy-Schwarz) and ``|bias| <= max_bias`` bound the terms of each
    dot product; the coefficient covers input rounding, float32 accumulation and output rounding.
    """
    terms = query_norm.to(torch.float64) * gallery.max_norm + gallery.max_bias
    return gallery.coefficient * terms + gallery.spread + _TINY


@dataclass
class Candidates:
    """Candidate gallery rows per query, from low-precision scores.

    Attributes:
        rows: ``[Q, W]`` int64 shard rows; ``-1`` = empty slot.
        outside: ``[Q]`` float64: no unmasked shard item missing from ``rows`` has a low-precision
            score above this; ``-inf`` when ``rows`` holds every unmasked item.
    """

    rows: torch.Tensor
    outside: torch.Tensor


@contextlib.contextmanager
def _full_precision_accumulation(device: torch.device):
    """cuBLAS may otherwise reduce bf16 products in bf16, which the error bound does not cover."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def fill_skipped(block: torch.Tensor, value, first_col: int, *, self_row: torch.Tensor | None = None,
                 query_sequences: torch.Tensor | None = None, gallery_sequences: torch.Tensor | None = None) -> None:
    """Writes ``value`` into the skipped pairs of a ``[r, c]`` block of gallery columns from ``first_col`` on.

    Skipped: each query's own item (``self_row``, ``[r]`` gallery rows, ``-1`` = none) and the items of
    its sequence (``query_sequences`` ``[r]`` against the block's ``gallery_sequences`` ``[c]``; ``-1`` =
    none). In place and without a host sync, so a GPU keeps its queue of work.
    """
    if self_row is not None:
        local = self_row - first_col  # [r]
        own = (local >= 0) & (local < block.shape[1])
        rows, col = torch.arange(block.shape[0], device=block.device), local.clamp(0, block.shape[1] - 1)
        # Where not own, the old value is written back. (index_put_, not scatter_: on CPU a bfloat16
        # scatter_ takes ~1000 times longer.)
        block.index_put_((rows, col), torch.where(own, value, block[rows, col]))
    if query_sequences is not None:
        q_seq = query_sequences[:, None]  # [r, 1]
        block.masked_fill_((q_seq == gallery_sequences[None, :]) & (q_seq != -1), value)


def _block_top(scores: torch.Tensor, width: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``width`` low-precision scores of each row of a ``[r, n]`` block and their columns.

    Columns ``j, j + n/group, j + 2n/group, ...`` form group ``j``; the best ``width`` groups by their
    maximum hold every one of the row's best ``width`` items, so only ``width * group`` columns are
    ranked instead of ``n``.
    """
    n_rows, n = scores.shape
    if group > 1 and n % group == 0 and n // group > width:
        span = n // group
        group_max = scores.view(n_rows, group, span).amax(1)  # [r, n / group]
        top_groups = group_max.topk(width, dim=1, sorted=False).indices  # [r, W]
        offsets = torch.arange(0, n, span, device=scores.device)  # [group]
        cols = (top_groups[:, :, None] + offsets).view(n_rows, -1)  # [r, W * group]
        top = scores.gather(1, cols).topk(width, dim=1, sorted=False)
        return top.values.float(), cols.gather(1, top.indices)
    top = scores.topk(min(width, n), dim=1, sorted=False)  # in the score dtype: no float32 copy of the block
    return top.values.float(), top.indices


def torch_candidates(
    query: torch.Tensor,
    gallery: ScoringGallery,
    width: int,
    *,
    self_row: torch.Tensor | None = None,
    query_sequences: torch.Tensor | None = None,
    gallery_sequences: torch.Tensor | None = None,
    max_block_elems: int = 2**24,
    group: int | None = None,
) -> Candidates:
    """The ``width`` best gallery rows of each query by low-precision score (torch, CPU or GPU).

    Args:
        query: ``[Q, D]`` embeddings.
        gallery: The prepared shard.
        width: List length per query.
        self_row: ``[Q]`` shard row of each query's own item (skipped), ``-1`` if absent.
        query_sequences: ``[Q]`` sequence codes, ``-1`` = none; gallery items with the same code are
            skipped.
        gallery_sequences: ``[G]`` sequence codes.
        max_block_elems: Most scores held at once (one ``[rows, cols]`` block).
        group: Columns per group of the pre-selection; None: by device type (:data:`GROUP`).

    Returns:
        :class:`Candidates`.
    """
    device = query.device
    n_query, n_gallery = query.shape[0], gallery.matrix.shape[0]
    best_scores = torch.full((n_query, width), float("-inf"), device=device)  # [Q, W]
    best_rows = torch.full((n_query, width), -1, dtype=torch.int64, device=device)  # [Q, W]
    if n_query == 0 or n_gallery == 0:
        return Candidates(best_rows, torch.full((n_query,), float("-inf"), dtype=torch.float64, device=device))
    group = group or GROUP.get(device.type, 16)
    rows_per_block = min(n_query, ROWS_PER_BLOCK.get(device.type, 1024))
    cols_per_block = max(1, min(n_gallery, max_block_elems // rows_per_block))
    if cols_per_block > group * (width + 1):
        cols_per_block -= cols_per_block % group  # whole groups, so the pre-selection applies
    rows_per_block = max(1, min(n_query, max_block_elems // cols_per_block))
    matrix = gallery.matrix
    with torch.no_grad(), _full_precision_accumulation(device):
        for rs in range(0, n_query, rows_per_block):
            re = min(rs + rows_per_block, n_query)
            q = query[rs:re].to(gallery.dtype)  # [r, D]
            if gallery.with_bias:
                q = torch.cat([q, torch.ones_like(q[:, :1])], 1)  # [r, D + 1]
            top_scores, top_rows = best_scores[rs:re], best_rows[rs:re]
            for cs in range(0, n_gallery, cols_per_block):
                ce = min(cs + cols_per_block, n_gallery)
                scores = q @ matrix[cs:ce].T  # [r, c] low-precision scores
                fill_skipped(scores, float("-inf"), cs,
                             self_row=None if self_row is None else self_row[rs:re],
                             query_sequences=None if query_sequences is None else query_sequences[rs:re],
                             gallery_sequences=None if gallery_sequences is None else gallery_sequences[cs:ce])
                block_scores, block_cols = _block_top(scores, width, group)  # [r, <=W]
                del scores
                merged_scores = torch.cat([top_scores, block_scores], 1)
                merged_rows = torch.cat([top_rows, block_cols + cs], 1)
                top = merged_scores.topk(width, dim=1, sorted=False)
                top_scores, top_rows = top.values, merged_rows.gather(1, top.indices)
            best_scores[rs:re], best_rows[rs:re] = top_scores, top_rows
    best_rows = torch.where(torch.isneginf(best_scores), -1, best_rows)
    # The W-th best score bounds everything left out; -inf there means nothing unmasked was left out.
    outside = best_scores.min(1).values.to(torch.float64)  # [Q]
    if width >= n_gallery:  # every item is on every list
        outside.fill_(float("-inf"))
    return Candidates(best_rows, outside)


def faiss_candidates(
    query: torch.Tensor,
    gallery: ScoringGallery,
    width: int,
    *,
    self_row: torch.Tensor | None = None,
    query_sequences: torch.Tensor | None = None,
    gallery_sequences: torch.Tensor | None = None,
    index=None,
) -> Candidates:
    """Like :func:`torch_candidates`, with a faiss flat inner-product index (float32, CPU or GPU).

    faiss cannot skip items per query, so it is asked for more: one more for the query's own row and,
    with sequences, the largest number of shard items sharing a query's sequence; skipped items are
    then dropped from the lists.

    Args:
        index: A prebuilt ``faiss.IndexFlatIP`` over ``gallery.matrix`` (see :func:`faiss_index`).
    """
    import numpy as np

    device = query.device
    n_query, n_gallery = query.shape[0], gallery.matrix.shape[0]
    if gallery.dtype != torch.float32:
        raise ValueError("the faiss backend scores in float32; set retrieval.score_dtype=float32 (or auto)")
    extra = int(self_row is not None)
    if query_sequences is not None and n_gallery:
        seq_codes, counts = torch.unique(gallery_sequences[gallery_sequences != -1], return_counts=True)
        if len(seq_codes):
            pos = torch.searchsorted(seq_codes, query_sequences).clamp_max(len(seq_codes) - 1)
            same = torch.where((seq_codes[pos] == query_sequences) & (query_sequences != -1), counts[pos], 0)
            extra += int(same.max()) if len(same) else 0
    n_search = min(width + extra, n_gallery)
    if n_query == 0 or n_search == 0:
        return Candidates(torch.full((n_query, width), -1, dtype=torch.int64, device=device),
                          torch.full((n_query,), float("-inf"), dtype=torch.float64, device=device))
    index = index if index is not None else faiss_index(gallery)
    q = query.to(torch.float32)
    if gallery.with_bias:
        q = torch.cat([q, torch.ones_like(q[:, :1])], 1)
    scores, rows = index.search(np.ascontiguousarray(q.cpu().numpy()), n_search)
    scores = torch.from_numpy(scores).to(device).to(torch.float64)  # [Q, n_search]
    rows = torch.from_numpy(rows).to(device)  # [Q, n_search], -1 past the end
    outside = scores[:, -1].clone() if n_search < n_gallery else torch.full_like(scores[:, 0], float("-inf"))
    skip = rows < 0
    if self_row is not None:
        skip |= rows == self_row[:, None]
    if query_sequences is not None:
        seq = gallery_sequences[rows.clamp_min(0)]
        skip |= (seq == query_sequences[:, None]) & (query_sequences[:, None] != -1)
    rows = torch.where(skip, -1, rows)
    return Candidates(rows, outside)


def faiss_index(gallery: ScoringGallery):
    """A faiss flat inner-product index over the prepared shard (on the GPU when faiss has one)."""
    import faiss
    import numpy as np

    matrix = np.ascontiguousarray(gallery.matrix.float().cpu().numpy())
    index = faiss.IndexFlatIP(matrix.shape[1])
    if gallery.matrix.device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise RuntimeError("this faiss build has no GPU support; use retrieval.backend=torch on GPUs")
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gallery.matrix.device.index or 0, index)
    index.add(matrix)
    return index

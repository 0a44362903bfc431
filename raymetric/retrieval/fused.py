"""GPU candidate lists without a scores matrix in memory: a Triton matmul that keeps only what can matter.

An experiment, off by default (:data:`ENABLED`; measured slower than the plain path, see there). The
plain path (:func:`raymetric.retrieval.candidates.torch_candidates`) writes each ``[rows, gallery]``
score block to GPU memory and reads it back; the idea here is not to. A threshold per query
comes first, from a 1-in-16 sample of the gallery: the ``width``-th best sample score, which at least
``width`` items of the whole gallery reach. One Triton kernel then computes every score tile in
registers (bfloat16 inputs, float32 accumulation) and writes only the items at or above the query's
threshold, about ``16 x width`` per query, into that query's slots (an atomic counter per query). A
``topk`` over the slots keeps the best ``width``.

What it proves is what the plain path proves (:mod:`raymetric.retrieval.shard`): every item left out
has a score below the threshold or below the ``width``-th kept one, so ``outside`` is the larger of
the two, and the same error bound covers these float32-accumulated scores (they are not even rounded
back to bfloat16). A query whose threshold lets more items through than it has slots is handed to
the plain path.
"""

from __future__ import annotations

import functools
import os

import torch

from raymetric.retrieval.candidates import Candidates, ScoringGallery, torch_candidates

SAMPLE_EVERY = 16  # the threshold's gallery sample: every 16th item
SLOTS_PER_QUERY = 4096  # kept items per query the buffer holds (about 16 x width are expected)


# Off by default: on an H200 (bench/validation.py, 1M x 1M x 256, top-16) this kernel took 0.88-0.96 s per
# 128k queries against 0.36 s for the plain path, whose cuBLAS matmul and memory passes win for now; the
# kernel's matmul needs tuning (block pointers/TMA) before it pays. Set True to use it.
ENABLED = False


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel runs here: Triton on a CUDA device with bfloat16 scores (a float32
    ``tl.dot`` would round its inputs to TF32, which the error bound does not cover), or Triton's CPU
    interpreter with float32 scores (tests)."""
    if not ENABLED:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter reads bfloat16 memory wrongly
        return dtype == torch.float32 and _has_triton()
    return device.type == "cuda" and dtype == torch.bfloat16 and _has_triton()


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def emit_above_threshold(
        Q, G, TAU, SELF, QSEQ, GSEQ, SLOT_COL, SLOT_SCORE, ROW_COUNT,
        n_rows, n_cols, dim, slots,
        HAS_SELF: tl.constexpr, HAS_SEQ: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, dim, BK):
            ks = k0 + tl.arange(0, BK)
            q = tl.load(Q + rows[:, None] * dim + ks[None, :], mask=(rows[:, None] < n_rows) & (ks[None, :] < dim), other=0.0)
            g = tl.load(G + cols[:, None] * dim + ks[None, :], mask=(cols[:, None] < n_cols) & (ks[None, :] < dim), other=0.0)
            acc = tl.dot(q, tl.trans(g), acc)
        tau = tl.load(TAU + rows, mask=rows < n_rows, other=float("inf"))
        keep = (acc >= tau[:, None]) & (cols[None, :] < n_cols)
        if HAS_SELF:
            own = tl.load(SELF + rows, mask=rows < n_rows, other=-1)
            keep = keep & (cols[None, :] != own[:, None])
        if HAS_SEQ:
            q_seq = tl.load(QSEQ + rows, mask=rows < n_rows, other=-1)
            g_seq = tl.load(GSEQ + cols, mask=cols < n_cols, other=-2)
            keep = keep & ((q_seq[:, None] != g_seq[None, :]) | (q_seq[:, None] == -1))
        # A slot per kept item from its query's counter: ~tens of atomics per tile, spread over queries.
        row2d = rows[:, None] + tl.zeros([BM, BN], dtype=tl.int32)
        pos = tl.atomic_add(ROW_COUNT + row2d, 1, mask=keep)
        ok = keep & (pos < slots)
        dest = row2d.to(tl.int64) * slots + pos
        tl.store(SLOT_COL + dest, cols[None, :] + tl.zeros([BM, BN], dtype=tl.int32), mask=ok)
        tl.store(SLOT_SCORE + dest, acc, mask=ok)

    return emit_above_threshold


# Tile shape and launch settings of the kernel on a GPU (bench/validation.py tries others).
CUDA_TILES = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def _tiles(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(CUDA_TILES)
    return dict(BM=16, BN=16, BK=16)  # the CPU interpreter (tests)


def _sample_threshold(query: torch.Tensor, gallery: ScoringGallery, width: int, self_row, query_sequences,
                      gallery_sequences, max_block_elems: int) -> torch.Tensor:
    """``[Q]``: the ``width``-th best low-precision score over every 16th gallery item (``-inf``: fewer items)."""
    sample = ScoringGallery(gallery.matrix[::SAMPLE_EVERY], gallery.with_bias, gallery.offset, gallery.spread,
                            gallery.max_norm, gallery.max_bias, gallery.coefficient)
    own = None
    if self_row is not None:
        own = torch.where(self_row % SAMPLE_EVERY == 0, self_row // SAMPLE_EVERY, -1)
    cand = torch_candidates(query, sample, width, self_row=own, query_sequences=query_sequences,
                            gallery_sequences=None if gallery_sequences is None else gallery_sequences[::SAMPLE_EVERY],
                            max_block_elems=max_block_elems)
    return cand.outside.to(torch.float32)


def fused_candidates(
    query: torch.Tensor,
    gallery: ScoringGallery,
    width: int,
    *,
    self_row: torch.Tensor | None = None,
    query_sequences: torch.Tensor | None = None,
    gallery_sequences: torch.Tensor | None = None,
    max_block_elems: int = 2**30,
    rows_per_launch: int = 65536,
) -> Candidates:
    """Like :func:`raymetric.retrieval.candidates.torch_candidates`, with the fused Triton kernel."""
    device = query.device
    n_query, n_gallery = query.shape[0], gallery.matrix.shape[0]
    if n_gallery < SAMPLE_EVERY * (width + 1) or n_query == 0:
        return torch_candidates(query, gallery, width, self_row=self_row, query_sequences=query_sequences,
                                gallery_sequences=gallery_sequences, max_block_elems=max_block_elems)
    kernel, tiles = _kernel(), _tiles(device)
    matrix = gallery.matrix.contiguous()
    dim = matrix.shape[1]
    rows_out = torch.full((n_query, width), -1, dtype=torch.int64, device=device)
    outside = torch.empty(n_query, dtype=torch.float64, device=device)
    dummy = torch.zeros(1, dtype=torch.int64, device=device)
    for start in range(0, n_query, rows_per_launch):
        end = min(start + rows_per_launch, n_query)
        n = end - start
        own = None if self_row is None else self_row[start:end]
        q_seq = None if query_sequences is None else query_sequences[start:end]
        q = query[start:end].to(gallery.dtype)
        if gallery.with_bias:
            q = torch.cat([q, torch.ones_like(q[:, :1])], 1)
        tau = _sample_threshold(query[start:end], gallery, width, own, q_seq, gallery_sequences, max_block_elems)
        slots = max(SLOTS_PER_QUERY, width)
        slot_col = torch.empty((n, slots), dtype=torch.int32, device=device)
        slot_score = torch.full((n, slots), float("-inf"), device=device)
        row_count = torch.zeros(n, dtype=torch.int32, device=device)
        grid = (-(-n // tiles["BM"]), -(-n_gallery // tiles["BN"]))
        kernel[grid](
            q.contiguous(), matrix, tau.contiguous(), dummy if own is None else own.contiguous(),
            dummy if q_seq is None else q_seq.contiguous(),
            dummy if gallery_sequences is None else gallery_sequences.contiguous(),
            slot_col, slot_score, row_count, n, n_gallery, dim, slots,
            HAS_SELF=own is not None, HAS_SEQ=q_seq is not None, **tiles)
        top = slot_score.topk(width, dim=1)  # [n, W], best first
        kept = torch.where(torch.isneginf(top.values), -1, slot_col.gather(1, top.indices).long())
        rows_out[start:end] = kept
        # Left out: below the threshold, or below the width-th kept score.
        outside[start:end] = torch.maximum(tau, top.values[:, -1]).to(torch.float64)
        full = (row_count > slots).nonzero().squeeze(1)  # a loose threshold: the plain path
        if len(full):
            cand = torch_candidates(query[start:end][full], gallery, width,
                                    self_row=None if own is None else own[full],
                                    query_sequences=None if q_seq is None else q_seq[full],
                                    gallery_sequences=gallery_sequences, max_block_elems=max_block_elems)
            rows_out[start + full], outside[start + full] = cand.rows, cand.outside
    return Candidates(rows_out, outside)

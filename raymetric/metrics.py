"""Retrieval metrics from merged top-k results, with OML's definitions (REFERENCE.md §2).

For a query whose top ``k' = min(k, n_retrieved)`` items have relevance ``g_1..g_k'``:

* ``cmc@k`` = 1 if any ``g_i`` is relevant, else 0.
* ``precision@k`` = ``sum(g_i) / min(n_gt, k')`` (not divided by ``k``).
* ``map@k`` = ``(1 / n_k) * sum_i (n_i / i) * g_i``, ``n_i`` = hits in the top ``i``, ``n_k`` = hits in the
  top ``k'``; 0 when there is no hit.

OML's corner cases are kept in the per-query functions: nothing retrieved and ``n_gt == 0`` gives 1.0,
nothing retrieved and ``n_gt > 0`` gives 0.0, items retrieved but ``n_gt == 0`` gives cmc 0, map 0 and
precision NaN. :func:`retrieval_metrics` decides what to do with queries without relevant items.

Beyond the top-k: ``fnmr@fmr`` (OML's definition, exact, from counting passes over all pairs instead of
a full ranking, :func:`fnmr_at_fmr`) and ``pcf`` (principal components fraction, from embedding moments that add
up across shards, :class:`EmbeddingMoments`). :func:`validation_report` assembles every metric into the
flat dict that validation inside training and the stand-alone job both report.

All inputs are array-likes (torch tensors or NumPy arrays); per-query results are float64 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["cmc_at_k", "precision_at_k", "map_at_k", "per_query_metrics", "retrieval_metrics", "fnmr_at_fmr",
           "EmbeddingMoments", "validation_report"]


def _prepare(is_relevant, n_retrieved, n_gt, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the inputs; returns the hits of the top ``k'`` ([Q, k] bool), ``k'`` ([Q]) and ``n_gt``."""
    is_relevant = torch.as_tensor(is_relevant)
    if is_relevant.ndim != 2:
        raise ValueError(f"is_relevant must be [Q, k], got shape {tuple(is_relevant.shape)}")
    device = is_relevant.device
    n_retrieved = torch.as_tensor(n_retrieved, device=device).long()
    n_gt = torch.as_tensor(n_gt, device=device).long()
    n_query, width = is_relevant.shape
    if n_retrieved.shape != (n_query,) or n_gt.shape != (n_query,):
        raise ValueError("n_retrieved and n_gt must have shape [Q], one entry per row of is_relevant")
    if not 1 <= k <= width:
        # A larger k would silently be evaluated on fewer items than asked for.
        raise ValueError(f"k must be in [1, {width}] (the width of is_relevant), got {k}")
    k_eff = n_retrieved.clamp(0, k)  # [Q] k'
    in_top = torch.arange(k, device=device)[None, :] < k_eff[:, None]  # [Q, k]
    hits = is_relevant[:, :k].bool() & in_top  # [Q, k]
    return hits, k_eff, n_gt


def _nothing_retrieved(value: torch.Tensor, k_eff: torch.Tensor, n_gt: torch.Tensor) -> torch.Tensor:
    """OML's rule for a query with nothing retrieved: 1.0 if it has no relevant item either, else 0.0."""
    return torch.where(k_eff == 0, (n_gt == 0).double(), value)


def cmc_at_k(is_relevant, n_retrieved, n_gt, k: int) -> torch.Tensor:
    """Per-query CMC@k: 1 if a relevant item is among the top ``k'`` retrieved.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K >= k``.
        n_retrieved: ``[Q]`` number of non-padding items per query.
        n_gt: ``[Q]`` number of relevant gallery items per query.
        k: Cut-off.

    Returns:
        ``[Q]`` float64.

    Example:
        >>> cmc_at_k([[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]], [3, 3, 0, 0], [1, 1, 0, 2], k=2)
        tensor([1., 0., 1., 0.], dtype=torch.float64)
    """
    hits, k_eff, n_gt = _prepare(is_relevant, n_retrieved, n_gt, k)
    return _nothing_retrieved(hits.any(1).double(), k_eff, n_gt)


def precision_at_k(is_relevant, n_retrieved, n_gt, k: int) -> torch.Tensor:
    """Per-query precision@k = hits in the top ``k'`` / ``min(n_gt, k')``, OML's definition.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K >= k``.
        n_retrieved: ``[Q]`` number of non-padding items per query.
        n_gt: ``[Q]`` number of relevant gallery items per query.
        k: Cut-off.

    Returns:
        ``[Q]`` float64; NaN where items were retrieved but ``n_gt == 0`` (as in OML).

    Example:
        >>> precision_at_k([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], [5, 5], [3, 1], k=5)
        tensor([0.6667, 1.0000], dtype=torch.float64)
        >>> precision_at_k([[0, 0], [0, 0]], [2, 0], [0, 0], k=2)  # OML: NaN, then 1.0
        tensor([nan, 1.], dtype=torch.float64)
    """
    hits, k_eff, n_gt = _prepare(is_relevant, n_retrieved, n_gt, k)
    # 0 / 0 = NaN where n_gt == 0 and something was retrieved, as OML gives.
    value = hits.sum(1).double() / torch.minimum(n_gt, k_eff).double()
    return _nothing_retrieved(value, k_eff, n_gt)


def map_at_k(is_relevant, n_retrieved, n_gt, k: int) -> torch.Tensor:
    """Per-query mean average precision@k, normalised by the hits found (OML), 0 without a hit.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K >= k``.
        n_retrieved: ``[Q]`` number of non-padding items per query.
        n_gt: ``[Q]`` number of relevant gallery items per query.
        k: Cut-off.

    Returns:
        ``[Q]`` float64.

    Example:
        >>> map_at_k([[1, 0, 1, 0, 0]], [5], [3], k=5)  # (1/1 + 2/3) / 2
        tensor([0.8333], dtype=torch.float64)
    """
    hits, k_eff, n_gt = _prepare(is_relevant, n_retrieved, n_gt, k)
    hits = hits.double()  # [Q, k]
    n_hits = hits.cumsum(1)  # [Q, k] n_i
    positions = torch.arange(1, k + 1, device=hits.device, dtype=torch.float64)  # [k] i
    value = (n_hits / positions * hits).sum(1) / n_hits[:, -1].clamp_min(1)
    return _nothing_retrieved(value, k_eff, n_gt)


def _mean_block(values: dict[str, torch.Tensor], use: torch.Tensor, n_without_gt: int, prefix: str) -> dict:
    """Means of the per-query ``values`` over the queries in ``use``, plus the query counts."""
    out: dict[str, float] = {}
    n_used = int(use.sum())
    for name, per_query in values.items():
        # No query to average (all lack relevant items under "exclude"): 0.0 keeps the metric finite
        # and comparable for checkpointing; the counts below say why.
        out[prefix + name] = float(per_query[use].mean()) if n_used else 0.0
    out[prefix + "n_queries"] = int(use.numel())
    out[prefix + "n_queries_without_gt"] = n_without_gt
    return out


def per_query_metrics(
    is_relevant,
    n_retrieved,
    n_gt,
    *,
    cmc_top_k: Sequence[int] = (1, 5),
    precision_top_k: Sequence[int] = (5,),
    map_top_k: Sequence[int] = (5,),
) -> dict[str, torch.Tensor]:
    """Every requested metric for every query (OML's per-query values, NaN precision included).

    Returns:
        ``{"cmc@1": [Q] float64, ..., "precision@5": ..., "map@5": ...}`` in that order.

    Example:
        >>> per_query_metrics([[0, 1], [1, 0]], [2, 2], [1, 1], cmc_top_k=(1,), precision_top_k=(), map_top_k=(2,))
        {'cmc@1': tensor([0., 1.], dtype=torch.float64), 'map@2': tensor([0.5000, 1.0000], dtype=torch.float64)}
    """
    per_query: dict[str, torch.Tensor] = {}  # name -> [Q]
    for name, fn, ks in (("cmc", cmc_at_k, cmc_top_k), ("precision", precision_at_k, precision_top_k),
                         ("map", map_at_k, map_top_k)):
        for k in ks:
            per_query[f"{name}@{k}"] = fn(is_relevant, n_retrieved, n_gt, int(k))
    return per_query


def metric_args_per_query(is_relevant, n_retrieved, n_gt, metric_args) -> dict[str, torch.Tensor]:
    """:func:`per_query_metrics` with the cut-offs of ``metric_args`` (``raymetric.config.MetricArgs``)."""
    return per_query_metrics(is_relevant, n_retrieved, n_gt, cmc_top_k=metric_args.cmc_top_k,
                             precision_top_k=metric_args.precision_top_k, map_top_k=metric_args.map_top_k)


def retrieval_metrics(
    is_relevant,
    n_retrieved,
    n_gt,
    *,
    cmc_top_k: Sequence[int] = (1, 5),
    precision_top_k: Sequence[int] = (5,),
    map_top_k: Sequence[int] = (5,),
    categories: Sequence | None = None,
    queries_without_gt: str = "exclude",
    per_query: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean retrieval metrics over queries, overall and per category.

    Args:
        is_relevant: ``[Q, K]`` relevance of the ranked items, False in padding; ``K`` >= every top-k.
        n_retrieved: ``[Q]`` number of non-padding items per query (``<= K``).
        n_gt: ``[Q]`` number of relevant gallery items per query.
        cmc_top_k: Cut-offs for ``cmc@k``.
        precision_top_k: Cut-offs for ``precision@k``.
        map_top_k: Cut-offs for ``map@k``.
        categories: Optional ``[Q]`` str/int category of each query: adds a block of keys
            ``<category>/<metric>`` averaged over that category's queries.
        queries_without_gt: ``"exclude"`` (default, pytorch-metric-learning's choice): queries with
            ``n_gt == 0`` are left out of every average and only counted in ``n_queries_without_gt``.
            If no query is left in a block, its metrics are 0.0 (finite, so checkpointing on them still
            works; ``n_queries == n_queries_without_gt`` tells why). ``"oml"``: every query is
            averaged with OML's per-query values, so a query with retrieved items but ``n_gt == 0``
            makes ``precision@k`` NaN, exactly as OML reports it.
        per_query: :func:`per_query_metrics` of the same arguments, when the caller has them already.

    Returns:
        Flat dict: ``cmc@k``, ``precision@k``, ``map@k`` (float means), ``n_queries`` (all queries
        given) and ``n_queries_without_gt`` (ints), then the same keys prefixed by ``<category>/`` for
        each category in sorted order.

    Example:
        >>> m = retrieval_metrics([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], [5, 5], [3, 0],
        ...                       cmc_top_k=(1,), precision_top_k=(5,), map_top_k=(5,))
        >>> {key: round(v, 4) for key, v in m.items()}
        {'cmc@1': 1.0, 'precision@5': 0.6667, 'map@5': 0.8333, 'n_queries': 2, 'n_queries_without_gt': 1}
        >>> retrieval_metrics([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], [5, 5], [3, 0], cmc_top_k=(),
        ...                   precision_top_k=(5,), map_top_k=(), queries_without_gt="oml")
        {'precision@5': nan, 'n_queries': 2, 'n_queries_without_gt': 1}
    """
    if queries_without_gt not in ("exclude", "oml"):
        raise ValueError(f'queries_without_gt must be "exclude" or "oml", got {queries_without_gt!r}')
    if per_query is None:
        per_query = per_query_metrics(is_relevant, n_retrieved, n_gt, cmc_top_k=cmc_top_k,
                                      precision_top_k=precision_top_k, map_top_k=map_top_k)

    is_relevant = torch.as_tensor(is_relevant)
    n_query = is_relevant.shape[0]
    no_gt = torch.as_tensor(n_gt, device=is_relevant.device).reshape(-1) == 0  # [Q]
    if no_gt.numel() != n_query:
        raise ValueError("n_gt must have one entry per row of is_relevant")
    use = ~no_gt if queries_without_gt == "exclude" else torch.ones_like(no_gt)  # [Q]

    def block(members: torch.Tensor, prefix: str) -> dict:
        sub = {name: v[members] for name, v in per_query.items()}
        return _mean_block(sub, use[members], int(no_gt[members].sum()), prefix)

    out = block(torch.ones_like(no_gt), "")
    if categories is not None:
        categories = np.asarray(categories)
        if categories.shape != (n_query,):
            raise ValueError(f"categories must have shape ({n_query},), got {categories.shape}")
        for category in np.unique(categories):
            members = torch.as_tensor(categories == category, device=no_gt.device)  # [Q]
            out.update(block(members, f"{category}/"))
    return out


def fmr_key(fmr: float) -> str:
    """Flat key of ``fnmr@fmr`` at one false match rate (OML nests it as ``fnmr@fmr/<fmr>``).

    >>> fmr_key(0.1), fmr_key(1e-3)
    ('fnmr@fmr=0.1', 'fnmr@fmr=0.001')
    """
    return f"fnmr@fmr={fmr:g}"


def pcf_key(variance: float) -> str:
    """Flat key of ``pcf`` at one explained-variance share.

    >>> pcf_key(0.5)
    'pcf@0.5'
    """
    return f"pcf@{variance:g}"


def fnmr_at_fmr(
    pair_counts: Callable[[list[tuple[int, int]]], torch.Tensor],
    fmr_vals: Sequence[float],
    n_buckets: int = 65536,
) -> dict[str, float]:
    """False non-match rate at given false match rates, exactly, from counting passes over all pairs.

    OML's definition: the threshold is the ``fmr`` quantile (NumPy's linear interpolation) of the
    distances of all non-relevant (query, gallery item) pairs, and FNMR is the share of relevant pairs
    at or above it. No list of distances is kept: each pass counts every pair's distance in the buckets
    of a few key windows (:func:`raymetric.retrieval.pair_distance_counts`), and each order statistic
    the quantile needs is followed into its bucket until the bucket is one float32 value. With
    ``n_buckets = 65536`` that takes two passes, sometimes three (one more counts the relevant pairs
    above a threshold that falls between two far-apart values). With no relevant or no non-relevant
    pair the value is 0.0.

    Args:
        pair_counts: ``windows -> [n_windows, 2, n_buckets + 2]`` counts over every pair (row 0
            non-relevant, row 1 relevant; slot 0 below the window, the last slot above it), the same
            distances on every call.
        fmr_vals: False match rates in ``[0, 1]``.
        n_buckets: Buckets per window: more means fewer passes.

    Returns:
        ``{"fnmr@fmr=<fmr>": value}``.

    Example:
        >>> # OML's docstring example: positives [0,0,1,1,2,2,5,5,9,9], negatives [3,3,4,4,6,6,7,7,8,8]
        >>> from raymetric.retrieval import pair_distance_counts
        >>> points = torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0], [2.0], [2.0], [5.0], [5.0], [9.0], [9.0],
        ...                        [-3.0], [-3.0], [-4.0], [-4.0], [-6.0], [-6.0], [-7.0], [-7.0], [-8.0], [-8.0]])
        >>> labels = torch.tensor([1] * 11 + [2] * 10)
        >>> counts = lambda windows: pair_distance_counts(  # the first point against the others
        ...     points[:1], points[1:], query_labels=labels[:1], gallery_labels=labels[1:], windows=windows,
        ...     n_buckets=64)
        >>> fnmr_at_fmr(counts, [0.1, 0.5], n_buckets=64)  # OML: 0.4, 0.2
        {'fnmr@fmr=0.1': 0.4, 'fnmr@fmr=0.5': 0.2}
    """
    from raymetric.retrieval.pair_counts import check_buckets, distance_key, first_window, key_value

    for fmr in fmr_vals:
        if not 0.0 <= fmr <= 1.0:
            raise ValueError(f"fmr values must be in [0, 1], got {fmr}")
    check_buckets(n_buckets)
    if not fmr_vals:
        return {}
    bits = n_buckets.bit_length() - 1  # n_buckets = 2**bits
    records: list[tuple[tuple[int, int], torch.Tensor]] = []  # every window counted, with its [2, n + 2] counts
    totals: list[int] = []  # [non-relevant, relevant] pairs: the same in every pass
    changed = ("fnmr@fmr: the pair distances changed between counting passes (shards computed on different "
               "hardware?); their order statistics cannot be followed")

    def count(windows) -> dict[tuple[int, int], torch.Tensor]:
        windows = sorted(set(windows))
        result = torch.as_tensor(pair_counts(windows)).to("cpu", torch.int64)
        if totals and any(c.sum(1).tolist() != totals for c in result):
            raise RuntimeError(changed)
        records.extend(zip(windows, result))
        return dict(zip(windows, result))

    start = first_window(n_buckets)
    first = count([start])[start]
    totals.extend(first.sum(1).tolist())
    n_neg, n_pos = totals
    if n_neg == 0 or n_pos == 0:
        return {fmr_key(fmr): 0.0 for fmr in fmr_vals}
    # np.quantile(method="linear") reads the order statistics floor(v) and floor(v) + 1 (0-based, clipped to
    # the last), v = (n - 1) fmr, and interpolates even when the weight of the second is 0.
    plans = {}
    for fmr in fmr_vals:
        virtual = (n_neg - 1) * float(fmr)
        low = int(np.floor(virtual))
        plans[fmr] = (low, min(low + 1, n_neg - 1), virtual - low)
    windows = {rank: start for plan in plans.values() for rank in plan[:2]}
    below: dict[tuple[int, int], list[int]] = {start: [0, 0]}  # pairs below each window, known before counting it
    value_keys: dict[int, int] = {}
    counts = {start: first}
    for _ in range(64):  # each pass narrows every window n_buckets times; 2**31 keys need at most 31 passes
        for window, c in counts.items():
            if c[:, 0].tolist() != below[window]:
                raise RuntimeError(changed)
        for rank, (lo, shift) in list(windows.items()):
            c = counts[(lo, shift)]
            slot = int(torch.searchsorted(c[0].cumsum(0), torch.tensor(rank), right=True))
            if not 1 <= slot <= n_buckets:  # below or above the window that held it in the pass before
                raise RuntimeError(changed)
            if shift == 0:  # a bucket of one key: one float32 value
                value_keys[rank] = lo + slot - 1
                del windows[rank]
            else:
                window = (lo + ((slot - 1) << shift), max(shift - bits, 0))
                windows[rank] = window
                below[window] = c[:, :slot].sum(1).tolist()
        if not windows:
            break
        counts = count(list(windows.values()))

    def relevant_from(key: int) -> int | None:
        """Relevant pairs with a key >= ``key``, if a window counted so far has a bucket edge there."""
        for (lo, shift), c in records:
            offset = key - lo
            if offset >= 0 and offset % (1 << shift) == 0 and offset >> shift <= n_buckets:
                return int(c[1, 1 + (offset >> shift):].sum())
        return None

    threshold_keys = {}
    for fmr, (low, high, gamma) in plans.items():
        pair = np.array([key_value(value_keys[low]), key_value(value_keys[high])], dtype=np.float32)
        # NumPy's own interpolation, as OML's threshold; a list of rates (as OML passes) keeps it float64.
        threshold = float(np.quantile(pair, [gamma])[0])
        smallest = np.float32(threshold)  # the smallest float32 distance >= the threshold
        if float(smallest) < threshold:
            smallest = np.nextafter(smallest, np.float32(np.inf))
        threshold_keys[fmr] = distance_key(float(smallest))
    missing = [(key, 0) for key in threshold_keys.values() if relevant_from(key) is None]
    if missing:
        count(missing)
    return {fmr_key(fmr): relevant_from(key) / n_pos for fmr, key in threshold_keys.items()}


@dataclass
class EmbeddingMoments:
    """Count, sum and sum of outer products of embeddings (float64): enough for PCA, and additive.

    Shards and workers each accumulate their own and add them up, so ``pcf`` over all validation
    embeddings never needs them in one place.
    """

    n: int
    total: torch.Tensor  # [D]
    outer: torch.Tensor  # [D, D]

    @classmethod
    def of(cls, emb, rows_per_block: int = 65536) -> "EmbeddingMoments":
        """The moments of ``[N, D]`` embeddings (in blocks: no float64 copy of them all)."""
        emb = torch.as_tensor(emb)
        dim = emb.shape[1]
        total = torch.zeros(dim, dtype=torch.float64, device=emb.device)
        outer = torch.zeros(dim, dim, dtype=torch.float64, device=emb.device)
        for start in range(0, len(emb), rows_per_block):
            block = emb[start:start + rows_per_block].to(torch.float64)
            total += block.sum(0)
            outer += block.T @ block
        return cls(len(emb), total, outer)

    @classmethod
    def by_category(cls, emb, categories=None, all_categories=None) -> dict[str, "EmbeddingMoments"]:
        """Moments of all of ``emb`` (key ``""``) and of each category's rows (key: the category).

        Args:
            emb: ``[N, D]`` embeddings.
            categories: ``[N]`` category of each row (NumPy), or None.
            all_categories: Every category to report, in order, even those without rows here (a
                worker's shard); None: those in ``categories``.
        """
        emb = torch.as_tensor(emb)
        out = {"": cls.of(emb)}
        if categories is not None:
            for category in np.unique(categories) if all_categories is None else all_categories:
                out[str(category)] = cls.of(emb[torch.as_tensor(categories == category, device=emb.device)])
        return out

    def __add__(self, other: "EmbeddingMoments") -> "EmbeddingMoments":
        return EmbeddingMoments(self.n + other.n, self.total + other.total.to(self.total.device),
                                self.outer + other.outer.to(self.outer.device))

    def pcf(self, variances: Sequence[float]) -> list[float]:
        """Principal components fraction: components needed to explain each share of the variance, / D.

        OML's definition: with the covariance eigenvalues ``l_1 >= ... >= l_m`` (``m = min(n, D)``,
        as many as the centred data's singular values), the count is the largest ``c`` with
        ``sum(l_1..l_{c-1}) / sum(l) <= variance``. NaN for fewer than two embeddings or zero variance.

        Example:
            >>> EmbeddingMoments.of(torch.eye(4, 10)).pcf([0.5, 1.0])  # OML's docstring: 0.2, 0.5
            [0.2, 0.5]
        """
        dim = self.total.shape[0]
        for v in variances:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"pcf variances must be in [0, 1], got {v}")
        if self.n < 2:
            return [float("nan")] * len(variances)
        mean = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)  # [D, D]
        # NumPy's LAPACK: torch's first eigvalsh call spends ~1 s initialising MKL.
        eigenvalues = torch.from_numpy(np.linalg.eigvalsh(cov.cpu().numpy())).flip(0).clamp_min(0)[: min(self.n, dim)]
        if float(eigenvalues.sum()) <= 0:
            return [float("nan")] * len(variances)
        cumulative = eigenvalues.cumsum(0)
        cumulative = cumulative / cumulative[-1]  # ends at exactly 1
        # 1e-12: shares equal to the target up to float64 noise count as reaching it.
        counts = torch.searchsorted(cumulative, torch.tensor(variances, dtype=torch.float64) + 1e-12, right=True) + 1
        return [int(c) / dim for c in counts]


def validation_report(
    is_relevant,
    n_retrieved,
    n_gt,
    metric_args,
    *,
    categories: Sequence | None = None,
    fnmr: dict[str, float] | None = None,
    moments: dict[str, EmbeddingMoments] | None = None,
    per_query: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Every validation metric as one flat dict: the keys training logs and the stand-alone job writes.

    Args:
        is_relevant: ``[Q, K]`` relevance of the merged top-k (:func:`raymetric.retrieval.relevance`).
        n_retrieved: ``[Q]``.
        n_gt: ``[Q]``.
        metric_args: ``raymetric.config.MetricArgs``.
        categories: ``[Q]`` category of each query, or None.
        fnmr: :func:`fnmr_at_fmr` of the same validation set, needed when ``metric_args.fmr_vals`` is set.
        moments: Embedding moments of all validation items, ``""`` for all of them and one entry per
            category; needed when ``metric_args.pcf_variance`` is set.
        per_query: :func:`metric_args_per_query` of the same results, when the caller has them already.

    Returns:
        ``cmc@k``, ``precision@k``, ``map@k``, ``fnmr@fmr=<fmr>``, ``pcf@<variance>``, ``n_queries``,
        ``n_queries_without_gt``, then ``<category>/<metric>`` blocks (without fnmr, as in OML).
    """
    metrics = retrieval_metrics(
        is_relevant, n_retrieved, n_gt,
        cmc_top_k=metric_args.cmc_top_k,
        precision_top_k=metric_args.precision_top_k,
        map_top_k=metric_args.map_top_k,
        categories=categories,
        queries_without_gt=metric_args.queries_without_gt,
        per_query=per_query,
    )
    extra: dict[str, dict[str, float]] = {"": {}}  # prefix -> keys to insert before the counts
    if metric_args.fmr_vals:
        if fnmr is None:
            raise ValueError("metric_args.fmr_vals is set but fnmr@fmr was not computed")
        extra[""].update(fnmr)
    if metric_args.pcf_variance:
        if moments is None:
            raise ValueError("metric_args.pcf_variance is set but no embedding moments were computed")
        for prefix, m in moments.items():
            block = dict(zip(map(pcf_key, metric_args.pcf_variance), m.pcf(metric_args.pcf_variance)))
            extra.setdefault(f"{prefix}/" if prefix else "", {}).update(block)
    out: dict[str, float] = {}
    for key, value in metrics.items():
        prefix = key[: key.rfind("/") + 1]
        if key.endswith("/n_queries") or key == "n_queries":
            out.update({prefix + name: v for name, v in extra.pop(prefix, {}).items()})
        out[key] = value
    for prefix, block in extra.items():  # categories with embeddings but no queries
        out.update({prefix + k: v for k, v in block.items()})
    return out

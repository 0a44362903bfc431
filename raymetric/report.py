"""Plain-text presentation of metrics for the jobs' output."""

from __future__ import annotations


def format_metrics(metrics: dict[str, float]) -> str:
    """An overall block, then one block per category (keys ``<category>/<metric>``).

    >>> print(format_metrics({"cmc@1": 0.5, "n_queries": 4, "a/cmc@1": 1.0}))
    validation metrics
      cmc@1      0.5000
      n_queries  4
    category a
      cmc@1      1.0000
    """
    overall = {k: v for k, v in metrics.items() if "/" not in k}
    by_category: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" in key:
            category, name = key.rsplit("/", 1)
            by_category.setdefault(category, {})[name] = value
    width = max((len(k) for block in [overall, *by_category.values()] for k in block), default=0)
    lines = ["validation metrics"] + _rows(overall, width)
    for category in sorted(by_category):
        lines += [f"category {category}"] + _rows(by_category[category], width)
    return "\n".join(lines)


def _rows(block: dict[str, float], width: int) -> list[str]:
    def fmt(v) -> str:
        return str(v) if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and v > 1) else f"{v:.4f}"

    return [f"  {k:<{width}}  {fmt(v)}" for k, v in block.items()]

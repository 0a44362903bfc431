"""The embeddings table: one row per validation item, stored as Parquet.

Inference writes it and validation reads it, so embeddings made anywhere (another framework, a
search system's export) can be scored by ``jobs/validate.py --embeddings E.parquet``.

| column | type | required |
|---|---|---|
| ``embedding`` | fixed-size list of float32 (a plain list of equal lengths is accepted) | yes |
| ``label`` | int64 | yes |
| ``is_query``, ``is_gallery`` | bool | yes |
| ``category`` | string | no: per-category metrics |
| ``sequence`` | string; null or empty = no sequence | no: same-sequence gallery items are skipped |
| ``path`` | string, the image | no: the picture of the worst queries |

Row ``i`` is item ``i``: the retrieval results name gallery items by row. Every problem raises an
:class:`EmbeddingsError` naming the column and the rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED = ("embedding", "label", "is_query", "is_gallery")
OPTIONAL = ("category", "sequence", "path")
_LISTED = 10  # rows named in a message


class EmbeddingsError(ValueError):
    """An embeddings table breaks the format; the message names the column and the rows."""


@dataclass
class EmbeddingsTable:
    """The table in memory (NumPy arrays, one entry per row)."""

    embeddings: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64
    is_query: np.ndarray  # [N] bool
    is_gallery: np.ndarray  # [N] bool
    categories: np.ndarray | None = None  # [N] str
    sequences: np.ndarray | None = None  # [N] str or None
    paths: np.ndarray | None = None  # [N] str or None

    def __post_init__(self):
        # Writable arrays: Arrow and pandas hand out read-only ones, which torch warns about.
        for name in ("embeddings", "labels", "is_query", "is_gallery"):
            value = np.asarray(getattr(self, name))
            setattr(self, name, value if value.flags.writeable else value.copy())

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def sequence_codes(self) -> np.ndarray:
        """``[N]`` int64 codes of the sequences; ``-1`` (never matches) where a row has none.

        >>> t = EmbeddingsTable(np.zeros((4, 1), np.float32), np.zeros(4, np.int64), np.ones(4, bool),
        ...                     np.ones(4, bool), sequences=np.array(["b", None, "a", "b"], object))
        >>> t.sequence_codes().tolist()
        [1, -1, 0, 1]
        """
        if self.sequences is None:
            return np.full(len(self), -1, np.int64)
        present = np.array([s is not None and s == s and s != "" for s in self.sequences])  # s == s: not NaN
        codes = np.full(len(self), -1, np.int64)
        if present.any():
            _, codes[present] = np.unique(self.sequences[present].astype(str), return_inverse=True)
        return codes

    def check(self, source: str = "embeddings table") -> "EmbeddingsTable":
        """Raises :class:`EmbeddingsError` for every problem found; returns the table when there is none."""
        problems = []
        n = len(self)
        emb = self.embeddings
        if emb.ndim != 2 or emb.shape[0] != n:
            problems.append(f"column 'embedding': expected {n} rows of equal length, got shape {emb.shape}")
        elif emb.shape[1] == 0:
            problems.append("column 'embedding': the embeddings are empty (0 values per row)")
        else:
            bad = ~np.isfinite(emb).all(1)
            if bad.any():
                problems.append(f"column 'embedding': non-finite values (NaN or inf) in {_rows(bad)}")
        for name in ("labels", "is_query", "is_gallery"):
            if getattr(self, name).shape != (n,):
                problems.append(f"{name} must have one entry per row")
        neither = ~self.is_query & ~self.is_gallery
        if neither.any():
            problems.append(f"columns 'is_query', 'is_gallery': a row is neither query nor gallery: {_rows(neither)}")
        if not self.is_query.any():
            problems.append("column 'is_query': no row is a query")
        if not self.is_gallery.any():
            problems.append("column 'is_gallery': no row is in the gallery")
        if self.categories is not None:
            empty = np.array([c is None or c != c or str(c) == "" for c in self.categories], bool)  # c != c: NaN
            if empty.any():
                problems.append(f"column 'category': empty in {_rows(empty)} (give every row a category, "
                                f"or drop the column)")
        if problems:
            raise EmbeddingsError(f"{source}:\n  " + "\n  ".join(problems))
        return self

    def to_arrow(self) -> pa.Table:
        n, dim = self.embeddings.shape
        flat = pa.array(np.ascontiguousarray(self.embeddings, np.float32).reshape(-1), pa.float32())
        columns = {
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            "label": pa.array(self.labels, pa.int64()),
            "is_query": pa.array(self.is_query, pa.bool_()),
            "is_gallery": pa.array(self.is_gallery, pa.bool_()),
        }
        for name, values in (("category", self.categories), ("sequence", self.sequences), ("path", self.paths)):
            if values is not None:
                columns[name] = pa.array([None if v is None or v != v else str(v) for v in values], pa.string())
        return pa.table(columns)

    @classmethod
    def from_arrow(cls, table: pa.Table, source: str = "embeddings table") -> "EmbeddingsTable":
        """Reads and checks a table with the columns above (extra columns are ignored)."""
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise EmbeddingsError(f"{source}: missing column(s) {missing}; it has {table.column_names}")
        n = table.num_rows
        problems = []
        embeddings = _embedding_matrix(table.column("embedding"), n, problems)
        labels = table.column("label")
        if not pa.types.is_integer(labels.type):
            problems.append(f"column 'label': must hold integers, got {labels.type}")
        for name in ("label", "is_query", "is_gallery"):
            nulls = np.asarray(table.column(name).is_null())
            if nulls.any():
                problems.append(f"column {name!r}: empty in {_rows(nulls)}")
        for name in ("is_query", "is_gallery"):
            if not pa.types.is_boolean(table.column(name).type):
                problems.append(f"column {name!r}: must be boolean, got {table.column(name).type}")
        if problems:
            raise EmbeddingsError(f"{source}:\n  " + "\n  ".join(problems))
        optional = {name: np.array(table.column(name).to_pylist(), object) if name in table.column_names else None
                    for name in OPTIONAL}
        if optional["category"] is not None:  # null stays None, for check() to name the rows
            optional["category"] = np.array([None if c is None else str(c) for c in optional["category"]], object)
        return cls(
            embeddings=embeddings,
            labels=np.asarray(labels.to_numpy(), np.int64),
            is_query=np.asarray(table.column("is_query").to_numpy(), bool),
            is_gallery=np.asarray(table.column("is_gallery").to_numpy(), bool),
            categories=optional["category"],
            sequences=optional["sequence"],
            paths=optional["path"],
        ).check(source)


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    listed = ", ".join(map(str, rows[:_LISTED]))
    more = f" and {len(rows) - _LISTED} more" if len(rows) > _LISTED else ""
    return f"{len(rows)} row(s): {listed}{more}"


def _embedding_matrix(column: pa.ChunkedArray, n: int, problems: list[str]) -> np.ndarray:
    """``[N, D]`` float32 from a fixed-size or plain list column (one copy at most)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(array.type, pa.ExtensionType):  # e.g. Ray Data's tensor columns
        array = array.storage
    nulls = np.asarray(array.is_null())
    if nulls.any():
        problems.append(f"column 'embedding': empty in {_rows(nulls)}")
        return np.zeros((n, 0), np.float32)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
    elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = np.asarray(array.value_lengths().fill_null(-1))
        if n and (lengths != lengths[0]).any():
            problems.append(f"column 'embedding': rows differ in length (row 0 has {lengths[0]}); differing: "
                            f"{_rows(lengths != lengths[0])}")
            return np.zeros((n, 0), np.float32)
        dim = int(lengths[0]) if n else 0
    else:
        problems.append(f"column 'embedding': must be a list of floats per row, got {array.type}")
        return np.zeros((n, 0), np.float32)
    values = array.flatten()
    if not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        problems.append(f"column 'embedding': values must be numbers, got {values.type}")
        return np.zeros((n, 0), np.float32)
    return np.asarray(values.to_numpy(zero_copy_only=False), np.float32).reshape(n, dim)


def optional_strings(frame, column: str) -> np.ndarray | None:
    """A frame's column as strings with None for missing cells (``sequence``, ``path``); None without it."""
    import pandas as pd

    if column not in frame:
        return None
    return np.array([None if pd.isna(v) else str(v) for v in frame[column]], object)


def write_embeddings(table: EmbeddingsTable, path: str | os.PathLike) -> None:
    """Writes the table as one Parquet file."""
    pq.write_table(table.to_arrow(), path)


def read_embeddings(path: str | os.PathLike) -> EmbeddingsTable:
    """Reads and checks a Parquet embeddings table (a file, or a folder of Parquet files)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EmbeddingsError(f"embeddings table not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise EmbeddingsError(f"{path}: not a readable Parquet table: {err}") from None
    return EmbeddingsTable.from_arrow(table, source=path)

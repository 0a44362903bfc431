"""Read and validate a dataset CSV in OML's format.

One row per image. Required columns: ``label``, ``path``, ``split``, ``is_query``, ``is_gallery``; optional:
``category``, ``sequence`` and the bbox columns ``x_1``, ``x_2``, ``y_1``, ``y_2`` (left, right, top,
bottom); any other column is kept as it is. OML checks this format with bare ``assert`` statements that
vanish under ``python -O`` and miss several mistakes; here every mistake raises a :class:`DatasetError`
naming the column, the offending rows and their values, and all mistakes found are reported at once.

Rows are named by the frame's index, which for a CSV is the 0-based data row: row 0 is the first line
after the header.

What is accepted, beyond OML's own files:
- Flags spelled true/false, 1/0, 1.0/0.0 or yes/no (any case). Train rows leave them empty, or false.
- Integers written as floats (``7.0``, as pandas writes an int column holding a NaN) in ``label``, the
  bbox columns, and ``sequence``/``category`` ids, where ``7``, ``7.0`` and ``007`` are one id.
- Empty ``sequence`` cells: "no sequence", each row on its own (see :func:`encode_sequences`).
- Duplicate rows.

Not an error here: a query whose label is in the gallery only through the query row itself (1 vs rest
with a single item). It has nothing relevant to find; retrieval counts such queries and leaves them out of
the averages. A ``category`` column, when present, must be set on every row.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("label", "path", "split", "is_query", "is_gallery")
BBOX_COLUMNS = ("x_1", "x_2", "y_1", "y_2")
OPTIONAL_COLUMNS = ("category", "sequence", *BBOX_COLUMNS)
SPLITS = ("train", "validation")
CATEGORY_CONFLICT_POLICIES = ("error", "first")

# How many rows (or labels) a message lists before it says "and N more".
MAX_LISTED = 10

# read_csv already turns "", "NA", "nan", "null", ... into NaN; these also cover frames built in memory.
_MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "<na>", "none", "null"})
# An integer, possibly written as a float by pandas (a column with a NaN is saved as "7.0").
_INT_PATTERN = r"[+-]?\d+(?:\.0*)?"
_BOOL_TOKENS = {
    "true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False, "yes": True, "no": False,
}
_INT64_MIN, _INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


class DatasetError(ValueError):
    """A dataset CSV (or frame) breaks the format.

    The message names the column(s), the offending rows (0-based data rows; row 0 is the first line after
    the header) and their values; when several problems are found, it lists each on its own line.
    """


def load_dataset_csv(
    csv_path: str | os.PathLike,
    dataset_root: str | os.PathLike | None = None,
    *,
    check_files: bool = True,
    require_splits: Sequence[str] = SPLITS,
    category_conflict: str = "error",
) -> pd.DataFrame:
    """Reads a dataset CSV in OML's format, checks it and returns it normalised.

    Args:
        csv_path: The CSV file.
        dataset_root: Folder that relative paths are joined to; the CSV's folder when None.
        check_files: Whether to check that every image file exists (one ``stat`` per distinct path).
        require_splits: Splits that must have at least one row.
        category_conflict: What to do when a label maps to several categories: ``"error"`` raises,
            ``"first"`` keeps each label's first category (in row order) and logs a warning.

    Returns:
        The rows, indexed by 0-based data row, with ``label`` int64, ``path`` absolute, ``split`` str,
        ``is_query``/``is_gallery`` bool (False on train rows), ``category`` str (if present), ``sequence``
        pandas ``string`` with ``<NA>`` for "no sequence" (if present; integer-looking ids are written
        without a fractional part so ``7`` and ``7.0`` are one sequence) and the bbox columns ``Int64`` with
        all four ``<NA>`` for "no box" (if present). Other columns are kept as read.

    Raises:
        DatasetError: The file is empty or any check fails; the message lists every problem found.
    """
    csv_path = os.fspath(csv_path)
    if dataset_root is None:
        dataset_root = os.path.dirname(os.path.abspath(csv_path))
    # Known columns are read as text so that "3.5", "cat" or "7.0" can be judged and reported as written.
    known = {column: str for column in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)}
    try:
        raw = pd.read_csv(csv_path, dtype=known)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{csv_path}: the CSV is empty (no header, no rows)") from None
    return validate_dataset_df(
        raw,
        dataset_root,
        check_files=check_files,
        require_splits=require_splits,
        category_conflict=category_conflict,
        source=csv_path,
    )


def validate_dataset_df(
    df: pd.DataFrame,
    dataset_root: str | os.PathLike,
    *,
    check_files: bool = True,
    require_splits: Sequence[str] = SPLITS,
    category_conflict: str = "error",
    source: str = "dataset frame",
) -> pd.DataFrame:
    """Checks and normalises a frame in OML's format, as :func:`load_dataset_csv` does for a file.

    Accepts text cells (as read from a CSV) or typed ones (ints, bools, NaN); rows are named by ``df``'s
    index. ``source`` names the data in messages. See :func:`load_dataset_csv` for the other arguments
    and the result.
    """
    unknown = set(require_splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"require_splits may only hold {_quote(SPLITS)}, got {_quote(sorted(unknown))}")
    if category_conflict not in CATEGORY_CONFLICT_POLICIES:
        raise ValueError(
            f"category_conflict must be one of {_quote(CATEGORY_CONFLICT_POLICIES)}, got {category_conflict!r}"
        )
    if not df.index.is_unique:
        raise ValueError("the frame's index names rows in messages, so it must be unique")
    _check_columns(df, source)

    problems: list[str] = []
    split, train, val = _parse_split(df["split"], require_splits, problems)
    label, bad_label = _parse_labels(df["label"], problems)
    path, has_path = _parse_paths(df["path"], dataset_root, problems)
    if check_files:
        problems += _check_files(path[has_path], dataset_root)
    is_query, is_gallery, flags_ok = _parse_flags(df, train, val, problems)
    problems += _check_query_gallery(label, bad_label, is_query, is_gallery, val & flags_ok)

    out = df.copy()
    if all(column in df.columns for column in BBOX_COLUMNS):
        for column, values in _parse_bboxes(df, problems).items():
            out[column] = values
    if "category" in df.columns:
        out["category"] = _parse_category(df["category"], label, bad_label, category_conflict, problems)
    if "sequence" in df.columns:
        out["sequence"] = _normalise_ids(_text(df["sequence"])).astype("string")
    if problems:
        raise DatasetError(_format_problems(source, problems))

    out["label"] = label.astype("int64")
    out["path"] = path
    out["split"] = split
    out["is_query"] = is_query
    out["is_gallery"] = is_gallery
    return out


def remap_labels(labels: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Maps label ids to codes ``0..L-1`` in the sorted order of the ids (ArcFace needs dense labels).

    Args:
        labels: Label ids, one per item.

    Returns:
        ``(codes, ids)``: int64 codes, one per item, and the sorted distinct ids, so ``ids[codes]`` gives
        the labels back.

    >>> codes, ids = remap_labels([30, 10, 30, 20])
    >>> codes.tolist(), ids.tolist()
    ([2, 0, 2, 1], [10, 20, 30])
    """
    ids, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.astype(np.int64).reshape(-1), ids


def encode_sequences(sequence: Iterable[Any]) -> np.ndarray:
    """Turns sequence ids into int64 codes where every "no sequence" cell gets a code of its own.

    Retrieval ignores gallery items that share the query's sequence, so rows without a sequence must
    never match each other (OML factorises them all to -1, one shared sequence). Sequences get
    ``0..S-1`` in order of first appearance; missing cells get ``-1, -2, ...``.

    >>> encode_sequences(["a", None, "b", "a", None]).tolist()
    [0, -1, 1, 0, -2]
    """
    codes, _ = pd.factorize(pd.Series(list(sequence), dtype="string"), use_na_sentinel=True)
    missing = codes < 0
    codes[missing] = -np.arange(1, missing.sum() + 1)
    return codes.astype(np.int64)


def _check_columns(df: pd.DataFrame, source: str) -> None:
    """Raises at once for missing columns or an empty frame: nothing else can be checked without them."""
    problems = []
    missing = [column for column in REQUIRED_COLUMNS if column not in df.columns]
    if missing:
        problems.append(
            f"missing required column(s) {_quote(missing)} (found columns: {_quote(map(str, df.columns))})"
        )
    present_bbox = [column for column in BBOX_COLUMNS if column in df.columns]
    if 0 < len(present_bbox) < len(BBOX_COLUMNS):
        absent = [column for column in BBOX_COLUMNS if column not in present_bbox]
        problems.append(
            f"bbox columns {_quote(BBOX_COLUMNS)} come all four or none: found {_quote(present_bbox)}, "
            f"missing {_quote(absent)}"
        )
    if len(df) == 0:
        problems.append("the CSV has a header but no data rows")
    if problems:
        raise DatasetError(_format_problems(source, problems))


def _parse_split(
    cells: pd.Series, require_splits: Sequence[str], problems: list[str]
) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Returns the split text and the train and validation masks; appends what is wrong to ``problems``."""
    split = _text(cells)
    bad = ~split.isin(SPLITS)
    if bad.any():
        problems.append(f"column 'split': {_count(bad, 'row')} not 'train' or 'validation': {_list_rows(split[bad])}")
    for name in require_splits:
        if not split.eq(name).any():
            problems.append(f"column 'split': the CSV has no {name!r} rows (required: {_quote(require_splits)})")
    return split, split.eq("train"), split.eq("validation")


def _parse_labels(cells: pd.Series, problems: list[str]) -> tuple[pd.Series, pd.Series]:
    """Returns the labels (``Int64``) and a mask of rows whose label is not an integer."""
    text = _text(cells)
    label, bad = _parse_ints(text)
    # An empty label is as unusable as "cat".
    bad |= text.isna()
    if bad.any():
        problems.append(f"column 'label': {_count(bad, 'row')} not integers: {_list_rows(text[bad])}")
    return label, bad


def _parse_paths(
    cells: pd.Series, dataset_root: str | os.PathLike, problems: list[str]
) -> tuple[pd.Series, pd.Series]:
    """Returns the absolute paths and a mask of rows that have one."""
    text = _text(cells)
    missing = text.isna()
    if missing.any():
        problems.append(f"column 'path': {_count(missing, 'row')} without a path: {_list_rows(text[missing])}")
    return _resolve_paths(text, dataset_root), ~missing


def _parse_flags(
    df: pd.DataFrame, train: pd.Series, val: pd.Series, problems: list[str]
) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Parses ``is_query``/``is_gallery``: empty or false on train rows, boolean-like on validation rows.

    Returns ``is_query`` and ``is_gallery`` (bool, False on train rows and where a value is bad) and a mask
    of rows whose two flags are both usable.
    """
    parsed, ok = [], pd.Series(True, index=df.index)
    for column, role in (("is_query", "query"), ("is_gallery", "gallery")):
        text = _text(df[column])
        value = text.str.lower().map(_BOOL_TOKENS)
        # A train row may say "false" (it is not a query), but anything else marks a validation row
        # that was given the wrong split.
        set_on_train = train & text.notna() & value.ne(False)
        if set_on_train.any():
            problems.append(
                f"column {column!r}: {_count(set_on_train, 'train row')} with a {role} flag set (train rows "
                f"leave it empty or false): {_list_rows(text[set_on_train])}"
            )
        bad_on_val = val & value.isna()
        if bad_on_val.any():
            problems.append(
                f"column {column!r}: {_count(bad_on_val, 'validation row')} with a missing or non-boolean value "
                f"(expected true/false, 1/0 or yes/no): {_list_rows(text[bad_on_val])}"
            )
        ok &= ~bad_on_val
        parsed.append((value.eq(True) & val).astype(bool))
    return parsed[0], parsed[1], ok


def _check_query_gallery(
    label: pd.Series, bad_label: pd.Series, is_query: pd.Series, is_gallery: pd.Series, usable: pd.Series
) -> list[str]:
    """Every validation row is a query or in the gallery, and every query label has a gallery row."""
    problems = []
    neither = usable & ~is_query & ~is_gallery
    if neither.any():
        problems.append(
            f"columns 'is_query', 'is_gallery': {_count(neither, 'validation row')} neither query nor gallery: "
            f"{_list_rows(neither[neither], values=False)}"
        )
    if usable.any() and not (usable & is_query).any():
        problems.append("column 'is_query': no validation row is a query (is_query is false everywhere)")
    usable = usable & ~bad_label
    queries = label[usable & is_query]
    orphans = queries[~queries.isin(set(label[usable & is_gallery]))]
    if not orphans.empty:
        rows_by_label = orphans.groupby(orphans, sort=True).groups
        listed = [
            f"label {lab} (queries: {_list_rows(pd.Series(index=rows), values=False, limit=3)})"
            for lab, rows in list(rows_by_label.items())[:MAX_LISTED]
        ]
        problems.append(
            f"columns 'label', 'is_query', 'is_gallery': {_count(len(rows_by_label), 'query label')} without "
            f"any gallery row: {_join(listed, len(rows_by_label))}"
        )
    return problems


def _parse_bboxes(df: pd.DataFrame, problems: list[str]) -> dict[str, pd.Series]:
    """Parses the four bbox columns into ``Int64`` and checks each row's box."""
    values, text = {}, {}
    for column in BBOX_COLUMNS:
        text[column] = _text(df[column])
        values[column], bad = _parse_ints(text[column])
        bad |= values[column].lt(0).fillna(False).astype(bool)
        if bad.any():
            problems.append(
                f"column {column!r}: {_count(bad, 'row')} not non-negative integers: {_list_rows(text[column][bad])}"
            )
    present = pd.concat([text[column].notna() for column in BBOX_COLUMNS], axis=1)
    partial = present.any(axis=1) & ~present.all(axis=1)
    if partial.any():
        listing = _list_row_details(
            partial, lambda row: ", ".join(f"{c}={_cell(text[c].at[row])}" for c in BBOX_COLUMNS)
        )
        problems.append(
            f"columns {_quote(BBOX_COLUMNS)}: {_count(partial, 'row')} with only some of the four bbox cells set "
            f"(set all four or none): {listing}"
        )
    for low, high in (("x_1", "x_2"), ("y_1", "y_2")):
        inverted = values[low].ge(values[high]).fillna(False).astype(bool)
        if inverted.any():
            listing = _list_row_details(
                inverted, lambda row: f"{low}={values[low].at[row]}, {high}={values[high].at[row]}"
            )
            problems.append(
                f"columns {low!r}, {high!r}: {_count(inverted, 'row')} with {low} >= {high} (an empty box): {listing}"
            )
    return values


def _parse_category(
    cells: pd.Series, label: pd.Series, bad_label: pd.Series, policy: str, problems: list[str]
) -> pd.Series:
    """Returns the categories as text, one per label (see ``category_conflict``)."""
    text = _text(cells)
    missing = text.isna()
    if missing.any():
        problems.append(f"column 'category': {_count(missing, 'row')} without a category: {_list_rows(text[missing])}")
    category = _normalise_ids(text)
    usable = ~missing & ~bad_label
    resolved, conflicts = _resolve_categories(label[usable], category[usable], policy)
    problems += conflicts
    category.loc[resolved.index] = resolved
    return category


def _resolve_categories(label: pd.Series, category: pd.Series, policy: str) -> tuple[pd.Series, list[str]]:
    """Finds labels with several categories; raises them as problems or keeps each label's first one."""
    n_categories = category.groupby(label, sort=True).nunique()
    conflicting = n_categories.index[n_categories > 1]
    if conflicting.empty:
        return category, []
    details = []
    for lab in conflicting[:MAX_LISTED]:
        rows = category[label.eq(lab)]
        parts = [
            f"{cat!r} in {_list_rows(rows[rows.eq(cat)], values=False, limit=3)}" for cat in rows.unique()
        ]
        details.append(f"label {lab} ({'; '.join(parts)})")
    listing = _join(details, len(conflicting))
    n_labels = _count(len(conflicting), "label")
    if policy == "error":
        return category, [
            f"column 'category': {n_labels} in several categories (fix the CSV, or set "
            f"category_conflict: first (a config key) to keep each label's first category): {listing}"
        ]
    logger.warning(
        "column 'category': %s in several categories; category_conflict='first' keeps each label's first "
        "category (in row order): %s",
        n_labels,
        listing,
    )
    return category.groupby(label, sort=False).transform("first"), []


def _resolve_paths(path: pd.Series, dataset_root: str | os.PathLike) -> pd.Series:
    """Joins relative paths to ``dataset_root`` and makes them absolute; missing paths stay missing.

    Vectorised over the column (a per-row ``os.path.join`` costs seconds at a million rows); only paths
    with ``.`` or ``..`` parts or doubled separators go through ``os.path.normpath``.

    >>> _resolve_paths(pd.Series(["a.jpg", "/abs/b.jpg", "./c/../d.jpg", None], dtype=str), "/data").tolist()
    ['/data/a.jpg', '/abs/b.jpg', '/data/d.jpg', nan]
    """
    root = os.path.abspath(os.fspath(dataset_root))
    joined = path.where(path.str.startswith(os.sep).fillna(True), os.path.join(root, "") + path)
    messy = joined.str.contains(r"(?:^|/)\.\.?(?:/|$)|//", regex=True).fillna(False).to_numpy(dtype=bool)
    joined = joined.copy()
    joined.iloc[messy] = [os.path.normpath(p) for p in joined.iloc[messy]]
    return joined


def _check_files(path: pd.Series, dataset_root: str | os.PathLike) -> list[str]:
    """Checks that each distinct path is an existing file: one stat per path, so 100k files take ~a second."""
    exists = {p: os.path.isfile(p) for p in pd.unique(path)}
    missing = ~path.map(exists).astype(bool)
    if not missing.any():
        return []
    # When every file is missing, dataset_root is the usual culprit: name it.
    return [
        f"column 'path': {_count(missing, 'file')} not found (relative paths are joined to "
        f"dataset_root={os.fspath(dataset_root)!r}): {_list_rows(path[missing])}"
    ]


def _text(series: pd.Series) -> pd.Series:
    """Cells as stripped text, NaN where missing; works for text read from a CSV and for typed cells.

    >>> _text(pd.Series([" a ", None, "NaN", 3, 2.0])).tolist()
    ['a', nan, nan, '3', '2.0']
    """
    text = series.astype(object).astype(str).str.strip()
    return text.mask(text.str.lower().isin(_MISSING_TOKENS))


def _parse_ints(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Parses integer-looking text (``"7"``, ``"7.0"``) to ``Int64``; empty cells stay ``<NA>``.

    Returns the values and a mask of cells that are set but are not int64 integers.

    >>> values, bad = _parse_ints(pd.Series(["7", "7.0", None, "3.5", "cat"], dtype=str))
    >>> values.tolist(), bad.tolist()
    ([7, 7, <NA>, <NA>, <NA>], [False, False, False, True, True])
    """
    looks_int = text.str.fullmatch(_INT_PATTERN).fillna(False).to_numpy(dtype=bool)
    digits = text[looks_int].str.replace(r"\.0*$", "", regex=True)
    # 18 digits always fit int64 and parse vectorised; longer ones (rare) are range-checked one by one.
    short = digits.str.lstrip("+-").str.len().le(18).to_numpy(dtype=bool)
    numbers = np.zeros(len(digits), dtype=np.int64)
    fits = short.copy()
    numbers[short] = digits[short].astype("int64").to_numpy()
    for pos in np.flatnonzero(~short):
        number = int(digits.iloc[pos])
        fits[pos] = _INT64_MIN <= number <= _INT64_MAX
        numbers[pos] = number if fits[pos] else 0
    data = np.zeros(len(text), dtype=np.int64)
    missing = np.ones(len(text), dtype=bool)
    data[looks_int] = numbers
    missing[np.flatnonzero(looks_int)[~fits]] = True
    missing[np.flatnonzero(looks_int)[fits]] = False
    values = pd.Series(pd.arrays.IntegerArray(data, missing), index=text.index)
    bad = text.notna() & values.isna()
    return values, bad.astype(bool)


def _normalise_ids(text: pd.Series) -> pd.Series:
    """Writes integer-looking ids without sign noise or fraction, so ``7``, ``7.0`` and ``007`` agree.

    >>> _normalise_ids(pd.Series(["7", "7.0", "a", None], dtype=str)).tolist()
    ['7', '7', 'a', nan]
    """
    values, _ = _parse_ints(text)
    as_int = values.notna()
    return text.mask(as_int, values.astype(object).astype(str))


def _count(mask_or_n: pd.Series | int, noun: str) -> str:
    """``"1 row"`` / ``"3 rows"``, counting a mask's true cells."""
    n = int(mask_or_n.sum()) if isinstance(mask_or_n, pd.Series) else int(mask_or_n)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _list_rows(cells: pd.Series, *, values: bool = True, limit: int = MAX_LISTED) -> str:
    """Names the rows of ``cells`` (by index) with their values, at most ``limit`` of them.

    >>> _list_rows(pd.Series(["valid", None], index=[3, 7]))
    "row 3 ('valid'), row 7 (empty)"
    >>> _list_rows(pd.Series(["x"] * 12), values=False)
    'row 0, row 1, row 2, row 3, row 4, row 5, row 6, row 7, row 8, row 9 and 2 more'
    """
    items = []
    for row, value in cells.iloc[:limit].items():
        if not values:
            items.append(f"row {row}")
        elif pd.isna(value):
            items.append(f"row {row} (empty)")
        else:
            items.append(f"row {row} ({value!r})")
    return _join(items, len(cells))


def _list_row_details(mask: pd.Series, describe: Callable[[Any], str], limit: int = MAX_LISTED) -> str:
    """Names the rows where ``mask`` is true, each with ``describe(row)``, at most ``limit`` of them.

    >>> _list_row_details(pd.Series([True, False, True]), lambda row: f"x={row * 10}")
    'row 0 (x=0), row 2 (x=20)'
    """
    rows = mask.index[mask.to_numpy(dtype=bool)]
    return _join([f"row {row} ({describe(row)})" for row in rows[:limit]], len(rows))


def _cell(value: Any) -> str:
    return "empty" if pd.isna(value) else str(value)


def _join(items: list[str], total: int) -> str:
    more = total - len(items)
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def _quote(names: Iterable[Any]) -> str:
    """``'a', 'b'``."""
    return ", ".join(repr(str(name)) for name in names)


def _format_problems(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        message = f"{source}: {problems[0]}"
    else:
        message = f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
    if any(re.search(r"\brow \d", p) for p in problems):
        message += "\n(rows are 0-based data rows: row 0 is the first line after the header)"
    return message

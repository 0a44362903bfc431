"""Tests of reading and checking OML's dataset CSV: dtypes, paths, and one case per malformation."""

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raymetric.data.csv import (
    DatasetError,
    encode_sequences,
    load_dataset_csv,
    remap_labels,
    validate_dataset_df,
)

COLUMNS = [
    "label", "path", "split", "is_query", "is_gallery", "category", "sequence", "x_1", "x_2", "y_1", "y_2", "note",
]


def base_rows() -> list[dict[str, str]]:
    """A valid dataset: 4 train rows (labels 1, 2), 4 validation rows (labels 3, 4), every optional column.

    Row 0 has a bbox; rows 4 and 5 have no sequence; rows 6 and 7 share sequence "7" (written two ways).
    """
    def row(label, name, split, q="", g="", category="", sequence="", box=("", "", "", "")):
        x_1, x_2, y_1, y_2 = box
        return dict(
            label=label, path=f"images/{name}.png", split=split, is_query=q, is_gallery=g, category=category,
            sequence=sequence, x_1=x_1, x_2=x_2, y_1=y_1, y_2=y_2, note=f"n{name}",
        )

    return [
        row("1", "a", "train", category="shoes", box=("0", "4", "1", "5")),
        row("1", "b", "train", category="shoes"),
        row("2", "c", "train", category="hats", sequence="s"),
        row("2", "d", "train", category="hats", sequence="s"),
        row("3", "e", "validation", "True", "True", category="shoes"),
        row("3", "f", "validation", "False", "True", category="shoes"),
        row("4", "g", "validation", "1", "1", category="hats", sequence="7"),
        row("4", "h", "validation", "1", "1", category="hats", sequence="7.0"),
    ]


def write_dataset(folder: Path, rows: list[dict[str, str]], columns=None, name="df.csv", images=True) -> Path:
    """Writes ``rows`` verbatim as a CSV and a small PNG for every relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = columns or COLUMNS
    if images:
        for r in rows:
            if r.get("path") and not Path(r["path"]).is_absolute():
                (folder / r["path"]).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / r["path"])
    csv_path = folder / name
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def test_valid_csv_loads_with_normalised_dtypes(tmp_path):
    df = load_dataset_csv(write_dataset(tmp_path, base_rows()))

    assert list(df.index) == list(range(8))
    assert list(df.columns) == COLUMNS  # the extra column "note" is kept, in place
    assert df["label"].dtype == np.int64
    assert df["label"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert df["path"].tolist() == [str(tmp_path / "images" / f"{c}.png") for c in "abcdefgh"]
    assert pd.api.types.is_string_dtype(df["split"])
    assert df["is_query"].dtype == bool and df["is_gallery"].dtype == bool
    assert df["is_query"].tolist() == [False] * 4 + [True, False, True, True]
    assert df["is_gallery"].tolist() == [False] * 4 + [True] * 4
    assert pd.api.types.is_string_dtype(df["category"])
    assert df["category"].tolist() == ["shoes", "shoes", "hats", "hats", "shoes", "shoes", "hats", "hats"]
    assert df["sequence"].dtype == pd.StringDtype(na_value=pd.NA)
    for column in ("x_1", "x_2", "y_1", "y_2"):
        assert df[column].dtype == pd.Int64Dtype()
    assert df.loc[0, ["x_1", "x_2", "y_1", "y_2"]].tolist() == [0, 4, 1, 5]
    assert df["note"].tolist() == [f"n{c}" for c in "abcdefgh"]


def test_rows_without_box_or_sequence(tmp_path):
    df = load_dataset_csv(write_dataset(tmp_path, base_rows()))

    assert df.loc[1:, ["x_1", "x_2", "y_1", "y_2"]].isna().all().all()  # all four <NA> = no box
    assert df["sequence"].isna().tolist() == [True, True, False, False, True, True, False, False]
    assert df.loc[6, "sequence"] == df.loc[7, "sequence"] == "7"  # "7" and "7.0" are one sequence
    codes = encode_sequences(df["sequence"])
    assert codes[2] == codes[3] and codes[6] == codes[7]
    no_sequence = codes[df["sequence"].isna().to_numpy()]
    assert len(set(no_sequence.tolist())) == 4  # each "no sequence" row is a sequence of its own
    assert not set(no_sequence.tolist()) & set(codes[[2, 6]].tolist())


def test_relative_paths_resolve_against_dataset_root(tmp_path):
    root = tmp_path / "root"
    write_dataset(root, base_rows())  # the images
    csv_path = write_dataset(tmp_path / "elsewhere", base_rows(), images=False)

    with pytest.raises(DatasetError, match="8 files not found"):
        load_dataset_csv(csv_path)  # without dataset_root: relative to the CSV's folder, where no images are
    df = load_dataset_csv(csv_path, dataset_root=root)
    assert df["path"].tolist() == [str(root / "images" / f"{c}.png") for c in "abcdefgh"]


def test_relative_paths_default_to_the_csv_folder_and_absolute_paths_stay(tmp_path, monkeypatch):
    rows = base_rows()
    other = tmp_path / "other" / "x.png"
    other.parent.mkdir()
    Image.new("RGB", (8, 8)).save(other)
    rows[1]["path"] = str(other)
    rows[2]["path"] = "./images/../images/c.png"
    csv_path = write_dataset(tmp_path / "ds", rows)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter

    df = load_dataset_csv(Path("ds") / "df.csv")
    assert df.loc[0, "path"] == str(tmp_path / "ds" / "images" / "a.png")
    assert df.loc[1, "path"] == str(other)
    assert df.loc[2, "path"] == str(tmp_path / "ds" / "images" / "c.png")
    assert csv_path.exists()


@pytest.mark.parametrize(
    "spellings",
    [("True", "False"), ("true", "false"), ("1", "0"), ("1.0", "0.0"), ("yes", "no"), ("TRUE", "No")],
)
def test_boolean_spellings(tmp_path, spellings):
    yes, no = spellings
    rows = base_rows()
    rows[4].update(is_query=yes, is_gallery=yes)
    rows[5].update(is_query=no, is_gallery=yes)
    rows[0].update(is_query=no)  # "false" on a train row is allowed: it says the row is not a query
    df = load_dataset_csv(write_dataset(tmp_path, rows))
    assert df["is_query"].tolist()[:6] == [False] * 4 + [True, False]


def test_labels_written_as_floats_and_duplicate_rows_are_fine(tmp_path):
    rows = base_rows()
    rows[0]["label"] = "1.0"
    rows.append(dict(rows[4]))
    df = load_dataset_csv(write_dataset(tmp_path, rows))
    assert df["label"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 3]


def test_check_files_false_skips_the_file_check(tmp_path):
    csv_path = write_dataset(tmp_path, base_rows(), images=False)
    assert len(load_dataset_csv(csv_path, check_files=False)) == 8


def test_require_splits_can_drop_validation(tmp_path):
    csv_path = write_dataset(tmp_path, base_rows()[:4])
    assert len(load_dataset_csv(csv_path, require_splits=("train",))) == 4


def test_category_conflict_first_keeps_first_and_warns(tmp_path, caplog):
    rows = base_rows()
    rows[1]["category"] = "boots"
    csv_path = write_dataset(tmp_path, rows)

    with caplog.at_level(logging.WARNING, logger="raymetric.data.csv"):
        df = load_dataset_csv(csv_path, category_conflict="first")
    assert df["category"].tolist()[:2] == ["shoes", "shoes"]
    assert "label 1 ('shoes' in row 0; 'boots' in row 1)" in caplog.text
    assert "category_conflict='first'" in caplog.text


def test_typed_frame_validates_like_a_csv(tmp_path):
    write_dataset(tmp_path, base_rows())
    typed = pd.DataFrame(
        {
            "label": [1, 1, 2, 2],
            "path": [f"images/{c}.png" for c in "aceg"],
            "split": ["train", "train", "validation", "validation"],
            "is_query": [np.nan, np.nan, True, True],
            "is_gallery": [None, None, True, False],
            "sequence": [np.nan, 7.0, 7, np.nan],
        }
    )
    df = validate_dataset_df(typed, tmp_path)
    assert df["is_query"].tolist() == [False, False, True, True]
    assert df["sequence"].tolist() == [pd.NA, "7", "7", pd.NA]


def test_remap_labels():
    codes, ids = remap_labels(np.array([7, -3, 7, 100]))
    assert codes.tolist() == [1, 0, 1, 2] and codes.dtype == np.int64
    assert ids[codes].tolist() == [7, -3, 7, 100]


# Each case: how to break base_rows (rows -> rows, or rows -> (rows, columns)), and what the message must
# contain: the column(s) and the exact rows with their values.
def _set(row, **cells):
    def change(rows):
        rows[row].update(cells)
        return rows

    return change


def _chain(*changes):
    def change(rows):
        for c in changes:
            rows = c(rows)
        return rows

    return change


def _drop_columns(*names):
    return lambda rows: (rows, [c for c in COLUMNS if c not in names])


MALFORMED = {
    "missing_columns": (
        _drop_columns("is_query", "is_gallery", "split"),
        ["missing required column(s) 'split', 'is_query', 'is_gallery'", "found columns: 'label', 'path'"],
    ),
    "bad_split": (
        _chain(_set(2, split="valid"), _set(3, split="")),
        ["column 'split': 2 rows not 'train' or 'validation': row 2 ('valid'), row 3 (empty)"],
    ),
    "non_integer_labels": (
        _chain(_set(0, label="3.5"), _set(1, label="cat"), _set(5, label="")),
        ["column 'label': 3 rows not integers: row 0 ('3.5'), row 1 ('cat'), row 5 (empty)"],
    ),
    "many_bad_labels_are_summarised": (
        lambda rows: [dict(r, label="x") for r in rows * 2],
        ["column 'label': 16 rows not integers: row 0 ('x'), row 1 ('x')", "row 9 ('x') and 6 more"],
    ),
    "flags_on_train_rows": (
        _chain(_set(0, is_query="True"), _set(1, is_gallery="1"), _set(3, is_query="maybe")),
        [
            "column 'is_query': 2 train rows with a query flag set (train rows leave it empty or false): "
            "row 0 ('True'), row 3 ('maybe')",
            "column 'is_gallery': 1 train row with a gallery flag set",
            "row 1 ('1')",
        ],
    ),
    "flags_missing_or_not_boolean_on_validation_rows": (
        _chain(_set(5, is_query=""), _set(6, is_gallery="maybe"), _set(7, is_gallery="2")),
        [
            "column 'is_query': 1 validation row with a missing or non-boolean value",
            "row 5 (empty)",
            "column 'is_gallery': 2 validation rows with a missing or non-boolean value (expected true/false, "
            "1/0 or yes/no): row 6 ('maybe'), row 7 ('2')",
        ],
    ),
    "neither_query_nor_gallery": (
        _set(5, is_query="False", is_gallery="0"),
        ["columns 'is_query', 'is_gallery': 1 validation row neither query nor gallery: row 5"],
    ),
    "no_query_at_all": (
        _chain(*[_set(r, is_query="False") for r in (4, 6, 7)]),
        ["column 'is_query': no validation row is a query"],
    ),
    "query_label_absent_from_gallery": (
        _chain(_set(6, is_gallery="False"), _set(7, is_gallery="False")),
        [
            "columns 'label', 'is_query', 'is_gallery': 1 query label without any gallery row: "
            "label 4 (queries: row 6, row 7)"
        ],
    ),
    "path_empty": (_set(3, path=""), ["column 'path': 1 row without a path: row 3 (empty)"]),
    "bbox_x1_not_below_x2": (
        _set(0, x_1="10", x_2="10"),
        ["columns 'x_1', 'x_2': 1 row with x_1 >= x_2 (an empty box): row 0 (x_1=10, x_2=10)"],
    ),
    "bbox_y1_not_below_y2": (
        _set(1, x_1="0", x_2="3", y_1="7", y_2="2"),
        ["columns 'y_1', 'y_2': 1 row with y_1 >= y_2 (an empty box): row 1 (y_1=7, y_2=2)"],
    ),
    "bbox_negative": (
        _set(1, x_1="-1", x_2="3", y_1="0", y_2="2"),
        ["column 'x_1': 1 row not non-negative integers: row 1 ('-1')"],
    ),
    "bbox_not_integer": (
        _set(1, x_1="0", x_2="3", y_1="0", y_2="5.5"),
        ["column 'y_2': 1 row not non-negative integers: row 1 ('5.5')"],
    ),
    "bbox_some_cells_only": (
        _chain(_set(2, x_1="1"), _set(0, y_2="")),
        [
            "columns 'x_1', 'x_2', 'y_1', 'y_2': 2 rows with only some of the four bbox cells set (set all four "
            "or none): row 0 (x_1=0, x_2=4, y_1=1, y_2=empty), row 2 (x_1=1, x_2=empty, y_1=empty, y_2=empty)"
        ],
    ),
    "bbox_some_columns_only": (
        _drop_columns("y_1", "y_2"),
        ["bbox columns 'x_1', 'x_2', 'y_1', 'y_2' come all four or none: found 'x_1', 'x_2', missing 'y_1', 'y_2'"],
    ),
    "label_in_several_categories": (
        _chain(_set(1, category="boots"), _set(7, category="caps")),
        [
            "column 'category': 2 labels in several categories",
            "category_conflict: first",
            "label 1 ('shoes' in row 0; 'boots' in row 1), label 4 ('hats' in row 6; 'caps' in row 7)",
        ],
    ),
    "category_missing": (_set(2, category=""), ["column 'category': 1 row without a category: row 2 (empty)"]),
    "no_validation_rows": (
        lambda rows: rows[:4],
        ["column 'split': the CSV has no 'validation' rows (required: 'train', 'validation')"],
    ),
    "no_train_rows": (lambda rows: rows[4:], ["column 'split': the CSV has no 'train' rows"]),
    "header_only": (lambda rows: [], ["the CSV has a header but no data rows"]),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_csv_names_column_and_rows(tmp_path, case):
    change, expected = MALFORMED[case]
    changed = change(base_rows())
    rows, columns = changed if isinstance(changed, tuple) else (changed, COLUMNS)
    csv_path = write_dataset(tmp_path, rows, columns)

    with pytest.raises(DatasetError) as error:
        load_dataset_csv(csv_path)
    message = str(error.value)
    assert message.startswith(str(csv_path))
    for fragment in expected:
        assert fragment in message


def test_missing_files_named_with_rows_and_paths(tmp_path):
    csv_path = write_dataset(tmp_path, base_rows())
    (tmp_path / "images" / "d.png").unlink()
    (tmp_path / "images" / "g.png").unlink()

    with pytest.raises(DatasetError) as error:
        load_dataset_csv(csv_path)
    assert (
        f"column 'path': 2 files not found (relative paths are joined to dataset_root={str(tmp_path)!r}): "
        f"row 3 ({str(tmp_path / 'images' / 'd.png')!r}), row 6 ({str(tmp_path / 'images' / 'g.png')!r})"
    ) in str(error.value)


def test_all_problems_reported_at_once(tmp_path):
    rows = base_rows()
    rows[0]["label"] = "cat"
    rows[2]["split"] = "test"
    with pytest.raises(DatasetError) as error:
        load_dataset_csv(write_dataset(tmp_path, rows))
    message = str(error.value)
    assert "2 problems" in message and "column 'label'" in message and "column 'split'" in message
    assert "row 0 is the first line after the header" in message


def test_empty_file(tmp_path):
    csv_path = tmp_path / "df.csv"
    csv_path.write_text("")
    with pytest.raises(DatasetError, match="the CSV is empty"):
        load_dataset_csv(csv_path)


def test_dataset_error_is_a_value_error_and_bad_arguments_are_caught(tmp_path):
    csv_path = write_dataset(tmp_path, base_rows())
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(ValueError, match="category_conflict"):
        load_dataset_csv(csv_path, category_conflict="last")
    with pytest.raises(ValueError, match="require_splits"):
        load_dataset_csv(csv_path, require_splits=("test",))

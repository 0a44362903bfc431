"""Tests of the procedural demo dataset: determinism, OML CSV format, images, and ensure_demo's caching."""

import csv
import dataclasses
import hashlib
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from raymetric.data.demo import COLUMNS, SIZES, SPEC_NAME, DemoSpec, ensure_demo, generate_demo, main

TINY = SIZES["tiny"]


def _digests(csv_path: Path) -> dict[str, str]:
    """sha256 of the CSV and of every file it lists, keyed by path relative to the dataset folder."""
    root = csv_path.parent
    out = {"df.csv": hashlib.sha256(csv_path.read_bytes()).hexdigest()}
    for row in _rows(csv_path):
        out[row["path"]] = hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()
    return out


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("tiny"), TINY)


def test_same_seed_same_bytes_for_any_n_procs(tiny_csv, tmp_path):
    again = generate_demo(tmp_path / "again", TINY)
    parallel = generate_demo(tmp_path / "parallel", TINY, n_procs=2)
    assert _digests(again) == _digests(tiny_csv)
    assert _digests(parallel) == _digests(tiny_csv)


def test_other_seed_differs(tiny_csv, tmp_path):
    other = _digests(generate_demo(tmp_path, dataclasses.replace(TINY, seed=1)))
    same = _digests(tiny_csv)
    assert other["df.csv"] != same["df.csv"]
    shared = set(other) & set(same) - {"df.csv"}
    assert shared and all(other[p] != same[p] for p in shared)


def test_csv_format(tiny_csv):
    header = tiny_csv.read_text().splitlines()[0]
    assert header == ",".join(COLUMNS)
    rows = _rows(tiny_csv)
    assert len(rows) == (TINY.n_train_labels + TINY.n_val_labels) * TINY.images_per_label

    by_split = defaultdict(set)
    images_per_label, categories, sequence_labels = defaultdict(int), defaultdict(set), defaultdict(set)
    for row in rows:
        label = int(row["label"])
        by_split[row["split"]].add(label)
        images_per_label[label] += 1
        categories[label].add(row["category"])
        assert not Path(row["path"]).is_absolute()
        assert (tiny_csv.parent / row["path"]).is_file()
        if row["split"] == "train":
            assert row["is_query"] == row["is_gallery"] == "" and row["sequence"] == ""
        else:
            assert row["is_query"] == row["is_gallery"] == "True"
        if row["sequence"]:
            assert row["split"] == "validation"
            sequence_labels[row["sequence"]].add(label)

    assert set(by_split) == {"train", "validation"}
    assert len(by_split["train"]) == TINY.n_train_labels and len(by_split["validation"]) == TINY.n_val_labels
    assert not by_split["train"] & by_split["validation"]
    assert all(n == TINY.images_per_label >= 2 for n in images_per_label.values())
    assert all(len(c) == 1 for c in categories.values())
    assert len({c for cs in categories.values() for c in cs}) == TINY.n_categories
    # Sequences never span labels, hold 2-3 frames, and leave every query a relevant gallery item.
    assert sequence_labels and all(len(labels) == 1 for labels in sequence_labels.values())
    frames = defaultdict(int)
    for row in rows:
        frames[row["sequence"]] += bool(row["sequence"])
    assert all(2 <= n <= 3 for seq, n in frames.items() if seq)


def test_images_and_bboxes(tiny_csv):
    n_boxed = 0
    for row in _rows(tiny_csv):
        with Image.open(tiny_csv.parent / row["path"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            width, height = image.size
            image.load()
        box = [row[k] for k in ("x_1", "x_2", "y_1", "y_2")]
        if all(box):
            n_boxed += 1
            x_1, x_2, y_1, y_2 = map(int, box)
            assert 0 <= x_1 < x_2 <= width and 0 <= y_1 < y_2 <= height
            # Boxed rows are larger cluttered canvases.
            assert width > TINY.image_size and height > TINY.image_size
        else:
            assert not any(box)
            assert (width, height) == (TINY.image_size, TINY.image_size)
    assert n_boxed > 0


def test_ensure_demo_keeps_complete_dataset(tmp_path):
    csv_path = ensure_demo(tmp_path, TINY)
    files = [csv_path, tmp_path / SPEC_NAME, *(tmp_path / r["path"] for r in _rows(csv_path))]
    mtimes = [f.stat().st_mtime_ns for f in files]

    assert ensure_demo(tmp_path, TINY) == csv_path
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_ensure_demo_regenerates_on_other_spec_or_unfinished_run(tmp_path):
    csv_path = ensure_demo(tmp_path, TINY)
    before = csv_path.read_bytes()

    smaller = dataclasses.replace(TINY, images_per_label=3, seed=5)
    ensure_demo(tmp_path, smaller)
    rows = _rows(csv_path)
    assert csv_path.read_bytes() != before and len(rows) == 14 * 3
    # Images the new CSV does not list are gone.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")) == \
        sorted(r["path"] for r in rows)

    # A run that never wrote its marker counts as unfinished.
    (tmp_path / SPEC_NAME).unlink()
    ensure_demo(tmp_path, smaller)
    assert (tmp_path / SPEC_NAME).is_file()


def test_spec_is_checked():
    with pytest.raises(ValueError, match="images_per_label"):
        DemoSpec(images_per_label=1)
    with pytest.raises(ValueError, match="n_categories"):
        DemoSpec(n_categories=99)


def test_cli(tmp_path, capsys):
    csv_path = main(["--out", str(tmp_path), "--size", "tiny", "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(csv_path)
    assert (tmp_path / "df.csv") == csv_path
    assert '"seed": 3' in (tmp_path / SPEC_NAME).read_text()

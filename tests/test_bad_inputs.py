"""Every bad input is refused by `jobs/train.py` before any worker starts, exit status 2, naming the key, column or rows.

The same cases make the table in docs/bad_inputs.md:
    .venv/bin/python -m tests.test_bad_inputs > docs/bad_inputs.md
"""

import io
import os
import shutil
import sys
from contextlib import redirect_stderr

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
TINY = ["demo_data=null", "sampler.args.n_labels=4", "sampler.args.n_instances=2", "logger=null"]


def _rows(df, split):
    return df.index[df["split"] == split]


def _edit(column, value, split="validation", n=2):
    def edit(df):
        df = df.astype({column: object}) if column in df else df
        df.loc[_rows(df, split)[:n], column] = value
        return df

    return edit


def _corrupt(root, df):
    path = os.path.join(root, df.loc[_rows(df, "train")[0], "path"])
    with open(path, "wb") as f:
        f.write(b"\xff\xd8 this is not a JPEG any more")
    return df


# (what, CSV edit or None, overrides, expected fragments of the message, needs Ray)
CASES = [
    ("missing required columns", lambda df: df.drop(columns=["split", "is_query"]), [], ["missing required column(s) 'split', 'is_query'"], False),
    ("bad split value", _edit("split", "valid", "validation", 1), [], ["column 'split'", "not 'train' or 'validation'"], False),
    ("non-integer label", _edit("label", "3.5", "train", 1), [], ["column 'label'", "not integers", "'3.5'"], False),
    ("query/gallery flag on a train row", _edit("is_query", "True", "train", 1), [], ["column 'is_query'", "train row"], False),
    ("flag missing on a validation row", _edit("is_gallery", None, "validation", 1), [], ["column 'is_gallery'", "missing or non-boolean"], False),
    ("validation row neither query nor gallery", lambda df: _edit("is_gallery", "False", n=1)(_edit("is_query", "False", n=1)(df)), [], ["neither query nor gallery"], False),
    ("query label missing from the gallery", lambda df: _edit("is_gallery", "False", n=4)(df), [], ["query label", "without any gallery row"], False),
    ("missing image file", _edit("path", "images/nowhere.jpg", "train", 1), [], ["column 'path'", "not found", "nowhere.jpg"], False),
    ("bbox with x_1 >= x_2", lambda df: _box(10, 10, 0, 5)(df), [], ["x_1 >= x_2"], False),
    ("bbox with y_1 >= y_2", lambda df: _box(0, 5, 7, 3)(df), [], ["y_1 >= y_2"], False),
    ("negative bbox coordinate", lambda df: _box(-1, 5, 0, 5)(df), [], ["column 'x_1'", "non-negative integers"], False),
    ("only some bbox cells set", lambda df: _box(0, 5, 0, None)(df), [], ["only some of the four bbox cells"], False),
    ("label in several categories", _edit("category", "elsewhere", "train", 1), [], ["column 'category'", "several categories"], False),
    ("empty validation split", lambda df: df[df["split"] == "train"], [], ["no 'validation' rows"], False),
    ("corrupt image (check_images: true)", "corrupt", ["check_images=true"], ["cannot be decoded", "row 0"], True),
    ("unknown config key", None, ["max_epoch=3"], ["config key 'max_epoch': unknown key"], False),
    ("step scheduler that would never step", None, ["scheduling.scheduler_interval=step", "scheduling.scheduler_frequency=1000"], ["config key scheduling.scheduler_frequency=1000", "would never change"], False),
    ("fnmr@fmr buckets not a power of two", None, ["metric_args.fmr_bins=1000"], ["config key 'metric_args.fmr_bins'", "power of two"], False),
    ("more workers than the cluster has", None, ["ray.num_workers=4"], ["ray.num_workers=4", "needs 4 CPUs; the Ray cluster has 2"], True),
    ("more GPUs than the cluster has", None, ["ray.use_gpu=true"], ["ray.use_gpu=true", "needs that many GPUs; the Ray cluster has 0"], True),
]


def _box(x_1, x_2, y_1, y_2):
    def edit(df):
        df = df.astype({c: object for c in ("x_1", "x_2", "y_1", "y_2")})
        row = _rows(df, "train")[0]
        for column, value in zip(("x_1", "x_2", "y_1", "y_2"), (x_1, x_2, y_1, y_2)):
            df.loc[row, column] = value
        return df

    return edit


def run_case(case, base_root: str, tmp: str) -> tuple[int, str]:
    """Apply a case to a copy of the dataset, run jobs/train.py, return (exit status, stderr)."""
    import train as train_job

    _, edit, overrides, _, _ = case
    root = os.path.join(tmp, "data")
    shutil.copytree(base_root, root)
    csv = os.path.join(root, "df.csv")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if edit == "corrupt":
        df = _corrupt(root, df)
    elif edit is not None:
        df = edit(df)
    df.to_csv(csv, index=False)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = train_job.main(["--config", DEMO, "--quiet", f"dataset_root={root}", f"ray.storage_path={tmp}/runs", *TINY, *overrides])
    return rc, err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_it(case, tiny_demo, tmp_path, request):
    if case[4]:
        request.getfixturevalue("ray_session")
    rc, err = run_case(case, tiny_demo, str(tmp_path))
    assert rc == 2, err
    for fragment in case[3]:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs"), "a run started"


def markdown_table() -> str:
    """docs/bad_inputs.md: every case with the message it gets."""
    import tempfile

    from raymetric.data.demo import SIZES, ensure_demo
    from raymetric.ray_env import init_ray

    init_ray(num_cpus=2, quiet=True)
    lines = [
        "# Bad input, and what raymetric says",
        "",
        "Each row is a case of `tests/test_bad_inputs.py`, run on the tiny demo dataset with",
        "`python jobs/train.py --config configs/demo.yaml ...`; every one exits with status 2 before any",
        "worker starts. Regenerate with `.venv/bin/python -m tests.test_bad_inputs > docs/bad_inputs.md`.",
        "",
        "| bad input | message (stderr) |",
        "|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "tiny")
        ensure_demo(base, SIZES["tiny"])
        for i, case in enumerate(CASES):
            rc, err = run_case(case, base, os.path.join(tmp, str(i)))
            message = err.strip().replace(tmp, "<tmp>").replace("|", "\\|").replace("\n", "<br>")
            lines.append(f"| {case[0]} | `exit {rc}` {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")


@pytest.mark.ray
def test_an_image_that_fails_to_decode_in_training_stops_the_run_or_is_skipped_and_counted(ray_session, tiny_demo, tmp_path):
    """Without check_images the corrupt file is met by a worker: `error` names it, `skip` counts it."""
    import json

    import train as train_job

    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    df = pd.read_csv(root / "df.csv", dtype=str, keep_default_na=False)
    first_label = df.index[(df["split"] == "train") & (df["label"] == df.loc[0, "label"])]
    first_val = _rows(df, "validation")[0]
    for row in [*first_label, first_val]:  # every image of a label: each epoch draws every label
        with open(os.path.join(root, df.loc[row, "path"]), "wb") as f:
            f.write(b"not a JPEG")
    common = ["--config", DEMO, "--quiet", f"dataset_root={root}", f"ray.storage_path={tmp_path}/runs", *TINY,
              "max_epochs=1", "validate_untrained=false", "transforms_train.args.im_size=32", "transforms_val.args.im_size=32"]

    err = io.StringIO()
    with redirect_stderr(err):
        rc = train_job.main([*common, "ray.name=error"])
    assert rc == 1
    assert "error: training failed:" in err.getvalue() and "ImageReadError" in err.getvalue()
    named = [row for row in first_label if f"row {row}:" in err.getvalue()]
    assert named and os.path.join(root, df.loc[named[0], "path"]) in err.getvalue()

    assert train_job.main([*common, "ray.name=skip", "on_bad_image=skip"]) == 0
    with open(tmp_path / "runs" / "skip" / "history.jsonl") as f:
        epochs = [json.loads(line) for line in f if '"train/loss"' in line]
    assert epochs[-1]["train/bad_images"] >= 1  # the label's items are drawn in every epoch
    assert epochs[-1]["val/n_bad_images"] == 1  # left out of validation, and counted
    assert epochs[-1]["val/n_gallery"] == (df["split"] == "validation").sum() - 1

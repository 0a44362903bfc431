"""The predict job and the search API: embeddings on Ray Data, a faiss index, top-k for new images.

The oracle for the index is the stand-alone validation of the same checkpoint on the same rows: searching
the index with each validation image (read and cropped from its file, embedded by the search API in this
process) must find a neighbour of the query's own label first exactly as often as validation's ``cmc@1``
says. The Ray Data embeddings equal the validation job's; IVF with every list probed equals the flat index.
"""

import importlib.util
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from raymetric.config import ConfigError, PredictConfig, TrainConfig
from raymetric.data.csv import DatasetError
from raymetric.embeddings import read_embeddings
from raymetric.predict import ImageIndex, build_index, predict_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(name: str, capsys, *argv) -> list[str]:
    spec = importlib.util.spec_from_file_location(f"job_{name}", os.path.join(ROOT, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


def write_run(tiny_demo: str, run) -> TrainConfig:
    """A run folder with one checkpoint of a (randomly initialised) extractor, as training writes it."""
    from raymetric.extractors import build_extractor

    cfg = TrainConfig(dataset_root=tiny_demo,
                      extractor={"name": "timm", "args": {"arch": "resnet10t", "embedding_size": 16}},
                      transforms_val={"name": "norm_resize_torch", "args": {"im_size": 32}})
    torch.manual_seed(3)
    model = build_extractor(cfg.extractor.name, cfg.extractor.args).eval()
    ckpt = run / "checkpoint_2026-01-01_00-00-00.000001"
    os.makedirs(ckpt)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json")}, ckpt / "state.pt")
    return cfg


def top1_rate(hit_rows: np.ndarray, labels: np.ndarray, sequences: np.ndarray, query_rows: np.ndarray) -> float:
    """Brute-force cmc@1 from full rankings: the first hit that is not the query itself nor of its sequence."""
    hits, counted = 0, 0
    for q, ranking in zip(query_rows, hit_rows):
        def allowed(g):
            return g != q and not (sequences[q] is not None and sequences[g] == sequences[q])

        if not any(labels[g] == labels[q] and allowed(g) for g in range(len(labels))):
            continue  # no relevant item: excluded, as validation does by default
        counted += 1
        first = next(g for g in ranking if g >= 0 and allowed(g))
        hits += labels[first] == labels[q]
    return hits / counted


@pytest.mark.ray
def test_predict_index_finds_neighbours_at_the_validation_rate(ray_session, tiny_demo, tmp_path, capsys):
    from raymetric.data.dataset import read_image

    run = tmp_path / "run"
    write_run(tiny_demo, run)
    run_job("validate", capsys, "--quiet", "--checkpoint", str(run), f"ray.storage_path={tmp_path}", "ray.name=val",
            "ray.num_workers=1", "bs_val=8", "picture.n_queries=0")
    metrics = json.load(open(tmp_path / "val" / "metrics.json"))
    out = run_job("predict", capsys, "--quiet", "--checkpoint", str(run), "--dataframe",
                  os.path.join(tiny_demo, "df.csv"), "split=validation", f"ray.storage_path={tmp_path}",
                  "ray.name=pred", "ray.num_workers=1", "bs=8")
    pred = tmp_path / "pred"
    assert out[-1] == f"run: {pred}"
    for name in ("embeddings.parquet", "index.faiss", "index.json", "config.yaml", "extractor/extractor.json"):
        assert os.path.exists(pred / name), name

    # The Ray Data embeddings are the validation job's, row for row.
    table, validated = read_embeddings(pred / "embeddings.parquet"), read_embeddings(tmp_path / "val" / "embeddings.parquet")
    np.testing.assert_allclose(table.embeddings, validated.embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.labels, validated.labels)

    # New images through the search API: the files, read and cropped as the dataset says.
    frame = pd.read_csv(os.path.join(tiny_demo, "df.csv"))
    frame = frame[frame["split"] == "validation"].reset_index(drop=True)
    images = []
    for _, row in frame.iterrows():
        box = None if pd.isna(row["x_1"]) else [int(row[c]) for c in ("x_1", "y_1", "x_2", "y_2")]
        images.append(read_image(os.path.join(tiny_demo, row["path"]), box))
    index = ImageIndex.load(str(pred))
    np.testing.assert_allclose(index.embed(images), table.embeddings, rtol=1e-4, atol=1e-5)
    hits = index.search(images, k=len(table))
    assert (hits.rows[:, 0] == np.arange(len(table))).all()  # each image finds itself first
    assert np.all(np.diff(hits.distances, axis=1) >= 0)
    sequences = table.sequences
    rate = top1_rate(hits.rows, table.labels, sequences, np.arange(len(table)))
    assert rate == pytest.approx(metrics["cmc@1"], abs=1e-9)
    assert 0 < rate < 1  # the check can fail both ways on this data

    # The command line: JSON per query, the query's own file first at distance ~0 (a row without a box).
    plain = int(np.flatnonzero(frame["x_1"].isna())[0])
    lines = run_job("search", capsys, "--index", str(pred), os.path.join(tiny_demo, frame.at[plain, "path"]),
                    "--k", "3", "--json")
    found = json.loads(lines[0])["hits"]
    assert [h["rank"] for h in found] == [1, 2, 3]
    assert found[0]["row"] == plain and found[0]["distance"] < 1e-3
    assert found[0]["label"] == int(frame.at[plain, "label"])
    spec = importlib.util.spec_from_file_location("job_search_errors", os.path.join(ROOT, "jobs", "search.py"))
    search_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search_job)
    assert search_job.main(["--index", str(pred), str(tmp_path / "missing.jpg")]) == 2
    assert search_job.main(["--index", str(tmp_path), os.path.join(tiny_demo, frame.at[plain, "path"])]) == 2
    assert "cannot read image" in capsys.readouterr().err

    # A folder, the export folder as the extractor, an IVF index probing every list: the same neighbours.
    folder = os.path.join(tiny_demo, "images", "validation")
    run_job("predict", capsys, "--quiet", "--checkpoint", str(pred / "extractor"), "--images", folder,
            f"ray.storage_path={tmp_path}", "ray.name=folder", "ray.num_workers=1", "index.type=ivf",
            "index.nlist=2", "index.nprobe=2")
    folder_index = ImageIndex.load(str(tmp_path / "folder"))
    # A transform given to predict is the one recorded, with its input size, from an export folder too.
    run_job("predict", capsys, "--quiet", "--checkpoint", str(pred / "extractor"), "--images", folder,
            f"ray.storage_path={tmp_path}", "ray.name=resized", "ray.num_workers=1", "index.type=none",
            "transforms={name: norm_resize_torch, args: {im_size: 40}}")
    meta = json.load(open(tmp_path / "resized" / "extractor" / "extractor.json"))
    assert meta["transforms"]["args"] == {"im_size": 40} and meta["input_size"] == [3, 40, 40]
    paths = folder_index.table.paths
    assert list(paths) == sorted(paths) and len(paths) == len(frame)
    assert (folder_index.table.labels == -1).all() and folder_index.table.is_gallery.all()
    by_path = {p: i for i, p in enumerate(paths)}
    same = [(i, by_path[os.path.join(tiny_demo, p)]) for i, p in enumerate(frame["path"]) if pd.isna(frame.at[i, "x_1"])]
    mine, theirs = map(list, zip(*same))
    np.testing.assert_allclose(folder_index.table.embeddings[theirs], table.embeddings[mine], rtol=1e-4, atol=1e-5)
    ivf = folder_index.search(folder_index.table.embeddings, k=5)
    flat = build_index(folder_index.table.embeddings, np.arange(len(paths)), "flat", 1, 1).search(
        folder_index.table.embeddings, 5)[1]
    np.testing.assert_array_equal(ivf.rows, flat)


def test_ivf_probing_every_list_equals_flat():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    ids = np.arange(1000, 1500)
    q = rng.standard_normal((20, 8)).astype(np.float32)
    d_flat, i_flat = build_index(x, ids, "flat", 1, 1).search(q, 10)
    d_ivf, i_ivf = build_index(x, ids, "ivf", 8, 8).search(q, 10)
    np.testing.assert_array_equal(i_ivf, i_flat)
    np.testing.assert_allclose(d_ivf, d_flat, rtol=1e-5)
    brute = ((q[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(i_flat, ids[np.argsort(brute, axis=1, kind="stable")[:, :10]])


def _cfg(**kw) -> PredictConfig:
    return PredictConfig(checkpoint="unused", **kw)


def test_predict_inputs_are_checked_on_the_driver(tiny_demo, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of config keys images"):
        predict_frame(_cfg())
    with pytest.raises(ConfigError, match="config key images: no image files"):
        predict_frame(_cfg(images=str(tmp_path)))
    (tmp_path / "plain.csv").write_text("file\nx.jpg\n")
    with pytest.raises(DatasetError, match="missing required column 'path'"):
        predict_frame(_cfg(dataframe=str(tmp_path / "plain.csv")))
    (tmp_path / "plain.csv").write_text("path\nimages/validation/missing.jpg\n" + "".join(
        f"{p}\n" for p in pd.read_csv(os.path.join(tiny_demo, "df.csv"))["path"][:2]))
    with pytest.raises(DatasetError, match=r"1 file not found.*row 0"):
        predict_frame(_cfg(dataframe=str(tmp_path / "plain.csv"), dataset_root=tiny_demo))
    with pytest.raises(ConfigError, match="config key checkpoint"):
        from raymetric.predict import prepare_predict

        prepare_predict(PredictConfig(checkpoint=str(tmp_path / "nothing"), images=tiny_demo))


def test_plain_csv_and_oml_splits(tiny_demo, tmp_path):
    df = pd.read_csv(os.path.join(tiny_demo, "df.csv"))
    (tmp_path / "plain.csv").write_text("path\n" + "".join(f"{p}\n" for p in df["path"][:3]))
    frame = predict_frame(_cfg(dataframe=str(tmp_path / "plain.csv"), dataset_root=tiny_demo))
    assert list(frame["path"]) == [os.path.join(tiny_demo, p) for p in df["path"][:3]]
    train = predict_frame(_cfg(dataframe=os.path.join(tiny_demo, "df.csv"), split="train"))
    assert len(train) == (df["split"] == "train").sum()
    from raymetric.predict import table_of

    table = table_of(train, np.zeros((len(train), 2), np.float32))
    assert table.is_query.all() and table.is_gallery.all()  # train rows: a search collection


def test_plain_csv_columns_are_parsed_and_bad_cells_named(tiny_demo, tmp_path):
    df = pd.read_csv(os.path.join(tiny_demo, "df.csv"))
    paths = list(df["path"][:3])
    (tmp_path / "flags.csv").write_text("path,label,is_query,is_gallery\n"
                                        f"{paths[0]},7.0,no,yes\n{paths[1]},,yes,no\n{paths[2]},3,,\n")
    frame = predict_frame(_cfg(dataframe=str(tmp_path / "flags.csv"), dataset_root=tiny_demo))
    from raymetric.predict import table_of

    table = table_of(frame, np.zeros((3, 2), np.float32))
    assert table.labels.tolist() == [7, -1, 3]
    assert table.is_query.tolist() == [False, True, True] and table.is_gallery.tolist() == [True, False, True]
    (tmp_path / "bad.csv").write_text(f"path,label,is_query\n{paths[0]},cat,maybe\n{paths[1]},2,true\n")
    with pytest.raises(DatasetError, match=r"(?s)column 'label': 1 row not integers: row 0 \('cat'\).*"
                                           r"column 'is_query': 1 row not true/false: row 0 \('maybe'\)"):
        predict_frame(_cfg(dataframe=str(tmp_path / "bad.csv"), dataset_root=tiny_demo))
    (tmp_path / "cat.csv").write_text(f"path,category\n{paths[0]},shoes\n{paths[1]},\n")
    from raymetric.embeddings import EmbeddingsError

    with pytest.raises(EmbeddingsError, match=r"column 'category': empty in 1 row\(s\): 1"):
        table_of(predict_frame(_cfg(dataframe=str(tmp_path / "cat.csv"), dataset_root=tiny_demo)),
                 np.zeros((2, 2), np.float32))

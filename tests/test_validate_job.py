"""jobs/validate.py end to end on a real local Ray (2 CPUs): Ray Data sharded search and Ray Data inference.

1. ``--embeddings``: the same table scored with the gallery searched in-process and, with a tiny
   memory budget, sharded over Ray Data: identical metrics and top-k.
2. A checkpoint (a run folder, its latest checkpoint) on the tiny demo data: the Ray Data actor pool's
   embeddings equal the extractor run in this process on the same images, and the run folder holds
   every output.
"""

import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
import torch

from raymetric.embeddings import EmbeddingsTable, read_embeddings, write_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))


def run_job(capsys, *argv) -> str:
    import validate as validate_job

    assert validate_job.main(["--quiet", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("run: ")
    return out


@pytest.mark.ray
def test_embeddings_job_sharded_over_ray_data_equals_in_process(ray_session, tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 60, n)
    emb = rng.normal(size=(60, 16))[labels] + rng.normal(size=(n, 16))
    emb[7] = emb[100]  # a tie across shards
    sequences = np.array([None if i % 5 else f"s{i % 11}" for i in range(n)], object)
    table = EmbeddingsTable(emb.astype(np.float32), labels, rng.random(n) < 0.8, np.ones(n, bool),
                            np.array(["a", "b", "c"])[labels % 3], sequences)
    write_embeddings(table, tmp_path / "e.parquet")
    common = ["--embeddings", str(tmp_path / "e.parquet"), f"ray.storage_path={tmp_path}",
              "metric_args.fmr_vals=[0.1]", "metric_args.fmr_bins=1024", "picture.n_queries=3"]
    local = run_job(capsys, *common, "ray.name=local")
    sharded = run_job(capsys, *common, "ray.name=sharded", "retrieval.memory_budget_mb=0.02")
    assert "searched: in-process" in local and sharded[-2].startswith("searched: ray-data (")
    assert int(sharded[-2].split("(")[1].split()[0]) >= 3  # really several shards

    metrics = [json.load(open(tmp_path / name / "metrics.json")) for name in ("local", "sharded")]
    assert metrics[0] == metrics[1] and "c/cmc@1" in metrics[0] and "fnmr@fmr=0.1" in metrics[0]
    tables = [pq.read_table(tmp_path / name / "topk.parquet").to_pydict() for name in ("local", "sharded")]
    assert list(tables[0]) == list(tables[1])
    for column in tables[0]:  # per-query precision is NaN without relevant items (OML's value): equal_nan
        np.testing.assert_array_equal(np.array(tables[0][column]), np.array(tables[1][column]))
    assert os.path.getsize(tmp_path / "sharded" / "retrieval.png") > 0


@pytest.mark.ray
def test_checkpoint_job_embeds_with_a_ray_data_actor_pool(ray_session, tiny_demo, tmp_path, capsys):
    from raymetric.config import TrainConfig
    from raymetric.data.csv import load_dataset_csv
    from raymetric.data.dataset import ImageDataset
    from raymetric.data.transforms import build_transforms
    from raymetric.extractors import build_extractor
    from raymetric.visualize import picture_size

    cfg = TrainConfig(dataset_root=tiny_demo, extractor={"name": "timm", "args": {"arch": "resnet10t", "embedding_size": 16}},
                      transforms_val={"name": "norm_resize_torch", "args": {"im_size": 32}}, precision="bf16")
    run = tmp_path / "train_run"
    models = []
    for seed, stamp in ((1, "2026-01-01_00-00-00.000001"), (2, "2026-01-02_00-00-00.000001")):  # the second is the latest
        torch.manual_seed(seed)
        model = build_extractor(cfg.extractor.name, cfg.extractor.args).eval()
        os.makedirs(run / f"checkpoint_{stamp}")
        torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json")}, run / f"checkpoint_{stamp}" / "state.pt")
        models.append(model)

    out = run_job(capsys, "--checkpoint", str(run), f"ray.storage_path={tmp_path}", "ray.name=val", "ray.num_workers=1",
                  "bs_val=5", "picture.n_queries=4", "picture.tile_size=48")
    run_dir = tmp_path / "val"
    assert out[-1] == f"run: {run_dir}"
    for name in ("config.yaml", "metrics.json", "topk.parquet", "retrieval.png", "embeddings.parquet"):
        assert os.path.exists(run_dir / name), name
    # The checkpoint's precision, as its training validated with: bf16 autocast on GPU; this CPU runs fp32.
    assert yaml.safe_load(open(run_dir / "config.yaml"))["precision"] == "bf16"

    df = load_dataset_csv(os.path.join(tiny_demo, "df.csv"), tiny_demo)
    frame = df[df["split"] == "validation"].reset_index(drop=True)
    dataset = ImageDataset(frame, build_transforms("norm_resize_torch", {"im_size": 32}))
    with torch.no_grad():
        expected = models[1](torch.stack([dataset[i]["image"] for i in range(len(dataset))])).numpy()
    table = read_embeddings(run_dir / "embeddings.parquet")
    np.testing.assert_allclose(table.embeddings, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(table.labels, frame["label"].to_numpy())
    assert table.sequences is not None and table.categories is not None

    metrics = json.load(open(run_dir / "metrics.json"))
    assert metrics["n_queries"] == metrics["n_gallery"] == 24 and "pcf@0.5" in metrics
    from PIL import Image

    assert Image.open(run_dir / "retrieval.png").size == picture_size(4, 5, 48)

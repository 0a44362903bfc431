"""The stand-alone validation's pure parts: checkpoint lookup, driver checks, scoring against brute force, outputs.

The Ray parts (Ray Data inference and sharded search) are in tests/test_validate_job.py.
"""

import glob
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raymetric.config import ConfigError, MetricArgs, RetrievalConfig, TrainConfig, ValidateConfig, build_config
from raymetric.embeddings import EmbeddingsError, EmbeddingsTable, write_embeddings
from raymetric.metrics import retrieval_metrics
from raymetric.validate import (
    draw_picture,
    load_checkpoint,
    prepare_validation,
    resolve_checkpoint,
    score_table,
    search_memory_bytes,
    write_topk_table,
)
from raymetric.search import SearchSettings
from raymetric.visualize import picture_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = MetricArgs(cmc_top_k=[1, 4], precision_top_k=[3], map_top_k=[4], pcf_variance=[])


def make_table(n=80, dim=6, seed=0, paths=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 16, n)
    emb = rng.normal(size=(16, dim))[labels] + rng.normal(size=(n, dim))
    emb[3] = emb[30]  # a duplicate: a tie at distance 0
    is_query = rng.random(n) < 0.7
    is_gallery = ~is_query | (rng.random(n) < 0.6)
    sequences = np.array([None if i % 3 else f"s{i % 7}" for i in range(n)], object)
    categories = np.array(["x", "y"])[labels % 2]
    return EmbeddingsTable(emb.astype(np.float32), labels, is_query, is_gallery, categories, sequences, paths)


def brute_force_metrics(t: EmbeddingsTable, metric_args: MetricArgs) -> dict:
    """Per query: float64 distances to every gallery item not skipped, ranked by (distance, row), then OML's metrics."""
    codes = t.sequence_codes()
    k = metric_args.max_k
    relevant_rows, n_retrieved, n_gt = [], [], []
    for q in np.flatnonzero(t.is_query):
        keep = [g for g in np.flatnonzero(t.is_gallery) if g != q and not (codes[q] != -1 and codes[g] == codes[q])]
        d = np.sqrt(((t.embeddings[keep].astype(np.float64) - t.embeddings[q]) ** 2).sum(1)).astype(np.float32)
        order = np.array(keep)[np.lexsort((keep, d))][:k]
        hits = [t.labels[g] == t.labels[q] for g in order]
        relevant_rows.append(hits + [False] * (k - len(hits)))
        n_retrieved.append(len(order))
        n_gt.append(sum(t.labels[g] == t.labels[q] for g in keep))
    return retrieval_metrics(np.array(relevant_rows), n_retrieved, n_gt, cmc_top_k=metric_args.cmc_top_k,
                             precision_top_k=metric_args.precision_top_k, map_top_k=metric_args.map_top_k,
                             categories=t.categories[t.is_query])


@pytest.mark.parametrize("retrieval", [{}, {"score_dtype": "float32", "extra_candidates": 0, "query_chunk": 5},
                                       {"backend": "faiss"}])
def test_score_table_equals_brute_force(retrieval):
    t = make_table()
    out = score_table(t, METRICS, RetrievalConfig(**retrieval))
    expected = brute_force_metrics(t, METRICS)
    assert {k: v for k, v in out.metrics.items() if k in expected} == pytest.approx(expected, rel=1e-12)
    assert out.metrics["n_gallery"] == t.is_gallery.sum() and out.searched_with == "in-process"
    assert len(out.query_rows) == t.is_query.sum() and set(out.per_query) == {"cmc@1", "cmc@4", "precision@3", "map@4"}


def test_topk_table_and_picture(tmp_path):
    t = make_table(paths=np.array([None] * 80, object))
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.save(tmp_path / "red.png")
    t.paths[0] = str(tmp_path / "red.png")
    out = score_table(t, METRICS, RetrievalConfig())
    write_topk_table(str(tmp_path / "topk.parquet"), t, out, width=3)
    table = pq.read_table(tmp_path / "topk.parquet").to_pydict()
    assert table["query"] == out.query_rows.tolist()
    assert all(len(r) == 3 for r in table["retrieved"]) and table["cmc@1"] == out.per_query["cmc@1"].tolist()
    q = 5
    for g, relevant, d in zip(table["retrieved"][q], table["relevant"][q], table["distance"][q]):
        assert relevant == (t.labels[g] == t.labels[table["query"][q]])
        exact = np.sqrt(((t.embeddings[g].astype(np.float64) - t.embeddings[table["query"][q]]) ** 2).sum())
        assert d == pytest.approx(exact, rel=1e-6)

    picture_cfg = ValidateConfig(picture={"n_queries": 4, "n_retrieved": 3, "tile_size": 64}).picture
    picture = draw_picture(t, out, picture_cfg, METRICS)
    assert picture.size == picture_size(4, 3, 64)
    # Worst first by the first metric, queries without relevant items last.
    values = torch.where(out.topk.n_gt > 0, out.per_query["cmc@1"], math.inf)
    assert sorted(values.tolist())[:4] == [0.0] * 4


def test_resolve_checkpoint_file_folder_and_run(tmp_path):
    for name in ("checkpoint_2026-01-01_00-00-00.000001", "checkpoint_2026-01-02_00-00-00.000001"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
    latest = str(tmp_path / "checkpoint_2026-01-02_00-00-00.000001" / "state.pt")
    assert resolve_checkpoint(str(tmp_path)) == latest
    assert resolve_checkpoint(os.path.dirname(latest)) == latest == resolve_checkpoint(latest)
    (tmp_path / "best").mkdir()  # the best checkpoint, when training kept one, comes first
    (tmp_path / "best" / "state.pt").write_bytes(b"x")
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "best" / "state.pt")
    with pytest.raises(ConfigError, match="config key checkpoint: no such file or directory"):
        resolve_checkpoint(str(tmp_path / "nothing"))


def test_checkpoint_that_is_not_raymetric_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ConfigError, match="is not a raymetric checkpoint"):
        load_checkpoint(str(tmp_path / "state.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_checkpoint(str(tmp_path / "broken.pt"))


def validate_cfg(**raw):
    return build_config(raw, ValidateConfig)


def test_driver_checks_name_the_key(tmp_path):
    write_embeddings(make_table(), tmp_path / "e.parquet")
    e = str(tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match="exactly one of config keys checkpoint"):
        prepare_validation(validate_cfg())
    with pytest.raises(ConfigError, match="exactly one of config keys checkpoint"):
        prepare_validation(validate_cfg(embeddings=e, checkpoint=str(tmp_path)))
    with pytest.raises(ConfigError, match="config key dataset_root: not used with embeddings"):
        prepare_validation(validate_cfg(embeddings=e, dataset_root="data"))
    with pytest.raises(ConfigError, match="config key precision: not used with embeddings"):
        prepare_validation(validate_cfg(embeddings=e, precision="bf16"))
    with pytest.raises(ConfigError, match="config key picture.metric: 'cmc@7' is not a per-query metric"):
        prepare_validation(validate_cfg(embeddings=e, picture={"metric": "cmc@7"}))
    with pytest.raises(ConfigError, match="retrieval.postprocessing.0.name: unknown name"):
        prepare_validation(validate_cfg(embeddings=e, retrieval={"postprocessing": [{"name": "nope"}]}))
    with pytest.raises(EmbeddingsError, match="not found"):
        prepare_validation(validate_cfg(embeddings=str(tmp_path / "missing.parquet")))
    with pytest.raises(ConfigError, match="config key 'retrieval.score_dtype'"):
        validate_cfg(embeddings=e, retrieval={"score_dtype": "float16"})
    plan = prepare_validation(validate_cfg(embeddings=e))
    assert plan.cfg.metric_args == MetricArgs() and os.path.isabs(plan.cfg.ray.storage_path)


def test_checkpoint_plan_takes_the_training_config(tmp_path, tiny_demo):
    train = TrainConfig(dataset_root=tiny_demo, metric_args=MetricArgs(cmc_top_k=[2]),
                        transforms_val={"name": "norm_resize_torch", "args": {"im_size": 32}})
    torch.save({"model": {}, "config": train.model_dump(mode="json")}, tmp_path / "state.pt")
    plan = prepare_validation(validate_cfg(checkpoint=str(tmp_path)))
    assert plan.cfg.metric_args.cmc_top_k == [2] and plan.cfg.dataset_root == tiny_demo
    assert plan.cfg.transforms_val.args == {"im_size": 32}
    assert len(plan.frame) == 24 and set(plan.frame["split"]) == {"validation"}
    with pytest.raises(Exception, match="df.csv"):
        prepare_validation(validate_cfg(checkpoint=str(tmp_path), dataset_root=str(tmp_path)))


def test_memory_estimate_grows_with_the_gallery():
    small, large = make_table(n=50), make_table(n=500)
    settings = SearchSettings(k=5)
    assert 0 < search_memory_bytes(small, settings) < search_memory_bytes(large, settings)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "validate*.yaml"))), ids=os.path.basename)
def test_validate_configs_load_and_check(path):
    from raymetric.config import load_config
    from raymetric.validate import check_validate_config

    cfg = load_config(path, schema=ValidateConfig)
    check_validate_config(cfg, cfg.metric_args or MetricArgs())
    with open(path) as f:
        assert f.readline().startswith("# python jobs/validate.py"), "each config opens with its launch command"

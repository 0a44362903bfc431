"""jobs/train.py end to end on tiny demo data with 2 Ray Train workers (a real local Ray)."""

import json
import os
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))

TINY = [
    "sampler.args.n_labels=4",
    "sampler.args.n_instances=2",
    "transforms_train.args.im_size=32",
    "transforms_val.args.im_size=32",
    "extractor.args.arch=resnet10t",
    "demo_data=null",
    "validate_untrained=true",
    "scheduling.scheduler.args.T_max=2",
]


@pytest.mark.ray
def test_train_job_writes_the_run_directory(ray_session, tiny_demo, tmp_path, capsys):
    import train as train_job

    rc = train_job.main(
        ["--config", os.path.join(ROOT, "configs", "demo.yaml"), f"dataset_root={tiny_demo}",
         f"ray.storage_path={tmp_path}", "ray.name=e2e", "max_epochs=2", "valid_period=1", *TINY]
    )
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    run_dir = os.path.join(tmp_path, "e2e")
    assert out[-1] == f"run: {run_dir}"

    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert cfg["max_epochs"] == 2 and cfg["ray"]["num_workers"] == 2 and cfg["dataset_root"] == tiny_demo

    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    for key in ("cmc@1", "cmc@5", "precision@5", "map@5", "n_queries", "n_gallery", "n_queries_without_gt"):
        assert key in metrics
    assert metrics["n_queries"] == metrics["n_gallery"] == 24  # tiny: 6 validation labels x 4 images
    categories = {k.split("/")[0] for k in metrics if "/" in k}
    assert categories and all(f"{c}/cmc@1" in metrics for c in categories)
    assert any(line.strip().startswith("cmc@1") for line in out)

    history = [json.loads(line) for line in open(os.path.join(run_dir, "history.jsonl"))]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all("train/loss" in h for h in history[1:]) and all("val/cmc@1" in h for h in history)
    assert history[-1]["val/cmc@1"] == metrics["cmc@1"]
    checkpoints = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_2")]
    assert len(checkpoints) == 2
    assert os.path.exists(os.path.join(run_dir, sorted(checkpoints)[-1], "state.pt"))


def test_bad_config_fails_before_any_worker(tmp_path, capsys):
    import train as train_job

    rc = train_job.main(["--config", os.path.join(ROOT, "configs", "demo.yaml"), "optimizer.args.lrr=1"])
    assert rc == 2
    assert "optimizer.args: unknown argument(s) ['lrr']" in capsys.readouterr().err


def test_bad_dataset_fails_before_any_worker(tmp_path, capsys):
    import train as train_job

    (tmp_path / "df.csv").write_text("label,path,split,is_query,is_gallery\n1,a.jpg,tran,,\n")
    rc = train_job.main(["--config", os.path.join(ROOT, "configs", "demo.yaml"), f"dataset_root={tmp_path}", "demo_data=null"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "column 'split'" in err and "row 0" in err

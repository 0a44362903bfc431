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
         f"ray.storage_path={tmp_path}", "ray.name=e2e", "max_epochs=2", "valid_period=1", *TINY,
         "log_images=true", "picture.n_queries=4", "picture.tile_size=48", "log_every_n_steps=2"]
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
    # log_every_n_steps=2: rank 0's loss terms and learning rate at every second optimizer step.
    steps = [r for h in history for r in h.get("steps", [])]
    assert len(steps) >= 2 and [r["step"] for r in steps] == list(range(2, 2 * len(steps) + 1, 2))
    assert all({"loss", "active_triplets", "lr"} <= set(r) for r in steps)
    checkpoints = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_2")]
    assert len(checkpoints) == 2
    assert os.path.exists(os.path.join(run_dir, sorted(checkpoints)[-1], "state.pt"))

    _check_standalone_validation_agrees(run_dir, metrics, tiny_demo)
    _check_logs_progress_and_export(run_dir, out, metrics, categories, tmp_path)
    _check_new_run_from_a_checkpoint(run_dir, tiny_demo, tmp_path)


def _check_new_run_from_a_checkpoint(run_dir, tiny_demo, tmp_path):
    """resume_from=<checkpoint folder>: a new run continues that state for one more epoch, and its best
    checkpoint is its own (the old run's best value does not carry over)."""
    import train as train_job

    from raymetric.checkpoint import load_state

    latest = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_2"))[-1]
    assert train_job.main(
        ["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--quiet", f"dataset_root={tiny_demo}",
         f"ray.storage_path={tmp_path}", "ray.name=continued", "max_epochs=3", "valid_period=1", *TINY,
         f"resume_from={os.path.join(run_dir, latest)}"]
    ) == 0
    new_dir = os.path.join(tmp_path, "continued")
    history = [json.loads(line) for line in open(os.path.join(new_dir, "history.jsonl"))]
    assert [h["epoch"] for h in history] == [3]  # epochs 1-2 came with the state
    best = load_state(os.path.join(new_dir, "best", "state.pt"))
    assert best["best_epoch"] == 3 and best["best"] == history[0]["val/cmc@1"]


def _check_standalone_validation_agrees(run_dir, metrics, tiny_demo):
    """The last checkpoint, embedded in this process and scored by the stand-alone code: training's metrics.

    Each worker validated its shard with rank 0's BatchNorm statistics, which are the checkpoint's.
    """
    import torch

    from raymetric.config import MetricArgs, RetrievalConfig
    from raymetric.data.csv import load_dataset_csv
    from raymetric.data.dataset import ImageDataset
    from raymetric.data.transforms import build_transforms
    from raymetric.export import extractor_from_checkpoint
    from raymetric.validate import score_table, table_from_frame

    model, cfg = extractor_from_checkpoint(run_dir, which="latest")
    df = load_dataset_csv(os.path.join(tiny_demo, "df.csv"), tiny_demo)
    frame = df[df["split"] == "validation"].reset_index(drop=True)
    dataset = ImageDataset(frame, build_transforms(cfg["transforms_val"]["name"], cfg["transforms_val"]["args"]))
    with torch.no_grad():
        emb = model(torch.stack([dataset[i]["image"] for i in range(len(dataset))])).numpy()
    expected = score_table(table_from_frame(frame, emb), MetricArgs(**cfg["metric_args"]),
                           RetrievalConfig(**cfg["retrieval"])).metrics
    assert metrics == pytest.approx(expected, abs=1e-6)


def _check_logs_progress_and_export(run_dir, out, metrics, categories, tmp_path):
    """What the same run shows around training: TensorBoard events, progress lines, the exported extractor."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raymetric.export import export_extractor, extractor_from_checkpoint, load_exported

    # TensorBoard events (the default logger), read with TensorBoard's own reader; "@" is logged as "/".
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"),
                              size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/active_triplets", "train/pos_dist", "train/neg_dist", "train/lr",
            "train/images_per_s", "val/cmc/1", "val/cmc/5", "val/precision/5", "val/map/5"} <= tags
    assert all(f"val/{c}/cmc/1" in tags for c in categories)
    assert [e.step for e in events.Scalars("val/cmc/1")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    history = [json.loads(line) for line in open(os.path.join(run_dir, "history.jsonl"))]
    steps = [r for h in history for r in h.get("steps", [])]
    logged = events.Scalars("train_step/loss")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in steps])
    assert events.Scalars("val/cmc/1")[-1].value == pytest.approx(metrics["cmc@1"])
    assert "config/text_summary" in events.Tags()["tensors"]
    # log_images: the retrieval picture of every validation (4 worst queries, 5 retrieved, 48 px tiles).
    from raymetric.visualize import picture_size

    width, height = picture_size(4, 5, 48)
    assert [(e.step, e.width, e.height) for e in events.Images("val/retrieval")] == [(s, width, height) for s in (0, 1, 2)]
    assert sorted(os.listdir(os.path.join(run_dir, "pictures"))) == [f"retrieval_epoch_000{s}.png" for s in (0, 1, 2)]

    # The driver's progress lines: one per report, no Ray log lines in between.
    assert out[0].startswith("run directory: ")
    assert out[1].startswith("epoch 0/2  untrained  val/cmc@1")
    assert out[2].startswith("epoch 1/2  loss ") and "img/s" in out[2] and "eta" in out[2]
    assert out[3].startswith("epoch 2/2  loss ") and "val/cmc@1" in out[3]

    # The trained extractor alone: exported, reloaded, the same embeddings.
    original, _ = extractor_from_checkpoint(run_dir)
    images = torch.randn(3, 3, 32, 32)
    export_extractor(run_dir, str(tmp_path / "export"), formats=["state_dict", "torchscript"])
    with torch.no_grad():
        expected = original(images)
        for fmt in ("state_dict", "torchscript"):
            model, _ = load_exported(str(tmp_path / "export"), fmt=fmt)
            torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)


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

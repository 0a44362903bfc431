"""Loggers (TensorBoard, MLflow), the controller-side callback and the driver's progress line, without Ray.

TensorBoard files are read back with TensorBoard's own reader; MLflow runs with MLflow's client.
tests/test_train_job.py checks the TensorBoard events of a real Ray Train run.
"""

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from raymetric.config import ConfigError, check_config, load_config
from raymetric.loggers import TensorBoardLogger, build_logger
from raymetric.progress import LoggerCallback, ProgressPrinter, watch_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")

REPORTS = [  # as rank 0 reports them: the validation before training, then two epochs
    {"epoch": 0, "val/cmc@1": 0.1, "val/cross/cmc@1": 0.05},
    {"epoch": 1, "train/loss": 0.7, "train/active_triplets": 0.9, "train/pos_dist": 1.1, "train/neg_dist": 1.2,
     "train/lr": 1e-3, "train/images_per_s": 80.0, "best/cmc@1": float("nan"),
     "steps": [{"step": 1, "loss": 0.71}, {"step": 2, "loss": 0.69}]},
    {"epoch": 2, "train/loss": 0.6, "train/active_triplets": 0.8, "train/pos_dist": 1.0, "train/neg_dist": 1.3,
     "train/lr": 5e-4, "train/images_per_s": 90.0, "val/cmc@1": 0.3, "val/cross/cmc@1": 0.2, "best/cmc@1": 0.3},
]


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _picture(path, size=(30, 20)):
    Image.fromarray(np.full((size[1], size[0], 3), 200, dtype=np.uint8)).save(path)
    return str(path)


def test_tensorboard_events_hold_the_reported_metrics(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_params({"optimizer": {"name": "adam", "args": {"lr": 0.001}}})
    picture = _picture(tmp_path / "worst.png")
    for report in REPORTS:
        logger.log_report(report | ({"images": {"val/worst_queries": picture}} if "val/cmc@1" in report else {}),
                          log_images=True)
    logger.close()

    acc = read_events(str(tmp_path / "tensorboard"))
    tags = acc.Tags()
    # val/cmc@1 is logged as val/cmc/1: TensorBoard tags take no "@".
    assert {"train/loss", "train/active_triplets", "train/pos_dist", "train/neg_dist", "train/lr",
            "train/images_per_s", "val/cmc/1", "val/cross/cmc/1", "train_step/loss"} <= set(tags["scalars"])
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/cmc/1")] == [(0, 0.1), (2, 0.3)]
    # NaN (no best value before the first validation) is left out.
    assert [e.step for e in acc.Scalars("best/cmc/1")] == [2]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(1, 0.7), (2, 0.6)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train_step/loss")] == [(1, 0.71), (2, 0.69)]
    images = acc.Images("val/worst_queries")
    assert [(e.step, e.width, e.height) for e in images] == [(0, 30, 20), (2, 30, 20)]
    assert "config/text_summary" in tags["tensors"]


def test_a_checkpoint_inside_an_epoch_adds_no_epoch_point(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_report(REPORTS[1])
    logger.log_report({"epoch": 1, "step": 5, "train/loss": 0.1})  # inside epoch 2, after 5 steps
    logger.log_report(REPORTS[2])
    logger.close()
    scalars = read_events(str(tmp_path / "tensorboard")).Scalars("train/loss")
    assert [(e.step, round(e.value, 6)) for e in scalars] == [(1, 0.7), (2, 0.6)]


def test_images_only_with_log_images(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_report(REPORTS[0] | {"images": {"val/worst_queries": _picture(tmp_path / "p.png")}}, log_images=False)
    logger.close()
    assert read_events(str(tmp_path / "tensorboard")).Tags()["images"] == []


def test_callback_logs_rank_0_and_survives_a_broken_logger(tmp_path, caplog):
    blocks = [{"name": "tensorboard", "args": {}}]
    if _has_mlflow():
        # MLflow 3 refuses a plain-file store: this logger fails to start, the run goes on.
        blocks.append({"name": "mlflow", "args": {"tracking_uri": f"file://{tmp_path}/mlruns"}})
    callback = LoggerCallback(blocks, str(tmp_path))
    for report in REPORTS:
        # Ray hands over one dict per rank; rank 1's values must not be logged.
        callback.after_report(None, [report, {k: -1.0 for k in report}], None)
    scalars = read_events(str(tmp_path / "tensorboard")).Scalars("train/loss")
    assert [e.value for e in scalars] == pytest.approx([0.7, 0.6])
    if _has_mlflow():
        assert "logger 'mlflow' could not start" in caplog.text


def _has_mlflow():
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def test_mlflow_run_holds_metrics_params_and_status(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = str(tmp_path / "runs" / "r1")
    cfg = load_config(DEMO, [f"ray.storage_path={tmp_path / 'runs'}", "logger.name=mlflow",
                             "logger.args.experiment_name=demo"])
    os.makedirs(run_dir)
    with watch_run(cfg, run_dir, os.path.join(run_dir, "history.jsonl"), quiet=True):
        # What the controller does: its own logger instance, for the same run.
        callback = LoggerCallback([b.model_dump() for b in cfg.logger], run_dir)
        for report in REPORTS:
            callback.after_report(None, [report], None)

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # the default store: beside the runs
    client = MlflowClient(tracking_uri=uri)
    run_id = json.load(open(os.path.join(run_dir, "mlflow_run.json")))["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "demo"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/cmc/1")] == [(0, 0.1), (2, 0.3)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_step/loss")] == [(1, 0.71), (2, 0.69)]
    assert run.data.params["optimizer.args.lr"] == "0.001" and run.data.params["max_epochs"] == "80"
    # NaN (no best value yet) is left out, not logged as a number.
    assert [m.step for m in client.get_metric_history(run_id, "best/cmc/1")] == [2]


def test_mlflow_run_failed(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir = str(tmp_path / "r2")
    cfg = load_config(DEMO, ["logger.name=mlflow", f"logger.args.tracking_uri=sqlite:///{tmp_path}/m.db"])
    os.makedirs(run_dir)
    with pytest.raises(RuntimeError), watch_run(cfg, run_dir, os.path.join(run_dir, "history.jsonl"), quiet=True):
        raise RuntimeError("a worker died")
    run_id = json.load(open(os.path.join(run_dir, "mlflow_run.json")))["run_id"]
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db").get_run(run_id).info.status == "FAILED"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("value, names", [
    ("{name: tensorboard}", ["tensorboard"]),
    ("null", []),
    ("[{name: tensorboard}, {name: mlflow, args: {experiment_name: x}}]", ["tensorboard", "mlflow"]),
])
def test_logger_key_takes_oml_shape_or_a_list(value, names):
    cfg = load_config(DEMO, [f"logger={value}"])
    assert [b.name for b in cfg.logger] == names
    assert load_config(DEMO).logger[0].name == "tensorboard"  # the default


@pytest.mark.parametrize("overrides, message", [
    (["logger.name=wandb"], "config key logger.name: unknown name 'wandb'; known: ['mlflow', 'tensorboard']"),
    (["logger={name: tensorboard, args: {save_dir: .}}"],  # OML's argument: raymetric writes into the run directory
     "config key logger.args: unknown argument(s) ['save_dir'] for TensorBoardLogger"),
    (["logger=[{name: tensorboard}, {name: nope}]"], "config key logger[1].name: unknown name 'nope'"),
])
def test_bad_logger_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(DEMO, overrides))
    assert message in str(err.value)


def test_mlflow_configured_but_not_installed(monkeypatch):
    # None in sys.modules makes `import mlflow` fail, as in an environment without it.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(DEMO, ["logger.name=mlflow"]))
    assert "config key logger.name='mlflow': the 'mlflow' package is not installed: pip install 'raymetric[mlflow]'" in str(err.value)


def test_build_logger_unknown():
    with pytest.raises(ValueError, match="unknown logger 'x'"):
        build_logger("x", ".")


# ---------------------------------------------------------------- the driver's progress line


def test_progress_printer_follows_the_history(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"epoch": 5, "train/loss": 9.0, "time": 1.0}) + "\n")  # an earlier fit's
    out = io.StringIO()
    printer = ProgressPrinter(str(history), max_epochs=4, metric_key="cmc@1", max_failures=1, stream=out)
    records = [
        {"epoch": 0, "val/cmc@1": 0.1, "time": 100.0},
        {"epoch": 1, "train/loss": 0.7, "train/active_triplets": 0.9, "train/images_per_s": 80.0,
         "train/epoch_time_s": 10.0, "time": 110.0},
        {"event": "worker_failure", "errors": {"1": "RuntimeError: Connection closed by peer\ntraceback"}, "time": 115.0},
        {"epoch": 2, "train/loss": 0.6, "train/active_triplets": 0.8, "train/images_per_s": 90.0,
         "train/epoch_time_s": 10.0, "val/cmc@1": 0.3, "time": 130.0},
    ]
    with open(history, "a") as f:
        for r in records[:3]:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(records[3])[:20])  # a line still being written
    printer.print_new()
    with open(history, "a") as f:
        f.write(json.dumps(records[3])[20:] + "\n")
    printer.print_new()
    assert out.getvalue().splitlines() == [
        "epoch 0/4  untrained  val/cmc@1 0.1000",
        "epoch 1/4  loss 0.7000  active 0.90  80 img/s  eta 0.5 min",  # 3 epochs x 10 s
        "worker failure: rank 1: RuntimeError: Connection closed by peer; "
        "Ray Train restarts the workers from the last checkpoint",
        "epoch 2/4  loss 0.6000  active 0.80  90 img/s  val/cmc@1 0.3000  eta 0.7 min",  # 20 s per epoch x 2
    ]


def test_watch_run_prints_and_writes_the_config(tmp_path, capsys):
    cfg = load_config(DEMO, ["max_epochs=2"])
    history = tmp_path / "history.jsonl"
    with watch_run(cfg, str(tmp_path), str(history)):
        history.write_text(json.dumps({"epoch": 1, "train/loss": 0.5, "time": 1.0}) + "\n")
    assert capsys.readouterr().out.splitlines() == ["epoch 1/2  loss 0.5000"]
    assert "config/text_summary" in read_events(str(tmp_path / "tensorboard")).Tags()["tensors"]
    with watch_run(cfg, str(tmp_path), str(history), quiet=True):
        history.write_text(json.dumps({"epoch": 2, "train/loss": 0.4, "time": 2.0}) + "\n")
    assert capsys.readouterr().out == ""

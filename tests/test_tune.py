"""Sweeps: the sweep file, the search space and its driver-side check (no Ray), the results (pure), and
one real sweep through jobs/tune.py: interrupted, resumed, and its best config rerun by jobs/train.py."""

import csv
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from raymetric.config import ConfigError
from raymetric.tune.plan import check_sweep, plan_concurrency, trials_at_once
from raymetric.tune.plot import PALETTE, plot_curves
from raymetric.tune.results import pick_best, summarize_trial, table_rows, write_csv
from raymetric.tune.space import build_search_space, config_from_raw, load_sweep, trial_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
TUNE_DEMO = os.path.join(ROOT, "configs", "tune_demo.yaml")


def tiny(tiny_demo, *more):
    """configs/tune_demo.yaml on the tiny demo data."""
    return [f"dataset_root={tiny_demo}", "demo_data=null", *more]


# ---------------------------------------------------------------- the sweep file


def test_tune_demo_loads_and_every_searched_value_passes_the_check(tiny_demo):
    sweep, train_raw = load_sweep(TUNE_DEMO, tiny(tiny_demo))
    assert train_raw["postfix"] == "demo"  # from the base, configs/demo.yaml
    assert train_raw["max_epochs"] == 20 and train_raw["scheduling"]["scheduler"]["args"] == {"T_max": 20}
    plan = check_sweep(sweep, train_raw)
    assert list(plan.param_space) == ["optimizer.args.lr", "criterion.args.margin", "sampler.args.n_instances"]
    assert len(plan.checked) == 3 * 2 * 2  # lr: ends and an interior point; margin and K: each value
    assert plan.max_epochs == 20 and plan.metric_key == "val/cmc@1"
    assert plan.worker_resources == {"CPU": 2.0, "GPU": 0}


def test_overrides_reach_the_sweep_and_every_trial(tiny_demo):
    sweep, train_raw = load_sweep(
        TUNE_DEMO,
        tiny(tiny_demo, "tune.num_samples=2", "max_epochs=3", "tune.search.sampler.args.n_instances={grid: [2]}"),
    )
    assert sweep.num_samples == 2 and train_raw["max_epochs"] == 3
    # A dotted key given on the command line arrives nested; it is the same searched key.
    assert sweep.search["sampler.args.n_instances"] == {"grid": [2]}


def test_sampled_values_go_through_the_command_line_override_path(tiny_demo):
    _, train_raw = load_sweep(TUNE_DEMO, tiny(tiny_demo))
    params = {"optimizer.args.lr": 0.00012345678901234567, "criterion.args.margin": 0.1, "sampler.args.n_instances": 4}
    cfg = config_from_raw(train_raw, trial_overrides(params))
    assert cfg.optimizer.args["lr"] == params["optimizer.args.lr"]  # exactly: JSON floats round-trip
    assert cfg.criterion.args["margin"] == 0.1 and cfg.sampler.args["n_instances"] == 4


@pytest.mark.parametrize(
    "spec, corners",
    [
        ({"choice": [0.1, 0.2]}, [0.1, 0.2]),
        ({"grid": ["adam", "sgd"]}, ["adam", "sgd"]),
        ({"uniform": [0.0, math.pi]}, [0.0, 1.0, math.pi]),  # the interior point is 1/pi of the way
        ({"loguniform": [1e-4, 1e-4 * math.e**math.pi]}, [1e-4, 1e-4 * math.e, 1e-4 * math.e**math.pi]),
        ({"randint": [2, 5]}, [2, 4]),  # Ray: high is excluded
        ({"qrandint": [2, 8, 2]}, [2, 8]),  # Ray: high is included
        ({"quniform": [0.1, 0.5, 0.1]}, [0.1, 0.5]),
    ],
)
def test_search_space_corners(spec, corners):
    _, got = build_search_space("some.key", spec)
    assert got == (pytest.approx(corners, rel=1e-12) if isinstance(corners[0], float) else corners)


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.search.optimizer.args.lrr={choice: [0.1]}", "unknown argument(s) ['lrr']"),
        ("tune.search.max_epochs={uniform: [1, 4]}", "max_epochs=1.9549"),  # a float range on an integer key
        ("tune.search.sampler.args.n_labels={choice: [4, 5]}", "sampler.args.n_labels=5"),  # not divisible by 2 workers
        ("tune.search.sampler.args.n_labels={choice: [4, 16]}", "sampler.args.n_labels=16"),  # tiny has 8 labels
        ("tune.search.optimizer.args.lr={loguniform: [0, 1]}", "loguniform needs 0 < low < high"),
        ("tune.search.optimizer.args.lr={between: [0, 1]}", "unknown kind 'between'"),
        ("tune.search.ray.name={choice: [a, b]}", "cannot be searched"),
        ("tune.scheduler.name=hyperband", "tune.scheduler.name: unknown name 'hyperband'"),
        ("tune.scheduler.args.grace_period=50", "grace_period must be <= max_t"),
        ("tune.metric=cmc@10", "tune.metric: 'cmc@10' is not computed"),
        ("tune.num_samples=0", "'tune.num_samples'"),
        ("tune.searchh={}", "'tune.searchh': unknown key"),
    ],
)
def test_a_bad_sweep_fails_before_any_trial_starts(override, message, tiny_demo, tmp_path, capsys):
    import tune as tune_job

    rc = tune_job.main(["--config", TUNE_DEMO, *tiny(tiny_demo, f"ray.storage_path={tmp_path}", override)])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert os.listdir(tmp_path) == []  # no sweep directory: nothing started


def test_trial_resources_and_concurrency(tiny_demo):
    sweep, train_raw = load_sweep(TUNE_DEMO, tiny(tiny_demo))
    plan = check_sweep(sweep, train_raw)
    head = {"memory": 16e9, "node:__internal_head__": 1.0}
    # A trial = its driver (memory, a share of the head node; no CPU) + 2 workers x 1 CPU.
    assert plan_concurrency(plan, head | {"CPU": 2.0}) == 1
    assert plan_concurrency(plan, head | {"CPU": 5.0}) == 2
    plan.sweep.max_concurrent_trials = 8
    assert plan_concurrency(plan, head | {"CPU": 5.0}) == 2  # lowered to what the cluster holds
    with pytest.raises(ConfigError, match=r"a trial needs \{'CPU': 2.0\}.*has \{'CPU': 1.0\}"):
        plan_concurrency(plan, head | {"CPU": 1.0})
    with pytest.raises(ConfigError, match="tune.trial_resources: node:__internal_head__=0.01 per trial"):
        plan_concurrency(plan, {"CPU": 8.0, "memory": 16e9})
    assert trials_at_once({"CPU": 1.5, "GPU": 0.0}, {"CPU": 4.5}) == 3


# ---------------------------------------------------------------- results (pure)


def _history(values: dict[int, float]) -> list[dict]:
    return [{"epoch": e, "train/loss": 1.0} | ({"val/cmc@1": v} if v is not None else {}) for e, v in values.items()]


def test_table_csv_and_best(tmp_path):
    trials = [
        summarize_trial("t0", {"lr": 0.1}, _history({1: 0.2, 2: None, 3: 0.5}), metric_key="val/cmc@1",
                        mode="max", max_epochs=3, run_dir="r0"),
        summarize_trial("t1", {"lr": 0.01}, _history({1: 0.1, 2: None}), metric_key="val/cmc@1",
                        mode="max", max_epochs=3, run_dir="r1", stopped_at=1),
        summarize_trial("t2", {"lr": 1.0}, [], metric_key="val/cmc@1", mode="max", max_epochs=3, run_dir="r2",
                        error="RuntimeError: boom"),
        summarize_trial("t3", {"lr": 0.5}, _history({1: 0.6}), metric_key="val/cmc@1", mode="max", max_epochs=3,
                        run_dir="r3", done=False),
    ]  # fmt: skip
    assert [t.status for t in trials] == ["completed", "stopped early", "error", "unfinished"]
    assert [(t.best, t.best_epoch, t.epochs_run) for t in trials] == [(0.5, 3, 3), (0.1, 1, 2), (None, None, 0), (0.6, 1, 1)]
    assert pick_best(trials, "max").trial_id == "t3" and pick_best(trials, "min").trial_id == "t1"

    rows = table_rows(trials, ["lr"], "cmc@1")
    write_csv(rows, tmp_path / "trials.csv")
    with open(tmp_path / "trials.csv") as f:
        back = list(csv.DictReader(f))
    assert [r["trial"] for r in back] == ["t0", "t1", "t2", "t3"]
    assert back[1] == {"trial": "t1", "lr": "0.01", "best cmc@1": "0.1", "best epoch": "1", "epochs run": "2/3",
                       "status": "stopped early", "stopped at epoch": "1", "run_dir": "r1"}  # fmt: skip


def test_plot_draws_every_trial(tmp_path):
    path = tmp_path / "plot.png"
    plot_curves({"a": [(1, 0.2), (2, 0.4)], "b": [(1, 0.1), (2, float("nan")), (3, 0.9)], "c": []}, path, title="t")
    image = Image.open(path).convert("RGB")
    assert image.size == (960, 560)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert {PALETTE[0], PALETTE[1], PALETTE[2]} <= colours  # both lines, and c's legend entry


# ---------------------------------------------------------------- a real sweep


def _read_history(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.ray
def test_sweep_is_interrupted_resumed_and_its_best_config_reruns(ray_session, tiny_demo, tmp_path):
    """2 trials of 3 epochs (2 workers each, one trial at a time on 2 CPUs), ASHA on val/cmc@1.

    jobs/tune.py starts its own Ray (with the dashboard, which a stopped trial needs). The test
    interrupts it (SIGINT, as Ctrl+C) once the first trial has finished, resumes it, and reruns the
    best config with jobs/train.py on the test's Ray. Whether ASHA stops the second trial depends on
    what the first had reported when the sweep was interrupted (Tune restores no scheduler state), so
    the test checks that the table says what the scheduler did, not what it should have done.
    """
    import train as train_job

    storage = tmp_path / "runs"
    sweep_dir = storage / "sweep"
    command = [sys.executable, os.path.join(ROOT, "jobs", "tune.py")]
    overrides = tiny(
        tiny_demo, f"ray.storage_path={storage}", "tune.name=sweep", "tune.num_samples=2", "max_epochs=3",
        "valid_period=1", "sampler.args.n_labels=4", "transforms_train.args.im_size=32",
        "transforms_val.args.im_size=32", "scheduling.scheduler.args.T_max=3", "tune.scheduler.args.grace_period=1",
        "tune.search.sampler.args.n_instances={choice: [2]}",
    )  # fmt: skip
    started = time.time()
    with open(tmp_path / "first.log", "w") as log:
        sweep = subprocess.Popen([*command, "--config", TUNE_DEMO, *overrides], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not glob.glob(str(sweep_dir / "*" / "metrics.json")):  # a trial has finished
            assert sweep.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in 5 minutes"
            time.sleep(0.5)
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(timeout=120) == 1  # interrupted
    first = (tmp_path / "first.log").read_text()
    assert f"interrupted: resume with python jobs/tune.py --resume {sweep_dir}" in first

    resumed = subprocess.run([*command, "--resume", str(sweep_dir)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    print(f"2-trial sweep, interrupted and resumed: {time.time() - started:.0f} s")
    out = resumed.stdout.strip().splitlines()
    assert out[-1] == f"sweep: {sweep_dir}"

    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    print(resumed.stdout[resumed.stdout.index("trial "):])
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"completed", "stopped early"}
    stops = {}
    if (sweep_dir / "stopped.jsonl").exists():
        stops = {json.loads(line)["trial"]: json.loads(line)["epoch"] for line in open(sweep_dir / "stopped.jsonl")}
    for row in rows:
        history = _read_history(row["run_dir"])
        curve = {h["epoch"]: h["val/cmc@1"] for h in history if "val/cmc@1" in h}
        assert float(row["best cmc@1"]) == max(curve.values())  # the oracle: the run's own history
        stopped_early = row["trial"] in stops and stops[row["trial"]] < 3
        assert (row["status"] == "stopped early") == stopped_early
        assert row["epochs run"] == f"{max(h['epoch'] for h in history if 'epoch' in h)}/3"

    best_row = max(rows, key=lambda r: float(r["best cmc@1"]))
    best_yaml = sweep_dir / "best.yaml"
    best = yaml.safe_load(best_yaml.read_text())
    assert best["optimizer"]["args"]["lr"] == float(best_row["optimizer.args.lr"])
    assert best["criterion"]["args"]["margin"] == float(best_row["criterion.args.margin"])
    assert best["ray"]["name"] is None and best["ray"]["storage_path"] == str(storage)
    assert best_yaml.read_text().startswith(f"# python jobs/train.py --config {best_yaml}")

    plot = Image.open(sweep_dir / "val_metric.png").convert("RGB")
    colours = {c for _, c in plot.getcolors(maxcolors=1 << 20)}
    assert {PALETTE[0], PALETTE[1]} <= colours  # a curve per trial

    # The best config reruns as it is, and trains exactly what its trial trained.
    rc = train_job.main(["--config", str(best_yaml), "--quiet", f"ray.storage_path={tmp_path}", "ray.name=rerun"])
    assert rc == 0
    rerun = {h["epoch"]: h for h in _read_history(tmp_path / "rerun") if "val/cmc@1" in h}
    trial = {h["epoch"]: h for h in _read_history(best_row["run_dir"]) if "val/cmc@1" in h}
    assert [rerun[e]["val/cmc@1"] for e in sorted(trial)] == [trial[e]["val/cmc@1"] for e in sorted(trial)]

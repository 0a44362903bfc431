"""Worker loss, exact resume, checkpoint compatibility (issue: reliability).

One module-scoped set of three real 2-worker runs on a small demo dataset (8 global steps an epoch,
a checkpoint every 2 steps):
- ``baseline``: 2 epochs, uninterrupted;
- ``killed``: 1 epoch; a Ray Train worker process is SIGKILLed by its pid in the middle of the epoch,
  after a mid-epoch checkpoint; Ray restarts the worker group from that checkpoint (max_failures 1);
- ``resumed``: ``resume_from=<killed run>`` with ``max_epochs=2``, continued in place.
The resumed run must end with the baseline's weights, bitwise: the sampler resumes at the step,
every step reseeds from (seed, epoch, step, rank), and the state holds everything else.
"""

import json
import os
import signal
import sys
import threading
import time

import pytest
import torch

from raymetric.checkpoint import STATE_FILE, load_state
from raymetric.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")

SMALL = [
    "demo_data=null", "validate_untrained=false", "valid_period=1", "logger=null",
    "sampler.args.n_labels=2", "sampler.args.n_instances=4", "checkpoint_every_n_steps=2",
    "transforms_train.args.im_size=48", "transforms_val.args.im_size=48", "extractor.args.arch=resnet10t",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from raymetric.data.demo import DemoSpec, ensure_demo

    root = tmp_path_factory.mktemp("small_demo")
    ensure_demo(root, DemoSpec(n_train_labels=16, n_val_labels=4, images_per_label=4, image_size=48, seed=3))
    return str(root)


def _history(run_dir):
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _train_worker_pids(ray_module) -> list[int]:
    """The Ray Train worker processes of this test session's Ray (children of its raylet)."""
    raylet = ray_module._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for pid in _children(raylet):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if f.read().startswith("ray::RayTrainWorker"):
                    pids.append(pid)
        except OSError:
            pass
    return pids


def _kill_a_worker_mid_epoch(ray_module, run_dir: str, record: dict, stop: threading.Event) -> None:
    """Once a mid-epoch checkpoint is registered: pause both workers, SIGKILL one, let the other go on."""
    path = os.path.join(run_dir, "history.jsonl")
    while not stop.is_set():
        if os.path.exists(path):
            steps = [h for h in _history(run_dir) if h.get("step") and h.get("checkpoint")]
            if steps:
                pids = _train_worker_pids(ray_module)
                for pid in pids:  # freeze the epoch where it is: the kill lands mid-epoch however fast it runs
                    os.kill(pid, signal.SIGSTOP)
                record["checkpoint_step"] = steps[0]["step"]
                record["epoch_ended_before_kill"] = any(h.get("epoch") == 1 and "step" not in h for h in _history(run_dir))
                record["killed"] = pids[-1]
                os.kill(pids[-1], signal.SIGKILL)
                for pid in pids[:-1]:
                    os.kill(pid, signal.SIGCONT)
                return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(ray_session, small_demo, tmp_path_factory):
    import train as train_job

    storage = tmp_path_factory.mktemp("reliability_runs")
    common = ["--config", DEMO, "--quiet", f"dataset_root={small_demo}", f"ray.storage_path={storage}", *SMALL]
    assert train_job.main([*common, "ray.name=baseline", "max_epochs=2"]) == 0

    killed_dir = os.path.join(storage, "killed")
    record: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_mid_epoch, args=(ray_session, killed_dir, record, stop))
    killer.start()
    try:
        assert train_job.main([*common, "ray.name=killed", "max_epochs=1", "ray.max_failures=1"]) == 0
    finally:
        stop.set()
        killer.join()
    killed_history = _history(killed_dir)

    assert train_job.main([*common, f"resume_from={killed_dir}", "max_epochs=2"]) == 0
    return {"storage": str(storage), "record": record, "killed_history": killed_history, "common": common}


def _final_state(run_dir):
    from raymetric.export import find_checkpoint

    return load_state(find_checkpoint(run_dir, "latest"))


@pytest.mark.ray
def test_worker_killed_mid_epoch_run_completes_from_the_mid_epoch_checkpoint(runs):
    record, history = runs["record"], runs["killed_history"]
    assert record.get("killed"), "no Ray Train worker process was found and killed"
    assert not record["epoch_ended_before_kill"], "the kill did not land mid-epoch"
    failures = [i for i, h in enumerate(history) if h.get("event") == "worker_failure"]
    assert len(failures) == 1, "the restart is recorded in the history"
    before, after = history[: failures[0]], history[failures[0] + 1 :]
    last_ckpt_step = max(h["step"] for h in before if h.get("step") and h.get("checkpoint"))
    assert last_ckpt_step >= record["checkpoint_step"]
    # Resumed mid-epoch: the first report after the restart comes from a step after the checkpoint,
    # so the epoch was not repeated from its start, and no step already checkpointed ran again.
    steps_after = [h["step"] for h in after if h.get("step")]
    assert steps_after and min(steps_after) > last_ckpt_step
    epoch_ends = [h for h in history if h.get("epoch") == 1 and "step" not in h and "train/loss" in h]
    assert len(epoch_ends) == 1, "the epoch ends once: none lost, none repeated"
    assert "val/cmc@1" in epoch_ends[0]


@pytest.mark.ray
def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(runs):
    storage = runs["storage"]
    baseline, resumed = _final_state(os.path.join(storage, "baseline")), _final_state(os.path.join(storage, "killed"))
    assert resumed["epoch"] == baseline["epoch"] == 2
    for key, tensor in baseline["model"].items():
        assert torch.equal(resumed["model"][key], tensor), f"model.{key} differs (bitwise)"
    history = _history(os.path.join(storage, "killed"))
    assert any(h.get("event") == "resumed" for h in history)
    base_val = [h["val/cmc@1"] for h in _history(os.path.join(storage, "baseline")) if "val/cmc@1" in h]
    assert [h["val/cmc@1"] for h in history if "val/cmc@1" in h] == base_val
    assert os.path.exists(os.path.join(storage, "killed", "config.1.yaml")), "the first config is kept"


@pytest.mark.ray
@pytest.mark.parametrize(
    "override, message",
    [
        ("extractor.args.embedding_size=64", "extractor.args: checkpoint"),
        ("extractor.args.arch=resnet18", "extractor.args: checkpoint"),
        ("optimizer.name=sgd", "optimizer.name: checkpoint 'adam', config 'sgd'"),
        ("criterion.miner.name=all_triplets", "criterion.miner.name"),
    ],
)
def test_a_checkpoint_of_another_model_or_config_is_refused_naming_the_mismatch(runs, override, message):
    from raymetric.train import prepare_run

    cfg = load_config(DEMO, [*runs["common"][3:], f"resume_from={runs['storage']}/baseline", override])
    with pytest.raises(ConfigError) as err:
        prepare_run(cfg)
    assert "config key resume_from" in str(err.value) and message in str(err.value)


def test_resume_from_a_missing_path_is_refused(small_demo, tmp_path):
    from raymetric.train import prepare_run

    cfg = load_config(DEMO, [f"dataset_root={small_demo}", *SMALL, f"resume_from={tmp_path}/nothing"])
    with pytest.raises(ConfigError, match="config key resume_from: .*neither a run directory"):
        prepare_run(cfg)


class NotATensor:
    pass


def test_checkpoints_load_with_weights_only(tmp_path):
    path = str(tmp_path / STATE_FILE)
    torch.save({"model": {"w": torch.zeros(2)}, "config": {}, "payload": NotATensor()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_state(path)  # an object that would run code when unpickled is refused


def _keep_saving(path: str, i: int) -> None:
    import numpy as np

    from raymetric.checkpoint import save_atomic

    while True:
        i += 1
        # numpy fills the tensor: a forked child must not enter torch's thread pool (fork + OpenMP hangs)
        save_atomic({"i": i, "w": torch.from_numpy(np.full(1_000_000, float(i), dtype=np.float32))}, path)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    """SIGKILL a process that keeps saving 4 MB checkpoints, at random moments: the file always loads whole."""
    import multiprocessing
    import random

    path = str(tmp_path / STATE_FILE)
    rng = random.Random(0)
    last = 0
    for _ in range(8):
        # Each writer continues the count of the one killed before it, so saves only move forward.
        proc = multiprocessing.get_context("fork").Process(target=_keep_saving, args=(path, last))
        proc.start()
        deadline = time.time() + 30
        while (not os.path.exists(path) or load_state(path)["i"] <= last) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))  # somewhere inside a write, most of the time
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        state = load_state(path)
        assert torch.equal(state["w"], torch.full((1_000_000,), float(state["i"]))), "a torn checkpoint"
        assert state["i"] > last
        last = state["i"]

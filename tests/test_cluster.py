"""Ray clusters: cluster.yaml against Ray's own validation, and on one machine a two-node cluster started
with `ray start`, to which the test submits a training with `ray job submit`.

The cluster is the test's own: its own temp dir, free ports, 1 CPU per node (so the two Train workers
land one per node), stopped at the end by the process ids of exactly its processes. Never `ray stop`:
it stops every Ray process on the machine, other people's included.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

from tests.test_train_job import TINY as TRAIN_JOB_TINY  # noqa: E402

TINY = [*TRAIN_JOB_TINY, "scheduling.scheduler.args.T_max=1", "max_epochs=1"]  # later overrides win
# Per-epoch values that depend on the clock, not on the numbers.
TIMING_KEYS = {"time", "checkpoint", "train/images_per_s", "train/epoch_time_s"}


# ---------------------------------------------------------------- cluster.yaml


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_config_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, name)) as f:
        raw = yaml.safe_load(f)
    config = prepare_config(raw)  # merges the provider's defaults, as `ray up` does
    validate_config(config)  # Ray's JSON schema and its own consistency checks; raises on a problem
    # The checkout goes to every node and is installed there.
    assert "~/raymetric" in config["file_mounts"] and "pip install" in " ".join(config["setup_commands"])


def test_cluster_yaml_is_a_gpu_cluster_with_shared_storage():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        raw = yaml.safe_load(f)
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]["node_config"]["InstanceType"]
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert raw["provider"]["type"] == "aws" and not head.startswith(("g", "p"))  # a CPU head (EC2's GPU families: g, p)
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU types
    assert all(t["max_workers"] > t["min_workers"] for t in workers)  # autoscaling
    assert any("mount -t nfs4" in c and "/mnt/shared" in c for c in raw["setup_commands"])


# ---------------------------------------------------------------- a two-node cluster on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> tuple[dict[int, str], dict[int, int]]:
    """Command line and parent of every process (Linux /proc)."""
    cmdlines, parents = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdlines[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    return cmdlines, parents


def cluster_pids(temp_dir: str) -> set[int]:
    """The cluster's processes: those whose command line names its temp dir (GCS, raylets, dashboard,
    monitors), and their descendants (agents, workers, job drivers)."""
    cmdlines, parents = _processes()
    me = {os.getpid(), os.getppid()}
    pids = {pid for pid, cmd in cmdlines.items() if temp_dir in cmd and pid not in me}
    while True:
        children = {pid for pid, parent in parents.items() if parent in pids} - pids - me
        if not children:
            return pids
        pids |= children


def stop_cluster(temp_dir: str, grace_s: float = 5.0) -> None:
    """SIGTERM exactly the cluster's processes, SIGKILL what is left after ``grace_s``."""
    pids = cluster_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
            time.sleep(0.2)
        pids = {pid for pid in pids if os.path.exists(f"/proc/{pid}")}
        if not pids:
            return


@pytest.fixture(scope="module")
def two_node_cluster():
    """`ray start --head` plus `ray start --address`: two raylets on this machine, 1 CPU each."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds the cluster's processes through /proc")
    from ray.util.state import list_nodes

    # Short: Ray's socket paths under the temp dir must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rm-", dir="/tmp")
    gcs_port, dashboard_port = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env = os.environ | {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # `python` in a job's command
        "RAY_AUTH_MODE": "disabled",  # token auth would need the token in every CLI call (RAY_NOTES §6)
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's State API clients (Train's placement-group cleaner) would otherwise scan the machine,
        # and fail when other Ray instances run on it.
        "RAY_API_SERVER_ADDRESS": dashboard,
    }
    common = ["--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
              f"--dashboard-agent-listen-port={_free_port()}"]
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_free_port()}",
             '--resources={"head_node": 1}', *common],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        common[-1] = f"--dashboard-agent-listen-port={_free_port()}"
        subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{gcs_port}", '--resources={"second_node": 1}', *common],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        deadline = time.time() + 60
        while len([n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(1)
        yield {"dashboard": dashboard, "env": env, "temp_dir": temp_dir}
    finally:
        stop_cluster(temp_dir)
        assert not cluster_pids(temp_dir), "processes of the test's cluster are still running"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted_run(two_node_cluster, tiny_demo, tmp_path_factory):
    """A 2-worker, 1-epoch training submitted with `ray job submit --working-dir .` to the two nodes."""
    storage = str(tmp_path_factory.mktemp("cluster_runs"))  # absolute: the job runs in a temporary copy
    started = time.time()
    job = subprocess.run(
        [RAY, "job", "submit", f"--address={two_node_cluster['dashboard']}", "--working-dir", ".", "--",
         "python", "jobs/train.py", "--config", "configs/demo.yaml", "--quiet", f"dataset_root={tiny_demo}",
         f"ray.storage_path={storage}", "ray.name=two_nodes", "ray.num_workers=2", *TINY],
        cwd=ROOT, env=two_node_cluster["env"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(f"ray job submit took {time.time() - started:.1f} s")
    return job, os.path.join(storage, "two_nodes")


def _history(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.ray
def test_job_submit_writes_the_run_to_absolute_storage(submitted_run):
    job, run_dir = submitted_run
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    assert f"run: {run_dir}" in job.stdout  # the job's last line, streamed back by `ray job submit`
    for name in ("config.yaml", "history.jsonl", "metrics.json"):
        assert os.path.exists(os.path.join(run_dir, name))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["ray"]["storage_path"] == os.path.dirname(run_dir)


@pytest.mark.ray
def test_the_two_workers_and_their_validation_shards_sit_on_both_nodes(two_node_cluster, submitted_run):
    from ray.util.state import list_actors, list_nodes

    job, _ = submitted_run
    assert job.returncode == 0
    nodes = {n.node_id for n in list_nodes(address=two_node_cluster["dashboard"])}
    workers = list_actors(address=two_node_cluster["dashboard"], filters=[("class_name", "=", "RayTrainWorker")])
    # Rank r embeds validation rows shard_rows(n, r, 2) (raymetric/evaluation), so one shard per node.
    assert len(workers) == 2 and {w.node_id for w in workers} == nodes and len(nodes) == 2


@pytest.mark.ray
def test_two_node_run_equals_the_single_node_run(ray_session, submitted_run, tiny_demo, tmp_path):
    import train as train_job

    job, two_node_dir = submitted_run
    assert job.returncode == 0
    # The same config on the test's one-node Ray (2 CPUs): both workers on one node.
    rc = train_job.main(
        ["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--quiet", f"dataset_root={tiny_demo}",
         f"ray.storage_path={tmp_path}", "ray.name=one_node", "ray.num_workers=2", *TINY]
    )  # fmt: skip
    assert rc == 0
    one_node_dir = os.path.join(tmp_path, "one_node")

    with open(os.path.join(one_node_dir, "metrics.json")) as f, open(os.path.join(two_node_dir, "metrics.json")) as g:
        one, two = json.load(f), json.load(g)
    assert one.keys() == two.keys() and one["n_queries"] == 24
    # CPU training is deterministic given the seed, and the gloo all-reduce of two ranks adds in the
    # same order wherever the ranks run: the values are equal, not merely close.
    assert one == two

    one_history, two_history = _history(one_node_dir), _history(two_node_dir)
    assert [h.get("epoch") for h in one_history] == [h.get("epoch") for h in two_history] == [0, 1]
    for a, b in zip(one_history, two_history):
        numbers = {k for k in a if k not in TIMING_KEYS and "time" not in k and k != "images"}
        assert {k: a[k] for k in numbers} == {k: b.get(k) for k in numbers}
        if "images" in a:  # the demo config's retrieval picture: the same worst queries, pixel for pixel
            from PIL import Image

            pictures = [Image.open(h["images"]["val/retrieval"]).tobytes() for h in (a, b)]
            assert pictures[0] == pictures[1]

"""Shared fixtures: one local Ray for the whole session (2 CPUs, small object store, no dashboard)."""

import os

import pytest

# Before Ray starts, so the raylet and every worker inherit them (../shared/RAY_NOTES.md §7).
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_AUTH_MODE": "disabled",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every integration test. Never `ray stop`: it is machine-wide."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The tiny demo dataset, generated once per session; returns its folder."""
    from raymetric.data.demo import SIZES, ensure_demo

    root = tmp_path_factory.mktemp("tiny_demo")
    ensure_demo(root, SIZES["tiny"])
    return str(root)

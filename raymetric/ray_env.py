"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import os

# Defaults for a Ray that raymetric starts itself (a plain `python jobs/train.py`). Set before
# ray.init so that the raylet, and through it every worker, inherits them. A user's own value wins.
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Train's print patch shows every print twice on the driver.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The controller polls workers this often; a checkpoint reported less than one poll before a
    # crash is not registered (../shared/RAY_NOTES.md §2), so poll more often than the 2 s default.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Its only effect on one machine is an error-level log line at every run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
}


_started_here = False


def init_ray(*, num_cpus: int | None = None, object_store_memory: int | None = None, quiet: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    Does nothing when Ray is already initialised (tests share one local Ray).
    """
    import ray

    global _started_here
    if ray.is_initialized():
        return
    _started_here = True
    if os.environ.get("RAY_ADDRESS"):
        # Ray: num_cpus and friends are refused when connecting to an existing cluster.
        ray.init(log_to_driver=not quiet)
        return
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        log_to_driver=not quiet,
        logging_level="WARNING",
    )


def shutdown_if_started() -> None:
    """Disconnect from (or stop) the Ray that ``init_ray`` started; leave a caller's own Ray alone.

    Also flushes the workers' log lines, so that a job's last printed line really is its last.
    """
    import ray

    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False

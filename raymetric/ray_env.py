"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import logging
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


def init_ray(
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    quiet: bool = False,
    verbose: bool | None = None,
    dashboard: bool = False,
) -> str | None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    Does nothing when Ray is already initialised (tests share one local Ray).

    Args:
        num_cpus: CPUs of a local Ray (default: all).
        object_store_memory: object store bytes of a local Ray (default: Ray's).
        quiet: when ``verbose`` is None, forward Ray's log lines to this console unless quiet.
        verbose: forward every Ray process's log lines (workers, Train controller, Ray's own
            warnings) to this console. False: they stay in Ray's log files
            (``/tmp/ray/session_latest/logs``); ``fit`` prints its own progress from the driver.
        dashboard: also start the dashboard with a local Ray: the web UI and the State API, which
            Ray Train's placement-group cleaner polls (without it that cleaner logs a warning every
            second and cannot free a killed run's workers). About 1 s more (bench/ray_startup.py).

    Returns:
        The dashboard's URL when this call started one, else None.
    """
    import ray

    global _started_here
    if ray.is_initialized():
        return None
    log_to_driver = (not quiet) if verbose is None else verbose
    _started_here = True
    if os.environ.get("RAY_ADDRESS"):
        # Ray: num_cpus and friends are refused when connecting to an existing cluster.
        ray.init(log_to_driver=log_to_driver)
        return None
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not log_to_driver:
        # A notice at every start that token authentication is on (it stays on; only the notice goes).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    dashboard_args = {}
    if dashboard:
        # Ray: a State API client finds the dashboard by scanning the machine for Ray instances and
        # gives up when there are several (a shared machine). Name ours before the raylet starts, so
        # that every Ray process (Train's PlacementGroupCleaner) inherits the address.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard_args = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
    context = ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=dashboard,
        log_to_driver=log_to_driver,
        logging_level="WARNING",
        **dashboard_args,
    )
    if not dashboard or not context.dashboard_url:
        return None
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{context.dashboard_url}"  # the port may have been taken in between
    return f"http://{context.dashboard_url}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_if_started() -> None:
    """Disconnect from (or stop) the Ray that ``init_ray`` started; leave a caller's own Ray alone.

    Also flushes the workers' log lines, so that a job's last printed line really is its last.
    """
    import ray

    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def quiet_ray_data():
    """Ray Data without progress bars, start-up lines or INFO logs (../shared/RAY_NOTES.md section 5);
    returns the ``DataContext`` for further settings."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ctx

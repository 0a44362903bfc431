"""What starting the local Ray dashboard costs, and what it buys (the State API).

raymetric's local Ray starts the dashboard so that Ray Train V2's PlacementGroupCleaner can query the
State API: without it, the cleaner logs "Failed to query Ray Train Controller actor state" every
second and cannot free a killed run's placement group (../shared/RAY_NOTES.md §1, §4). This measures,
in fresh processes, alternating the two settings:

- ``raymetric.ray_env.init_ray`` wall time (a local Ray, 2 CPUs, 200 MiB object store),
- how long after ``ray.init`` the State API answers (``ray.util.state.list_actors``), if at all,
- proportional memory (PSS) of every Ray process the init started (raylet, GCS, dashboard, agents, ...),
- ``ray.shutdown`` wall time.

    .venv/bin/python bench/ray_startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray
from raymetric.ray_env import init_ray
dashboard = sys.argv[1] == "1"
t = time.perf_counter()
init_ray(num_cpus=2, object_store_memory=200 * 1024**2, verbose=False, dashboard=dashboard)
init_s = time.perf_counter() - t
state_api_s = None  # seconds after ray.init until the State API answers; None: not within 15 s
from ray.util.state import list_actors
t = time.perf_counter()
while time.perf_counter() - t < 15:
    try:
        list_actors(limit=1, timeout=5)
        state_api_s = time.perf_counter() - t
        break
    except Exception:
        time.sleep(0.5)
def pss_mib(pid):  # proportional set size: shared pages split among the processes sharing them
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0
def children():  # pid -> child pids, from /proc
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids
def tree(pid, kids):  # the pid and all its descendants (the dashboard runs its modules as subprocesses)
    out = [pid]
    for k in kids.get(pid, []):
        out += tree(k, kids)
    return out
time.sleep(2)  # let the dashboard's module subprocesses come up
kids = children()
node = ray._private.worker._global_node
procs = {name: sum(pss_mib(q) for p in infos for q in tree(p.process.pid, kids))
         for name, infos in node.all_processes.items()}
t = time.perf_counter()
ray.shutdown()
print(json.dumps({"init_s": init_s, "state_api_s": state_api_s, "pss_mib": procs,
                  "shutdown_s": time.perf_counter() - t}))
"""


def run_once(dashboard: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if dashboard else "0"],
        check=True, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _state_api(runs: list[dict]) -> str:
    ready = [r["state_api_s"] for r in runs]
    if all(x is None for x in ready):
        return "never"
    return ("" if all(x is not None for x in ready) else "some ") + f"{max(x for x in ready if x is not None):.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, alternating (default 3)")
    args = parser.parse_args(argv)
    results: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for dashboard in (False, True):
            results[dashboard].append(run_once(dashboard))

    print(f"{'dashboard':<10} {'ray.init s (median, min-max)':<30} {'State API ready s':<18} "
          f"{'Ray procs PSS MiB':<18} {'dashboard PSS MiB':<18} {'shutdown s':<10}")
    for dashboard, runs in results.items():
        init = [r["init_s"] for r in runs]
        total = statistics.median(sum(r["pss_mib"].values()) for r in runs)
        dash = statistics.median(
            sum(v for k, v in r["pss_mib"].items() if "dashboard" in k) for r in runs
        )
        print(
            f"{'on' if dashboard else 'off':<10} "
            f"{statistics.median(init):.2f} ({min(init):.2f}-{max(init):.2f}){'':<14} "
            f"{_state_api(runs):<18} {total:<18.0f} {dash:<18.0f} "
            f"{statistics.median(r['shutdown_s'] for r in runs):<10.2f}"
        )
    print("processes (last run with the dashboard):", ", ".join(sorted(results[True][-1]["pss_mib"])))


if __name__ == "__main__":
    main()

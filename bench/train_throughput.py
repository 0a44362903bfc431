r"""Training throughput: raymetric (1 and 2 Ray Train workers) against OML 4.0.0's own pipeline, in one run.

    python bench/train_throughput.py                 # resnet18 at 96 px, P x K = 16 x 4, 2 loader processes, 6 epochs
    python bench/train_throughput.py --repeat 2      # each side twice, interleaved (a shared machine is noisy)
    python bench/train_throughput.py --tiny          # a smoke run: resnet18 at 32 px, 2 epochs of 3 steps
    python bench/train_throughput.py --demo --repeat 2   # configs/demo.yaml itself, channels_last off and on

What runs, on the same data and the same config:

- **raymetric**: the real ``jobs/train.py`` (driver checks, local Ray, Ray Train, the per-worker recipe),
  once with 1 Ray Train worker holding every CPU (``ray.cpus_per_worker`` = the machine's cores, so torch
  gets as many threads as OML's single process) and once with 2 workers (DDP over gloo, one core each,
  the P x K batch split by label). Per-epoch times come from the run's ``history.jsonl``
  (``train/epoch_time_s``: from asking for the epoch's first batch to the end of its last step).
- **OML 4.0.0**: ``oml.lightning.pipelines.train.extractor_training_pipeline`` (Lightning 2.1) with its own
  registries, in its side virtualenv (``bench/oml_env.py``). The pipeline is not changed; a Lightning
  callback is added to its ``Trainer`` to time each epoch the same way (``on_train_epoch_start`` to the
  end of the last ``on_train_batch_end``: validation excluded, as on raymetric's side).

The config both sides get (each in its own key names; printed at the start):

| | raymetric | OML |
|---|---|---|
| model | ``timm`` ``resnet18``, ``num_classes=0``, L2-normalised, no head | ``resnet`` (``ResnetExtractor``: torchvision ``resnet18``, fc removed, ``gem_p: null``, normalised) |
| transforms (train and val) | ``norm_resize_torch`` (im_size) | ``norm_resize_torch`` (im_size): the same resize, to-tensor, normalise |
| batch | ``balance`` P x K | ``balance`` P x K |
| loss | ``triplet_with_miner`` margin 0.2, ``hard_triplets``, mean | the same names and arguments |
| optimizer | ``adam`` lr 1e-4 | ``adam`` lr 1e-4 |
| precision, seed | 32, 42 | 32, 42 |
| DataLoader processes | ``num_workers`` | ``num_workers`` |

Both models are torchvision-layout ResNet-18s with the same parameter count (checked and printed). OML's
``augs_torch`` (resize, flip, a ``ColorJitter()`` that does nothing) and raymetric's ``augs_torch``
(random resized crop, flip, a real jitter) share a name but not their work, so the comparison uses the
transform both define identically. Data: the demo generator's JPEGs (``raymetric.data.demo``), without
boxes (OML 4.0 crashes on rows without a box), generated into ``.bench/data`` once.

Images/s = images in the epoch's batches / epoch time; the table shows the median over the epochs of
all runs of a side, the first epoch of each run dropped (process start-up, first-touch of the files),
and the range. The ratio column divides by OML's median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Settings:
    """One config for both sides."""

    arch: str = "resnet18"
    im_size: int = 96
    n_labels: int = 16  # P
    n_instances: int = 4  # K
    loader_workers: int = 2  # DataLoader processes (per Ray Train worker on raymetric's side)
    epochs: int = 6
    lr: float = 1e-4
    margin: float = 0.2
    seed: int = 42
    # The demo generator's spec: n_train_labels // n_labels steps per epoch.
    n_train_labels: int = 160
    n_val_labels: int = 8
    images_per_label: int = 6
    image_size: int = 96

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train_labels // self.n_labels

    @property
    def data_dir(self) -> str:
        return os.path.join(ROOT, ".bench", "data", f"demo_{self.n_train_labels}x{self.images_per_label}_{self.image_size}px")


TINY = dict(im_size=32, n_labels=4, n_instances=2, loader_workers=1, epochs=2, n_train_labels=12, n_val_labels=4,
            images_per_label=2, image_size=48)
BENCH_CSV = "bench.csv"


# ---------------------------------------------------------------- data


def make_data(s: Settings) -> str:
    """The demo JPEGs (generated once) and ``bench.csv``: the demo CSV without its (empty) bbox columns."""
    sys.path.insert(0, ROOT)
    import pandas as pd

    from raymetric.data.demo import DemoSpec, ensure_demo

    spec = DemoSpec(n_train_labels=s.n_train_labels, n_val_labels=s.n_val_labels, images_per_label=s.images_per_label,
                    image_size=s.image_size, bbox_fraction=0.0, sequence_fraction=0.0)
    csv = ensure_demo(s.data_dir, spec, n_procs=os.cpu_count() or 1)
    df = pd.read_csv(csv)
    df.drop(columns=["x_1", "x_2", "y_1", "y_2", "sequence"]).to_csv(os.path.join(s.data_dir, BENCH_CSV), index=False)
    return s.data_dir


# ---------------------------------------------------------------- configs


def raymetric_overrides(s: Settings, workers: int, storage: str, name: str) -> list[str]:
    """``key=value`` overrides of ``configs/demo.yaml`` that give the shared config."""
    cpus = os.cpu_count() or 1
    return [
        f"dataset_root={s.data_dir}", f"dataframe_name={BENCH_CSV}", "demo_data=null",
        f"seed={s.seed}", "precision=32", f"num_workers={s.loader_workers}",
        f"transforms_train={{name: norm_resize_torch, args: {{im_size: {s.im_size}}}}}",
        f"transforms_val={{name: norm_resize_torch, args: {{im_size: {s.im_size}}}}}",
        f"sampler={{name: balance, args: {{n_labels: {s.n_labels}, n_instances: {s.n_instances}}}}}",
        f"extractor={{name: timm, args: {{arch: {s.arch}, normalise_features: true}}}}",
        f"criterion={{name: triplet_with_miner, args: {{margin: {s.margin}, reduction: mean}}, miner: {{name: hard_triplets}}}}",
        f"optimizer={{name: adam, args: {{lr: {s.lr}}}}}", "scheduling=null",
        f"max_epochs={s.epochs}", f"valid_period={s.epochs}", "validate_untrained=false", "logger=null",
        f"ray.num_workers={workers}", f"ray.cpus_per_worker={max(cpus // workers, 1)}",
        f"ray.storage_path={storage}", f"ray.name={name}",
    ]


def oml_config(s: Settings) -> dict:
    """OML's pipeline config (the keys of its ``extractor_training_pipeline``)."""
    transforms = {"name": "norm_resize_torch", "args": {"im_size": s.im_size}}
    return {
        "seed": s.seed, "precision": 32, "accelerator": "cpu", "devices": 1,
        "dataset_root": s.data_dir, "dataframe_name": BENCH_CSV, "logs_root": "logs", "show_dataset_warnings": False,
        "num_workers": s.loader_workers, "cache_size": 0,
        "transforms_train": transforms, "transforms_val": transforms,
        "sampler": {"name": "balance", "args": {"n_labels": s.n_labels, "n_instances": s.n_instances}},
        "bs_val": 128, "max_epochs": s.epochs, "valid_period": s.epochs,
        "metric_args": {"cmc_top_k": [1], "map_top_k": [5], "precision_top_k": [5],
                        "fmr_vals": [], "pcf_variance": [0.5]},
        "metric_for_checkpointing": "OVERALL/cmc/1", "mode_for_checkpointing": "max", "log_images": False,
        "extractor": {"name": "resnet", "args": {"arch": s.arch, "gem_p": None, "remove_fc": True,
                                                  "normalise_features": True, "weights": None}},
        "criterion": {"name": "triplet_with_miner",
                      "args": {"margin": s.margin, "reduction": "mean", "need_logs": True,
                               "miner": {"name": "hard_triplets", "args": {}}}},
        "optimizer": {"name": "adam", "args": {"lr": s.lr}},
        "scheduling": None, "logger": None,
    }


# ---------------------------------------------------------------- runs


def _run_train(overrides: list[str], tmp: str, storage: str, name: str) -> dict:
    """``jobs/train.py --config configs/demo.yaml`` with ``overrides`` in a subprocess; per-epoch seconds and
    images/s from the run's history."""
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
           "--quiet", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": wall}
    with open(os.path.join(storage, name, "history.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"epochs": [{"seconds": r["train/epoch_time_s"], "images_per_s": r["train/images_per_s"]}
                       for r in records if "train/epoch_time_s" in r], "wall_s": wall}


def run_raymetric(s: Settings, workers: int, tmp: str, tag: str, extra: tuple[str, ...] = ()) -> dict:
    """raymetric on the benchmark's settings with ``workers`` Ray Train workers."""
    storage, name = os.path.join(tmp, "runs"), f"rm{workers}_{tag}"
    return _run_train([*raymetric_overrides(s, workers, storage, name), *extra], tmp, storage, name)


def run_demo(epochs: int, channels_last: bool, tmp: str, tag: str) -> dict:
    """``configs/demo.yaml`` as it is (2 workers, resnet10t at 64 px, no DataLoader processes), ``epochs`` epochs."""
    storage, name = os.path.join(tmp, "runs"), f"demo_{channels_last}_{tag}"
    return _run_train([f"max_epochs={epochs}", f"valid_period={epochs}", "validate_untrained=false", "logger=null",
                       f"scheduling.scheduler.args.T_max={epochs}", f"channels_last={str(channels_last).lower()}",
                       f"dataset_root={os.path.join(ROOT, 'data', 'demo')}", f"ray.storage_path={storage}",
                       f"ray.name={name}"], tmp, storage, name)


def run_oml(s: Settings, python: str, tmp: str, tag: str) -> dict:
    """OML's pipeline in its side venv, in a folder of its own (it writes logs and checkpoints to its cwd)."""
    work = os.path.join(tmp, f"oml_{tag}")
    os.makedirs(work)
    cfg_path, out_path = os.path.join(work, "cfg.json"), os.path.join(work, "epochs.json")
    with open(cfg_path, "w") as f:
        json.dump(oml_config(s), f)
    start = time.perf_counter()
    proc = subprocess.run([python, os.path.abspath(__file__), "--worker-oml", cfg_path, out_path],
                          capture_output=True, text=True, cwd=work, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - start
    if proc.returncode or not os.path.exists(out_path):
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": wall}
    with open(out_path) as f:
        return {**json.load(f), "wall_s": wall}


def worker_oml(cfg_path: str, out_path: str) -> None:
    """Runs in OML's side venv: its own pipeline, plus a timing callback on its Lightning Trainer."""
    import pytorch_lightning as pl
    import torch

    import oml.lightning.pipelines.train as oml_train

    epochs: list[dict] = []

    class EpochTimer(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.start, self.images, self.last = time.perf_counter(), 0, None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.images += len(batch["labels"])
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            seconds = self.last - self.start
            epochs.append({"seconds": seconds, "images_per_s": self.images / seconds})
            with open(out_path, "w") as f:
                json.dump({"epochs": epochs, "threads": torch.get_num_threads(),
                           "params": sum(p.numel() for p in module.model.parameters())}, f)

    class TimedTrainer(pl.Trainer):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, EpochTimer()], **kwargs)

    oml_train.pl.Trainer = TimedTrainer  # the module OML's pipeline builds its Trainer from
    with open(cfg_path) as f:
        oml_train.extractor_training_pipeline(json.load(f))


# ---------------------------------------------------------------- table


def summarise(runs: list[dict]) -> dict:
    """Median and range of images/s over every run's epochs, the first epoch of each run dropped."""
    rates = [e["images_per_s"] for r in runs if "epochs" in r for e in r["epochs"][1:]]
    errors = [r["error"] for r in runs if "error" in r]
    if not rates:
        return {"error": errors[0] if errors else "no epochs"}
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "n": len(rates),
            "wall_s": statistics.median(r["wall_s"] for r in runs if "epochs" in r)}


def print_table(s: Settings, rows: dict[str, dict]) -> None:
    base = rows.get("OML 4.0.0 (Lightning, 1 process)", {}).get("median")
    print(f"\n{s.arch}, {s.im_size} px, P x K = {s.n_labels} x {s.n_instances} = {s.n_labels * s.n_instances} images/step, "
          f"{s.steps_per_epoch} steps/epoch, {s.loader_workers} DataLoader processes, {os.cpu_count()} CPU cores, "
          f"{s.epochs} epochs per run (first dropped)")
    print_rows(rows, base, "pipeline", "ratio to OML", with_wall=True)


def print_rows(rows: dict[str, dict], base: float | None, first: str, ratio_name: str, with_wall: bool = False) -> None:
    """A markdown table of summarised runs: images/s median and range, epochs, ratio to ``base``."""
    extra = " wall per run s |" if with_wall else ""
    print(f"| {first} | images/s (median) | range | epochs | {ratio_name} |{extra}")
    print("|---|---|---|---|---|" + ("---|" if with_wall else ""))
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |" + (" |" if with_wall else ""))
            continue
        ratio = f"{r['median'] / base:.2f}" if base else "-"
        wall = f" {r['wall_s']:.0f} |" if with_wall else ""
        print(f"| {name} | {r['median']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {r['n']} | {ratio} |{wall}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, interleaved")
    parser.add_argument("--sides", default="oml,rm1,rm2",
                        help="comma-separated: oml, rm1 (1 worker), rm2 (2 workers), rm1_nchw (1 worker, channels_last=false)")
    for field in dataclasses.fields(Settings):
        kind = {"int": int, "float": float, "str": str}[field.type]
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None, help=f"default {field.default}")
    parser.add_argument("--demo", action="store_true",
                        help="instead: configs/demo.yaml as it is, with channels_last false (the old CPU behaviour) and true")
    args = parser.parse_args()
    if args.demo:
        demo_table(args.epochs or 8, args.repeat)
        return
    values = TINY if args.tiny else {}
    values |= {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    s = Settings(**values)
    sides = args.sides.split(",")

    make_data(s)
    print(f"data: {s.data_dir}")
    print("raymetric: python jobs/train.py --config configs/demo.yaml " + " ".join(raymetric_overrides(s, 1, "<tmp>", "<name>")))
    print("OML: extractor_training_pipeline(" + json.dumps(oml_config(s)) + ")", flush=True)
    python = None
    if "oml" in sides:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from oml_env import oml_python

        python = oml_python()
    names = {"oml": "OML 4.0.0 (Lightning, 1 process)", "rm1": "raymetric, 1 Ray Train worker",
             "rm2": "raymetric, 2 Ray Train workers (DDP)",
             "rm1_nchw": "raymetric, 1 worker, channels_last=false (its CPU default before)"}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for side in sides:
                if side == "oml":
                    r = run_oml(s, python, tmp, str(i))
                elif side == "rm1_nchw":
                    r = run_raymetric(s, 1, tmp, f"nchw{i}", ("channels_last=false",))
                else:
                    r = run_raymetric(s, int(side[2:]), tmp, str(i))
                runs[side].append(r)
                print(json.dumps({"side": side, "run": i, **r}, default=str)[:600], flush=True)
    from raymetric.extractors import TimmExtractor

    ours = sum(p.numel() for p in TimmExtractor(s.arch).parameters())
    theirs = next((r["params"] for r in runs.get("oml", []) if "params" in r), None)
    print(f"\nmodel parameters: raymetric timm {s.arch} {ours:,}; OML ResnetExtractor {s.arch} "
          f"{theirs if theirs is None else format(theirs, ',')}")
    print_table(s, {names[side]: summarise(rs) for side, rs in runs.items()})


def demo_table(epochs: int, repeat: int) -> None:
    """The default demo's speed with the model and images in channels-last memory on the CPU, and without."""
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for channels_last in (False, True):
                runs[channels_last].append(run_demo(epochs, channels_last, tmp, str(i)))
                print(json.dumps({"channels_last": channels_last, "run": i, **runs[channels_last][-1]})[:600], flush=True)
    rows = {f"configs/demo.yaml, channels_last={str(k).lower()}": summarise(v) for k, v in runs.items()}
    base = rows["configs/demo.yaml, channels_last=false"].get("median")
    print(f"\nconfigs/demo.yaml (2 Ray Train workers on CPU, resnet10t 64 px, 8 x 4 batch, num_workers 0), "
          f"{epochs} epochs per run (first dropped), {repeat} run(s) each, interleaved")
    print_rows(rows, base, "run", "ratio")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-oml":
        worker_oml(sys.argv[2], sys.argv[3])
    else:
        main()

r"""The training step fed three ways, against the same step on synthetic input, in one process (no Ray).

    python bench/gpu_step.py --data .bench/data/gpu_jpegs             # on a GPU: ResNet-50, 224 px, 64 x 4, bf16
    python bench/gpu_step.py --tiny --data /tmp/tiny_jpegs             # CPU smoke run (seconds)
    python bench/gpu_step.py table OUT_DIR                            # the one table of bench/gpu_check.sh

Every mode runs raymetric's step (``raymetric.step.micro_step``: forward, the batch gathered for mining,
``hard_triplets`` + ``triplet_with_miner``, backward, Adam) on a fresh model with the same settings
(bf16 autocast and channels_last on a GPU, fused Adam). Only the input differs:

| mode | input |
|---|---|
| ``synthetic`` | one fixed batch already on the device: the step's own ceiling |
| ``cpu_float`` | the demo JPEGs, decoded and fully augmented (``augs_torch``) in DataLoader processes; float32 batches travel (``loader.augment_on: cpu``) |
| ``cpu_uint8`` | decoded, cropped, resized and flipped in DataLoader processes; uint8 travels, jitter and normalisation on the device, one batch ahead on a side stream (``augment_on: device``, the GPU default) |
| ``gpu_decode`` | the processes read file bytes; nvJPEG decodes the batch on the GPU, crop/resize/flip/jitter/normalise there, one batch ahead (``loader.decode: gpu``) |

The P x K batches come from raymetric's ``balance`` sampler over the train split, epoch after epoch
(persistent DataLoader processes). After ``--warmup`` steps, ``--steps`` steps are timed between two
device synchronisations: images/s = steps x batch / seconds. ``--data`` is generated with the demo
generator when missing (``--n-procs`` processes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

MODES = ("synthetic", "cpu_float", "cpu_uint8", "gpu_decode")
LOADER = {"cpu_float": ("cpu", "cpu"), "cpu_uint8": ("device", "cpu"), "gpu_decode": ("device", "gpu")}  # augment_on, decode
FULL = dict(arch="resnet50", im_size=224, n_labels=64, n_instances=4, steps=20, warmup=5, loader_workers=14,
            data_labels=1600, data_images=4, data_size=256)
TINY = dict(arch="resnet10t", im_size=64, n_labels=8, n_instances=4, steps=3, warmup=1, loader_workers=2,
            data_labels=48, data_images=4, data_size=96)


def make_data(path: str, n_labels: int, n_images: int, size: int, n_procs: int) -> str:
    """Demo JPEGs (``size`` px, a third of them larger canvases with boxes) for ``n_labels`` train labels."""
    from raymetric.data.demo import DemoSpec, ensure_demo

    spec = DemoSpec(n_train_labels=n_labels, n_val_labels=max(4, n_labels // 16), images_per_label=n_images,
                    image_size=size)
    start = time.perf_counter()
    ensure_demo(path, spec, n_procs=n_procs)
    print(f"data: {path} ({n_labels} x {n_images} train JPEGs at {size} px) in {time.perf_counter() - start:.1f} s",
          flush=True)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args, device: torch.device) -> dict:
    """Warm up, then time ``args.steps`` steps of ``mode``; returns images/s and the step time."""
    from raymetric.data.csv import load_dataset_csv, remap_labels
    from raymetric.data.loading import DeviceBatches, build_train_input, loader_kwargs, pin_memory_for
    from raymetric.extractors import TimmExtractor
    from raymetric.losses import build_criterion
    from raymetric.samplers import build_sampler
    from raymetric.step import micro_step

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    model = TimmExtractor(args.arch).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion("triplet_with_miner", {"margin": 0.2}, {"name": "hard_triplets"}).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=cuda)
    autocast = torch.bfloat16 if cuda else None
    batch_size = args.n_labels * args.n_instances

    if mode == "synthetic":
        images = torch.randn(batch_size, 3, args.im_size, args.im_size, device=device)
        labels = torch.arange(args.n_labels, device=device).repeat_interleave(args.n_instances)

        def batches():
            while True:
                yield {"image": images, "label": labels}
    else:
        df = load_dataset_csv(os.path.join(args.data, "df.csv"), args.data, check_files=False)
        train = df[df["split"] == "train"]
        train_labels, _ = remap_labels(train["label"])
        augment_on, decode = LOADER[mode]
        dataset, to_device, collate = build_train_input(
            train, train_labels, ("augs_torch", {"im_size": args.im_size}), device=device,
            augment_on=augment_on, decode=decode,
        )
        sampler = build_sampler("balance", train_labels, {"n_labels": args.n_labels, "n_instances": args.n_instances})
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate,
            **loader_kwargs(args.loader_workers, pin_memory_for("auto", device.type), 2, True),
        )
        device_batches = DeviceBatches(loader, to_device, look_ahead=True)

        def batches():
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                yield from device_batches.epoch(range(epoch * 10**6, epoch * 10**6 + sampler.n_steps))
                epoch += 1

    stream = batches()
    start = None
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(device)
            start = time.perf_counter()
        step_start = time.perf_counter()
        batch = next(stream)
        x = batch["image"].contiguous(memory_format=torch.channels_last) if cuda else batch["image"]
        micro_step(model, criterion, optimizer, x, batch["label"], update=True, autocast_dtype=autocast, sync_logs=False)
        times.append(time.perf_counter() - step_start)  # host time per step (the device may lag)
    _sync(device)
    seconds = time.perf_counter() - start
    stream.close()
    return {"mode": mode, "images_per_s": args.steps * batch_size / seconds, "step_ms": 1000 * seconds / args.steps,
            "host_step_ms_median": 1000 * statistics.median(times[args.warmup:]), "steps": args.steps,
            "batch": batch_size, "arch": args.arch, "im_size": args.im_size,
            "loader_workers": 0 if mode == "synthetic" else args.loader_workers,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    parser.add_argument("--data", required=True, help="demo JPEG folder (generated when missing)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--n-procs", type=int, default=os.cpu_count() or 1, help="processes that draw the data")
    for key, value in FULL.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels, for every mode alike
    make_data(args.data, args.data_labels, args.data_images, args.data_size, args.n_procs)
    results = []
    for mode in args.modes.split(","):
        try:
            result = run_mode(mode, args, device)
        except Exception as err:  # keep the other rows
            result = {"mode": mode, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


# ---------------------------------------------------------------- the one table of gpu_check.sh


def table(out: str) -> str:
    """One compact table from what ``bench/gpu_check.sh`` left in ``out``."""
    lines = ["| part | result | vs | note |", "|---|---|---|---|"]
    tests = os.path.join(out, "tests.log")
    summary = open(tests).read().strip().splitlines()[-1:] if os.path.exists(tests) else ["not run"]
    lines.append(f"| GPU tests: tests/test_loading.py -k 'nvjpeg or side_stream' | {summary[0][:100] if summary else '?'} | | |")
    try:
        steps = json.load(open(os.path.join(out, "step.json")))
    except (OSError, ValueError):
        steps = []
    synthetic = next((r["images_per_s"] for r in steps if r.get("mode") == "synthetic" and "images_per_s" in r), None)
    for r in steps:
        if "error" in r:
            lines.append(f"| step, {r['mode']} | failed: {r['error'][:120]} | | |")
            continue
        share = f"{r['images_per_s'] / synthetic:.1%} of synthetic" if synthetic else ""
        lines.append(f"| step, {r['mode']} ({r['arch']} {r['im_size']} px, batch {r['batch']}, "
                     f"{r['loader_workers']} loader procs) | {r['images_per_s']:,.0f} img/s ({r['step_ms']:.1f} ms/step) "
                     f"| {share} | host {r['host_step_ms_median']:.1f} ms/step on {r['device']} |")
    recipe = os.path.join(out, "recipe_history.jsonl")
    if os.path.exists(recipe):
        rates = [json.loads(line).get("train/images_per_s") for line in open(recipe)]
        rates = [r for r in rates if r is not None][1:]  # the first epoch starts the loader processes
        if rates:
            share = f"{statistics.median(rates) / synthetic:.1%} of synthetic" if synthetic else ""
            lines.append(f"| recipe: jobs/train.py through Ray Train, 1 worker, the same model and batch "
                         f"(loader.decode=gpu on a GPU) | "
                         f"{statistics.median(rates):,.0f} img/s (median of {len(rates)} epochs) | {share} | "
                         "incl. epoch turnover |")
    else:
        lines.append("| recipe: jobs/train.py on Ray | not run | | |")
    log = os.path.join(out, "validation.log")
    text = open(log).read() if os.path.exists(log) else ""
    ours = re.search(r"\| raymetric topk_shard \(([^)]*)\) \| ([\d.]+) s \| exact on 512 sampled queries: (\w+)", text)
    naive = re.search(r"\| bf16 matmul \+ torch.topk[^|]*\| ([\d.]+) s", text)
    size = re.search(r"exact top-(\d+), (\d+) x (\d+) x (\d+)", text)
    if ours:
        what = f"exact top-{size.group(1)}, {size.group(2)} x {size.group(3)} x {size.group(4)}" if size else "exact top-k"
        vs = f"naive bf16 matmul + topk {naive.group(1)} s" if naive else ""
        lines.append(f"| validation: {what} ({ours.group(1)}) | {ours.group(2)} s | {vs} | exact on sample: {ours.group(3)} |")
    else:
        tail = text.strip().splitlines()[-1][:120] if text.strip() else "not run"
        lines.append(f"| validation top-k (bench/validation.py --gpu-only) | {tail} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "table":
        text = table(sys.argv[2])
        print(text)
        with open(os.path.join(sys.argv[2], "table.md"), "w") as f:
            f.write(text + "\n")
    else:
        main()

"""Miner + loss cost as a share of a training step, raymetric's building blocks and OML 4.0's, in the same run.

    python bench/miner_loss.py                      # CPU: resnet10t at 64 px, batch 256 (32 labels x 8)
    python bench/miner_loss.py --threads 1          # as a Ray Train worker with 1 CPU (and on a busy machine)
    python bench/miner_loss.py --device cuda --arch resnet50 --im-size 224

A training step is the extractor's forward and backward on a batch of random images, the loss (raymetric's
``triplet_with_miner`` + ``hard_triplets``) and an Adam update, timed whole. Each miner + loss is timed
alone on the embeddings of that batch: mining, loss forward and backward to the embeddings (the part a
step spends in them). OML 4.0.0's ``TripletLossWithMiner(HardTripletsMiner())`` runs in a subprocess of
OML's side virtualenv (``bench/oml_env.py``, created on first use) on the same embeddings and labels, and
its loss value is checked against raymetric's. Medians of repeated calls; one process, so these are the
costs of a single worker holding the whole batch (with W workers each computes the terms of 1/W of it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from raymetric.extractors import TimmExtractor  # noqa: E402
from raymetric.losses import build_criterion, reduce_loss  # noqa: E402

# (label, criterion, criterion args, miner) measured for raymetric; the first is the one OML is compared with.
CASES = [
    ("triplet_with_miner + hard_triplets", "triplet_with_miner", {"margin": 0.2}, {"name": "hard_triplets"}),
    ("triplet_with_miner + n_hard_triplets [2,3] x 3", "triplet_with_miner", {"margin": 0.2},
     {"name": "n_hard_triplets", "args": {"n_positive": [2, 3], "n_negative": 3}}),
    ("triplet_with_miner + hard_cluster", "triplet_with_miner", {"margin": 0.2}, {"name": "hard_cluster"}),
    ("triplet_with_miner + miner_with_bank (4 batches)", "triplet_with_miner", {"margin": 0.2},
     {"name": "miner_with_bank", "args": {"bank_size_in_batches": 4}}),
    ("triplet_with_miner + all_triplets (cap 10000)", "triplet_with_miner", {"margin": 0.2},
     {"name": "all_triplets", "args": {"max_output_triplets": 10000}}),
    ("triplet (all triplets, uncapped)", "triplet", {"margin": 0.2}, None),
    ("arcface (1000 classes)", "arcface", {"m": 0.4, "s": 64.0}, None),
    ("contrastive", "contrastive", {}, None),
    ("multi_similarity", "multi_similarity", {}, None),
    ("surrogate_precision (k=5)", "surrogate_precision", {"k": 5}, None),
]

OML_SCRIPT = r"""
import json, statistics, sys, time, torch
from oml.losses.triplet import TripletLossWithMiner
from oml.miners.inbatch_hard_tri import HardTripletsMiner
data = torch.load(sys.argv[1])
emb, labels, repeats = data["emb"].to(sys.argv[2]), data["labels"].to(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
criterion = TripletLossWithMiner(margin=0.2, miner=HardTripletsMiner(), reduction="mean", need_logs=True)
def once():
    x = emb.clone().requires_grad_(True)
    loss = criterion(x, labels)
    loss.backward()
    return loss
for _ in range(3):
    once()
times = []
for _ in range(repeats):
    if sys.argv[2] == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); loss = once()
    if sys.argv[2] == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
import oml
print(json.dumps({"ms": 1000 * statistics.median(times), "loss": float(loss), "version": oml.__version__}))
"""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(model, criterion, images, labels, device, repeats) -> float:
    """Median seconds of a full training step (forward, loss, backward, Adam)."""
    optimizer = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), lr=1e-4)
    autocast = device == "cuda"
    times = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            emb = model(images)
        loss, _ = reduce_loss(criterion(emb.float(), labels), sync_logs=False)  # as the recipe does
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_loss(criterion, emb, labels, device, repeats) -> tuple[float, float]:
    """Median milliseconds of mining + loss forward + backward to the embeddings, and the loss value."""
    def once():
        x = emb.clone().requires_grad_(True)
        loss, _ = reduce_loss(criterion(x, labels), sync_logs=False)  # as the recipe does: no host sync for logs
        loss.backward()
        return loss

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        loss = once()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), float(loss.detach())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet10t")
    parser.add_argument("--im-size", type=int, default=64)
    parser.add_argument("--n-labels", type=int, default=32)
    parser.add_argument("--n-instances", type=int, default=8)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--loss-repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch threads, here and in OML's process (default: torch's); "
                        "a Ray Train worker with 1 CPU runs 1")
    parser.add_argument("--no-oml", action="store_true", help="skip OML (no side virtualenv)")
    parser.add_argument("--oml-python", help="a python that imports OML 4.0.0 (default: bench/oml_env.py's side venv)")
    args = parser.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.n_labels * args.n_instances
    torch.manual_seed(0)
    model = TimmExtractor(args.arch, embedding_size=args.embedding_size, batchnorm_neck=True).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, args.im_size, args.im_size, device=device)
    if device == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.n_labels, device=device).repeat_interleave(args.n_instances)
    step_criterion = build_criterion("triplet_with_miner", {"margin": 0.2}, {"name": "hard_triplets"}).to(device)
    step_s = time_step(model, step_criterion, images, labels, device, args.step_repeats)
    with torch.no_grad():
        emb = model.eval()(images).float()  # [B, D] the embeddings the losses see
    threads = torch.get_num_threads()
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{threads} threads'}), "
          f"{args.arch} at {args.im_size} px, batch {batch} = {args.n_labels} labels x {args.n_instances}, "
          f"embedding {args.embedding_size}, torch {torch.__version__}")
    print(f"training step (forward + hard-triplet loss + backward + Adam): {1000 * step_s:.1f} ms (median of {args.step_repeats})")

    rows = []
    for label, name, crit_args, miner in CASES:
        criterion = build_criterion(name, crit_args, miner, seed=0, in_features=emb.shape[1], num_classes=1000).to(device)
        ms, value = time_loss(criterion, emb, labels, device, args.loss_repeats)
        rows.append(("raymetric", label, ms, value))
    if not args.no_oml:
        if args.oml_python:
            python = args.oml_python
        else:
            from bench.oml_env import oml_python

            python = oml_python()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "emb.pt")
            torch.save({"emb": emb.cpu(), "labels": labels.cpu()}, path)
            out = subprocess.run([python, "-c", OML_SCRIPT, path, device, str(args.loss_repeats), str(torch.get_num_threads())],
                                 capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"OML's measurement failed:\n{out.stderr[-3000:]}")
        oml = json.loads(out.stdout.strip().splitlines()[-1])
        rows.insert(1, (f"OML {oml['version']}", "TripletLossWithMiner(HardTripletsMiner)", oml["ms"], oml["loss"]))
        ours = rows[0][3]
        status = "same" if abs(oml["loss"] - ours) <= 1e-5 * max(1.0, abs(ours)) else "DIFFERENT"
        print(f"hard-triplet loss value: raymetric {ours:.6f}, OML {oml['loss']:.6f} ({status})")

    width = max(len(r[1]) for r in rows)
    print(f"\n| {'library':<16} | {'miner + loss':<{width}} | ms per call | share of the step |")
    print(f"|{'-' * 18}|{'-' * (width + 2)}|-------------|-------------------|")
    for lib, label, ms, _ in rows:
        print(f"| {lib:<16} | {label:<{width}} | {ms:11.2f} | {100 * ms / 1000 / step_s:16.2f}% |")


if __name__ == "__main__":
    main()

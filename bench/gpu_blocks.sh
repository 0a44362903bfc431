#!/usr/bin/env bash
# The training building blocks on the GPU machine, in one run (about 5 minutes):
#   1. tests/test_gpu.py: a bf16-autocast, channels_last training step; mining on the GPU equals the CPU's;
#   2. bench/miner_loss.py on the GPU: ResNet-50 at 224 px, batch 256 (64 labels x 4), raymetric and OML 4.0.0;
#   3. bench/miner_loss.py on the machine's CPUs (resnet10t at 64 px, batch 256), raymetric and OML;
#   4. the ArcFace demo recipe on the GPU through Ray Train (1 worker, bf16, channels_last), a few epochs.
# Needs .device/pydeps.tar.xz with Ray and OML: bash ../shared/gpu/make-bundle.sh open-metric-learning==4.0.0 \
#   omegaconf==2.4.0 antlr4-python3-runtime==4.9.3, and OML's other imports in .device/omldeps (copy gdown, bs4,
#   soupsieve, validators and their dist-info folders from .bench/oml-venv). Carry .device; there: bash bench/gpu_blocks.sh "$OUT"
set -uo pipefail
out="${1:-/tmp/gpu_blocks}"
mkdir -p "$out" .device/site
tar -xJf .device/pydeps.tar.xz -C .device/site
export PYTHONPATH="$PWD/.device/site:$PWD" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
# OML's own imports that the machine lacks (gdown, bs4, validators: pure Python, copied from OML's side venv
# into .device/omldeps), for OML's subprocess only.
printf '#!/bin/sh\nPYTHONPATH=%s/.device/omldeps:$PYTHONPATH exec python3 "$@"\n' "$PWD" >/tmp/oml_python
chmod +x /tmp/oml_python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

echo "== 1. GPU step tests"
timeout 120 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/test_gpu.log" | tail -3

echo "== 2. miner + loss share of a ResNet-50 step on the GPU"
timeout 240 python3 bench/miner_loss.py --device cuda --arch resnet50 --im-size 224 --n-labels 64 --n-instances 4 \
    --step-repeats 10 --loss-repeats 50 --oml-python /tmp/oml_python 2>&1 | tee "$out/bench_gpu.log" | grep -v Warning

echo "== 3. the same on the CPUs (resnet10t, 64 px, batch 256)"
timeout 240 python3 bench/miner_loss.py --device cpu --step-repeats 3 --loss-repeats 20 --oml-python /tmp/oml_python 2>&1 \
    | tee "$out/bench_cpu.log" | grep -v Warning

echo "== 4. the ArcFace demo recipe on the GPU (Ray Train, 1 worker, bf16, channels_last)"
timeout 300 python3 jobs/train.py --config configs/demo_arcface.yaml ray.num_workers=1 ray.use_gpu=true ray.dashboard=false \
    precision=bf16 max_epochs=6 valid_period=3 scheduling.scheduler.args.T_max=60 num_workers=4 \
    ray.storage_path=/tmp/runs ray.name=arcface_gpu 2>&1 | tee "$out/recipe_gpu.log" | grep -E "^epoch|cmc@1|run:|Error|error" | head -20
ls /tmp/runs/arcface_gpu 2>/dev/null

#!/usr/bin/env bash
# Training throughput and validation top-k on the GPU machine, in one run of about 3 minutes; one table at the end.
#
#   bash bench/gpu_check.sh "$OUT"            # on the H200 (carry .device: Ray comes from .device/pydeps.tar.xz)
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh /tmp/gpu_check --tiny   # CPU dry run, tiny sizes (~1 min)
#
# 0. tests/test_loading.py's GPU tests (nvJPEG decoding, batches prepared on a side stream);
# 1. data: demo JPEGs (1600 x 4 train images at 256 px, a third of them larger canvases with boxes), drawn
#    by the demo generator on every core;
# 2. bench/gpu_step.py: raymetric's step (ResNet-50, 224 px, batch 256 = 64 x 4, bf16, channels_last,
#    hard triplets, fused Adam) on synthetic input, then on the JPEGs decoded on the CPU (float32 or uint8
#    batches, 14 DataLoader processes) and decoded on the GPU (nvJPEG); 5 warm-up + 20 timed steps each;
# 3. bench/validation.py --gpu-only: exact top-16 of 1M x 1M x 256 against bf16 matmul + torch.topk;
# 4. jobs/train.py through Ray Train (1 GPU worker, loader.decode=gpu), 4 epochs, if time is left.
# Logs go to $1; the table is printed last and written to $1/table.md. Parts that overrun their time are cut
# (their row says so); the whole stays within GPU_CHECK_BUDGET_S seconds (default 200).
set -uo pipefail
out="${1:-/tmp/gpu_check}"
tiny="${2:-}"
py="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET_S:-200}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
data="${GPU_CHECK_DATA:-/tmp/raymetric_gpu_check_data}"  # outside $out: only a few small files go back
start=$SECONDS
left() { local s=$(( budget - (SECONDS - start) )); echo $(( s > 1 ? s : 1 )); }
cap() { local s; s=$(left); echo $(( s < $1 ? s : $1 )); }  # the time left, at most $1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Ray is needed by part 4 only: unpack its bundle in the background meanwhile (on PYTHONPATH for part 4 alone,
# so that nothing half-unpacked is imported before).
ray_path=""
if ! "$py" -c "import ray" 2>/dev/null && [ -f .device/pydeps.tar.xz ]; then
  mkdir -p .device/site
  tar -xJf .device/pydeps.tar.xz -C .device/site &
  ray_path="$PWD/.device/site:"
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU") | tee "$out/gpu.txt"
nproc | sed 's/^/cores: /' | tee -a "$out/gpu.txt"
# DataLoader processes hand batches over in /dev/shm: a small one (a container's 64 MB) makes them fail.
df -h /dev/shm | tail -1 | sed 's/^/shm: /' | tee -a "$out/gpu.txt"

if [ "$tiny" = "--tiny" ]; then
  dataset="$data/tiny"; step_args=(--tiny --data "$dataset"); val_size=(4096 64 16); recipe_overrides=(
    "transforms_train={name: augs_torch, args: {im_size: 64}}" transforms_val.args.im_size=64
    "extractor={name: timm, args: {arch: resnet10t, normalise_features: true}}"
    "sampler={name: balance, args: {n_labels: 8, n_instances: 4}}" num_workers=2 ray.use_gpu=false
    ray.cpus_per_worker=2 max_epochs=2 valid_period=2 "optimizer={name: adam, args: {lr: 1.0e-4}}")
else
  dataset="$data/full"; step_args=(--data "$dataset"); val_size=(1000000 256 16); recipe_overrides=(
    "transforms_train={name: augs_torch, args: {im_size: 224}}" transforms_val.args.im_size=224
    "extractor={name: timm, args: {arch: resnet50, normalise_features: true}}"
    "sampler={name: balance, args: {n_labels: 64, n_instances: 4}}" num_workers=14 ray.use_gpu=true
    ray.cpus_per_worker="$(( $(nproc) - 1 ))" loader.decode=gpu precision=bf16 max_epochs=4 valid_period=4
    "optimizer={name: adam, args: {lr: 1.0e-4, fused: true}}")
fi

echo "== 0. GPU tests of the input pipeline: nvJPEG against the CPU, side-stream batches against inline ones"
timeout -k 5 "$(cap 60)" "$py" -m pytest -q -p no:cacheprovider tests/test_loading.py -k "nvjpeg or side_stream" \
  >"$out/tests.log" 2>&1
tail -1 "$out/tests.log"

echo "== 1-2. data, and the step fed four ways ($(left) s left)"
timeout -k 5 "$(cap 150)" "$py" bench/gpu_step.py "${step_args[@]}" --json "$out/step.json" \
  2>&1 | tee "$out/step.log" | grep -v -i warning

echo "== 3. validation top-k ($(left) s left)"
if [ "$(left)" -gt 20 ]; then
  timeout -k 5 "$(cap 120)" "$py" bench/validation.py --gpu-only --gpu-size "${val_size[@]}" \
    2>&1 | tee "$out/validation.log" | grep -v -i warning
fi

echo "== 4. the recipe through Ray Train ($(left) s left)"
if [ "$(left)" -gt 45 ]; then
  wait  # the Ray bundle
  runs="$data/runs"
  rm -rf "$runs"
  PYTHONPATH="$ray_path$PYTHONPATH" timeout -k 5 "$(cap 150)" "$py" jobs/train.py --config configs/demo.yaml --quiet \
    dataset_root="$dataset" demo_data=null "${recipe_overrides[@]}" \
    scheduling=null validate_untrained=false logger=null \
    ray.num_workers=1 ray.dashboard=false ray.storage_path="$runs" ray.name=recipe \
    >"$out/recipe.log" 2>&1
  echo "exit $? ($(tail -1 "$out/recipe.log"))"
  cp "$runs/recipe/history.jsonl" "$out/recipe_history.jsonl" 2>/dev/null
  rm -rf "$runs"
fi

echo "== table ($(( SECONDS - start )) s in all)"
"$py" bench/gpu_step.py table "$out"

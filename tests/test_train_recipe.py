"""The recipe's driver-side checks against the dataset, and one real 2-worker Ray Train run of the building blocks."""

import json
import os

import pytest

from raymetric.config import ConfigError, load_config
from raymetric.samplers import SamplerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "demo_data=null", "transforms_train.args.im_size=32", "transforms_val.args.im_size=32",
    "extractor.args.arch=resnet10t", "scheduling.scheduler.args.T_max=2",
]


def _cfg(tiny_demo, tmp_path, *overrides):
    return load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                       [f"dataset_root={tiny_demo}", f"ray.storage_path={tmp_path}", *TINY, *overrides])


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["sampler={name: category_balance, args: {n_categories: 2, n_labels: 4, n_instances: 2}}"], SamplerError,
         "sampler.args.n_labels=4: every category needs >= 4 labels"),
        (["sampler={name: balance, args: {n_labels: 10, n_instances: 2}}"], SamplerError,
         "n_labels=10 is more than the 8 labels in the training split"),
        (["sampler=null", "bs_train=64"], SamplerError, "bs_train=64 must be in [1, 32]"),
        (["criterion={name: arcface, args: {num_classes: 100}}"], ConfigError,
         "criterion.args.num_classes=100 does not match the number of training labels, 8"),
        (["criterion={name: arcface, args: {in_features: 384}}"], ConfigError,
         "criterion.args.in_features=384 does not match the extractor's embedding size, 128"),
    ],
)
def test_prepare_run_checks_blocks_against_the_dataset(tiny_demo, tmp_path, overrides, error, message):
    from raymetric.train import prepare_run

    with pytest.raises(error) as err:
        prepare_run(_cfg(tiny_demo, tmp_path, *overrides))
    assert message in str(err.value)


@pytest.mark.ray
def test_two_workers_arcface_category_sampler_accumulation_mid_epoch_checkpoints(ray_session, tiny_demo, tmp_path):
    """mlp_arcface under DDP (model and criterion), category batches split across 2 workers, accumulation,
    a checkpoint every 2 global steps and the best one apart; a compiled extractor and a fused optimizer."""
    from raymetric.checkpoint import STATE_FILE, load_state
    from raymetric.train import fit

    cfg = _cfg(
        tiny_demo, tmp_path, "ray.name=recipe", "max_epochs=2", "valid_period=1",
        "criterion={name: mlp_arcface, args: {mlp_features: [32], s: 16.0}}",
        "sampler={name: category_balance, args: {n_categories: 2, n_labels: 2, n_instances: 2}}",
        "accumulate_grad_batches=2", "checkpoint_every_n_steps=2", "gradient_clip_val=5.0",
        "optimizer.groups={loss: {lr: 0.01}}",
        # The GPU-step options, on CPU: the compiled extractor under DDP, a fused optimizer.
        "compile=true", "compile_backend=aot_eager", "fused_optimizer=true",
        "loader.cache=true", "loader.cache_size=40",  # training images from the decoded cache
    )
    result = fit(cfg, quiet=True)
    history = [json.loads(line) for line in open(os.path.join(result.run_dir, "history.jsonl"))]
    reports = [(h.get("epoch"), h.get("step")) for h in history if "event" not in h]
    # 4 global steps per epoch (ceil(8 labels / 2)): a mid-epoch checkpoint after step 2, then the epoch's.
    assert reports == [(0, None), (0, 2), (1, None), (1, 2), (2, None)]
    checkpoints = sorted(d for d in os.listdir(result.run_dir) if d.startswith("checkpoint_2"))  # checkpoint_<date>
    states = [load_state(os.path.join(result.run_dir, d, STATE_FILE)) for d in checkpoints]
    assert [(s["epoch"], s["step"]) for s in states] == [(1, 2), (2, 0)], "Ray keeps the latest two"
    mid, last = states
    assert mid["partial_epoch"]["steps"] == 2 and "loss" in mid["partial_epoch"]["sums"]
    assert last["world_size"] == 2 and len(last["rng"]) == 2 and last["optimizer_steps"] == 4
    assert last["criterion"]["arcface.weight"].shape == (8, 32)
    assert "_orig_mod" not in "".join(last["model"]) and last["optimizer"]["param_groups"][0]["fused"] is True
    best = load_state(os.path.join(result.run_dir, "best", STATE_FILE))
    assert best["best"] == max(h["val/cmc@1"] for h in history if h.get("epoch") in (1, 2) and "val/cmc@1" in h)
    assert result.metrics["n_queries"] == 24
    assert len(os.listdir(os.path.join(str(tmp_path), ".image_cache"))) == 1  # built once, on the driver

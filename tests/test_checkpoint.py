"""The checkpoint holds everything needed to continue exactly; writes are atomic; the recipe writes it all.

The recipe runs in Ray Train's local mode (``ScalingConfig(num_workers=0)``: the train function runs in
this process, no Ray cluster), which exercises data, model, criterion, checkpoint and best-checkpoint
code in a second or two.
"""

import copy
import math
import os
import random

import numpy as np
import pytest
import torch

from raymetric.checkpoint import (
    STATE_FILE,
    capture_rng,
    load_state,
    restore_rng,
    restore_training_state,
    save_atomic,
    step_seed,
    training_state,
)
from raymetric.losses import build_criterion, reduce_loss
from raymetric.optim import build_lr_schedule, build_optimizer, param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_atomic({"rng": capture_rng()}, str(tmp_path / "s.pt"))
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    restore_rng(load_state(str(tmp_path / "s.pt"))["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_step_seeds_differ_per_seed_epoch_step_and_rank():
    seeds = {step_seed(s, e, t, r) for s in (0, 1) for e in (0, 1) for t in (0, 1) for r in (0, 1)}
    assert len(seeds) == 16 and step_seed(0, 1, 2, 3) == step_seed(0, 1, 2, 3)


def test_atomic_save_keeps_the_previous_file_when_a_write_fails(tmp_path):
    path = str(tmp_path / STATE_FILE)
    save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"epoch": 2, "bad": lambda: None}, path)  # cannot be pickled: the write fails midway
    assert load_state(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == [STATE_FILE], "no temporary file left behind"


def test_atomic_copy_gives_the_same_bytes_and_keeps_the_previous_file_when_it_fails(tmp_path):
    from raymetric.checkpoint import copy_atomic

    src, path = str(tmp_path / "src.pt"), str(tmp_path / "best.pt")
    save_atomic({"epoch": 1}, path)
    save_atomic({"epoch": 2}, src)
    copy_atomic(src, path)
    assert open(path, "rb").read() == open(src, "rb").read() and load_state(path) == {"epoch": 2}
    with pytest.raises(FileNotFoundError):
        copy_atomic(str(tmp_path / "missing.pt"), path)
    assert load_state(path) == {"epoch": 2} and sorted(os.listdir(tmp_path)) == ["best.pt", "src.pt"]


class _Extractor(torch.nn.Module):
    feat_dim = 4

    def __init__(self):
        super().__init__()
        self.backbone, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def param_groups(self):
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))


def _build(criterion_name, criterion_args, miner):
    torch.manual_seed(0)
    extractor = _Extractor()
    criterion = build_criterion(criterion_name, criterion_args, miner, seed=3, in_features=4, num_classes=6)
    optimizer = build_optimizer("adamw", param_groups(extractor, criterion, {"head": {"lr": 0.01}}), {"lr": 0.003})
    scheduler = build_lr_schedule("cosine", optimizer, {"T_max": 10}, warmup=3)
    return extractor, criterion, optimizer, scheduler


def _train(objects, steps, start):
    extractor, criterion, optimizer, scheduler = objects
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(12, 6, generator=g) for _ in range(start + steps)]
    labels = torch.arange(6).repeat(2)
    for x in data[start:]:
        loss, _ = reduce_loss(criterion(extractor(x), labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    "criterion_name, criterion_args, miner",
    [
        ("triplet_with_miner", {"margin": 0.2},
         {"name": "miner_with_bank", "args": {"bank_size_in_batches": 2,
                                              "miner": {"name": "all_triplets", "args": {"max_output_triplets": 30}}}}),
        ("mlp_arcface", {"mlp_features": [5]}, None),
    ],
    ids=["bank-with-capped-all-triplets", "mlp_arcface"],
)
def test_state_is_complete_resumed_training_is_identical(tmp_path, criterion_name, criterion_args, miner):
    uninterrupted = _build(criterion_name, criterion_args, miner)
    _train(uninterrupted, 6, start=0)

    first = _build(criterion_name, criterion_args, miner)
    _train(first, 3, start=0)
    save_atomic(training_state(*first, step=3), str(tmp_path / STATE_FILE))
    resumed = _build(criterion_name, criterion_args, miner)
    restore_training_state(load_state(str(tmp_path / STATE_FILE)), *resumed)  # weights_only load
    _train(resumed, 3, start=3)

    for a, b in zip(uninterrupted[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b), "bitwise the same weights as an uninterrupted run"
    for a, b in zip(uninterrupted[1].parameters(), resumed[1].parameters()):
        assert torch.equal(a, b)
    assert uninterrupted[2].param_groups[1]["lr"] == resumed[2].param_groups[1]["lr"]


# ---------------------------------------------------------------- the recipe, in Ray Train's local mode


def _local_fit(tiny_demo, tmp_path, overrides):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymetric.config import load_config
    from raymetric.config import make_run_dir
    from raymetric.train import prepare_run, train_loop_per_worker

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        f"dataset_root={tiny_demo}", "demo_data=null", f"ray.storage_path={tmp_path}", "ray.num_workers=1",
        "transforms_train.args.im_size=32", "transforms_val.args.im_size=32", "extractor.args.arch=resnet10t",
        "max_epochs=2", "valid_period=1", "validate_untrained=false", "scheduling.scheduler.args.T_max=2", *overrides,
    ])
    cfg, _ = prepare_run(cfg)
    run_dir = make_run_dir(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "quiet": True, "run_dir": run_dir},
        scaling_config=ScalingConfig(num_workers=0),  # Ray: local mode, no cluster
        run_config=RunConfig(name=os.path.basename(run_dir), storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    # Local mode keeps no copy of Ray's checkpoints (their temporary directories are gone); the best
    # checkpoint is raymetric's own file, the same state as the latest one of its epoch.
    return result, load_state(os.path.join(run_dir, "best", STATE_FILE)), run_dir


RECIPE_CASES = {
    "bank-accumulate-clip-freeze-warmup": [
        "sampler.args.n_labels=2", "sampler.args.n_instances=2", "criterion.miner.name=miner_with_bank",
        "criterion.miner.args={bank_size_in_batches: 2}", "accumulate_grad_batches=2", "gradient_clip_val=1.0",
        "freeze_n_epochs=1", "scheduling.warmup=1", "checkpoint_every_n_steps=2", "optimizer.groups={head: {lr: 0.01}}",
    ],
    "arcface-category-sampler": [
        "criterion={name: mlp_arcface, args: {mlp_features: [16], s: 16.0, smoothing_epsilon: 0.1}}",
        "sampler={name: category_balance, args: {n_categories: 2, n_labels: 2, n_instances: 2}}",
        "optimizer.groups={loss: {lr: 0.01}}",
    ],
    "shuffled-batches-multi-similarity": ["sampler=null", "bs_train=8", "criterion={name: multi_similarity}"],
    "scheduler-every-2-batches-accumulate-2": [
        "sampler.args.n_labels=2", "sampler.args.n_instances=2", "accumulate_grad_batches=2",
        "scheduling.scheduler_interval=step", "scheduling.scheduler_frequency=2", "log_every_n_steps=1",
    ],
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_writes_a_complete_checkpoint_and_the_best_one(tiny_demo, tmp_path, case):
    result, best, run_dir = _local_fit(tiny_demo, tmp_path, RECIPE_CASES[case])
    expected_keys = {"model", "criterion", "optimizer", "scheduler", "epoch", "step", "optimizer_steps", "partial_epoch",
                     "best", "best_epoch", "last_val", "rng", "world_size", "config"}
    assert set(best) == expected_keys
    assert best["best"] == result.return_value["best"] and best["epoch"] == best["best_epoch"] == result.return_value["best_epoch"]
    assert best["step"] == 0 and best["world_size"] == 1 and len(best["rng"]) == 1
    assert best["last_val"]["cmc@1"] == best["best"]
    if "bank" in case:
        bank = best["criterion"]["_extra_state"]["miner"]
        assert bank["filled"] == 2 * 4 and bank["bank_emb"].shape == (8, 128), "the memory bank is in the checkpoint"
        assert best["optimizer_steps"] == 2 * best["epoch"], "4 global steps per epoch / accumulate 2"
        assert best["scheduler"]["_milestones"] == [1], "warm-up then the cosine"
        assert [g["name"] for g in best["optimizer"]["param_groups"]] == ["backbone", "head"]
        assert [g["initial_lr"] for g in best["optimizer"]["param_groups"]] == [1e-3, 0.01], "per-group learning rates"
    if "scheduler-every" in case:
        # Lightning's rule: 4 batches per epoch, optimizer steps after batches 2 and 4, both multiples of 2:
        # 2 scheduler steps per epoch (counting optimizer steps instead would give 1).
        assert best["optimizer_steps"] == 2 * best["epoch"] and best["scheduler"]["last_epoch"] == 2 * best["epoch"]
        # The epoch's train/lr is the rate its last step trained with, as that step's record says.
        records = result.metrics["steps"]
        assert [r["step"] for r in records] == [3, 4] and result.metrics["train/lr"] == records[-1]["lr"]
        assert records[0]["lr"] != records[1]["lr"], "the scheduler stepped after step 3"
    if "arcface" in case:
        assert best["criterion"]["arcface.weight"].shape == (8, 16), "class weights (8 train labels) are saved"
        assert [g["name"] for g in best["optimizer"]["param_groups"]] == ["backbone", "head", "loss"]


def _optimizer_and_schedule(lr, t_max, weight_decay=0.0, warmup=2):
    from raymetric.optim import build_lr_schedule, build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = build_optimizer("adamw", [{"params": params, "name": "backbone"}], {"lr": lr, "weight_decay": weight_decay})
    return params, opt, build_lr_schedule("cosine", opt, {"T_max": t_max}, warmup=warmup)


def _run_steps(params, opt, sched, n):
    for _ in range(n):
        opt.zero_grad()
        params[0].pow(2).sum().backward()
        opt.step()
        sched.step()


def test_resume_continues_the_optimizer_under_the_configs_arguments():
    """Same config: the checkpoint's optimizer and scheduler, bit for bit. Changed lr, weight decay and
    T_max: moments and position kept, the lr reached scaled by new/old base, the new T_max from there on."""
    from raymetric.checkpoint import restore_training_state

    params, opt, sched = _optimizer_and_schedule(1e-3, 10)
    _run_steps(params, opt, sched, 5)
    state = {"model": {}, "criterion": {}, "optimizer": copy.deepcopy(opt.state_dict()),
             "scheduler": copy.deepcopy(sched.state_dict())}
    module = torch.nn.Module()

    _, same_opt, same_sched = _optimizer_and_schedule(1e-3, 10)
    restore_training_state(state, module, module, same_opt, same_sched)
    assert same_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert same_sched.state_dict() == sched.state_dict()

    new_params, new_opt, new_sched = _optimizer_and_schedule(5e-3, 40, weight_decay=0.05)
    restore_training_state(state, module, module, new_opt, new_sched)
    group, saved_group = new_opt.param_groups[0], state["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(saved_group["lr"] * 5) and group["initial_lr"] == 5e-3
    assert group["weight_decay"] == 0.05 and group["betas"] == saved_group["betas"]
    cosine = new_sched._schedulers[1]
    assert cosine.T_max == 40 and cosine.last_epoch == state["scheduler"]["_schedulers"][1]["last_epoch"]
    assert new_sched.last_epoch == state["scheduler"]["last_epoch"]
    moments = new_opt.state_dict()["state"][0]
    torch.testing.assert_close(moments["exp_avg"], state["optimizer"]["state"][0]["exp_avg"], rtol=0, atol=0)
    t, before = cosine.last_epoch + 1, group["lr"]
    new_params[0].grad = torch.zeros(5)
    new_opt.step()
    new_sched.step()
    expected = (1 + math.cos(math.pi * t / 40)) / (1 + math.cos(math.pi * (t - 1) / 40)) * before  # eta_min 0
    assert group["lr"] == pytest.approx(expected)

"""Optimizers and schedulers by name, parameter groups, warm-up, and the training step's accumulation and clipping."""

import copy
import os

import pytest
import torch

from raymetric.checkpoint import load_state, save_atomic
from raymetric.losses import build_criterion
from raymetric.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    build_lr_schedule,
    build_optimizer,
    extractor_param_groups,
    param_groups,
)
from raymetric.step import micro_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Arguments the schedulers need.
SCHEDULER_ARGS = {
    "multi_step": {"milestones": [2, 4]},
    "step": {"step_size": 2},
    "exponential": {"gamma": 0.9},
    "cosine": {"T_max": 5},
    "cosine_annealing": {"T_max": 5},
    "cosine_warm_restarts": {"T_0": 3},
    "linear": {},
    "constant": {},
    "polynomial": {"total_iters": 5},
    "cyclic": {"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 2},
    "one_cycle": {"max_lr": 0.01, "total_steps": 20},
}


class _Extractor(torch.nn.Module):
    feat_dim = 3

    def __init__(self):
        super().__init__()
        self.backbone, self.head = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def param_groups(self):
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))


def test_scheduler_table_covers_the_registry():
    assert set(SCHEDULER_ARGS) == set(SCHEDULERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_steps_with_groups(name):
    model, criterion = _Extractor(), build_criterion("arcface", {}, in_features=3, num_classes=4)
    groups = param_groups(model, criterion, {"head": {"lr": 0.5}, "loss": {"lr": 0.25}})
    optimizer = build_optimizer(name, groups, {"lr": 0.1})
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("backbone", 0.1), ("head", 0.5), ("loss", 0.25)]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_state_round_trips(tmp_path, name, warmup):
    """Saved mid-run (loaded with weights_only) and continued: the same learning rates as an uninterrupted run."""
    def build():
        params = [torch.nn.Parameter(torch.zeros(1))]
        optimizer = build_optimizer("sgd", params, {"lr": 0.01, "momentum": 0.9})
        return optimizer, build_lr_schedule(name, optimizer, SCHEDULER_ARGS[name], warmup=warmup)

    optimizer, scheduler = build()
    lrs = []
    for i in range(10):
        if i == 4:
            save_atomic({"opt": optimizer.state_dict(), "sched": scheduler.state_dict()}, str(tmp_path / "s.pt"))
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    optimizer, scheduler = build()
    state = load_state(str(tmp_path / "s.pt"))
    optimizer.load_state_dict(state["opt"])
    scheduler.load_state_dict(state["sched"])
    resumed = []
    for _ in range(4, 10):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == pytest.approx(lrs[4:], rel=1e-12)


def test_warmup_ramps_linearly_then_hands_over():
    optimizer = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], {"lr": 1.0})
    scheduler = build_lr_schedule("cosine", optimizer, {"T_max": 2}, warmup=4, warmup_start_factor=0.2)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.0])


def test_param_groups_leave_out_empty_groups_and_refuse_unknown_ones():
    groups = param_groups(_Extractor(), build_criterion("triplet", {}), {})
    assert [g["name"] for g in groups] == ["backbone", "head"]
    plain = param_groups(torch.nn.Linear(2, 2), torch.nn.Identity())
    assert [g["name"] for g in plain] == ["backbone"], "an extractor that does not say is all backbone"
    with pytest.raises(ValueError, match="unknown parameter group"):
        param_groups(_Extractor(), torch.nn.Identity(), {"neck": {"lr": 1.0}})
    assert len(extractor_param_groups(_Extractor())["head"]) == 2


# ---------------------------------------------------------------- the step: accumulation and clipping


def _setup():
    torch.manual_seed(0)
    model = _Extractor().double()
    criterion = build_criterion("triplet_with_miner", {"margin": 0.5}, {"name": "hard_triplets"})
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.arange(4).repeat(2)) for _ in range(2)]
    return model, criterion, batches


def _grads_of(model, criterion, batch):
    from raymetric.losses import reduce_loss

    model.zero_grad()
    reduce_loss(criterion(model(batch[0]), batch[1]))[0].backward()
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_applies_the_mean_of_the_batch_gradients():
    model, criterion, batches = _setup()
    reference = copy.deepcopy(model)
    expected = [(a + b) / 2 for a, b in zip(*(_grads_of(reference, criterion, b) for b in batches))]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    micro_step(model, criterion, optimizer, *batches[0], update=False, accumulate=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "no update before the window ends"
    micro_step(model, criterion, optimizer, *batches[1], update=True, accumulate=2)
    for b, p, g in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters()), "gradients zeroed after the update"


def test_clipping_scales_the_global_gradient_norm():
    model, criterion, batches = _setup()
    grads = _grads_of(copy.deepcopy(model), criterion, batches[0])
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    clip = float(norm) / 4
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    micro_step(model, criterion, optimizer, *batches[0], update=True, clip_grad_norm=clip)
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    for a, g in zip(applied, grads):
        torch.testing.assert_close(a, g * clip / norm, rtol=1e-5, atol=1e-12)


def test_compiled_extractor_and_fused_optimizer_train_as_the_plain_ones():
    """nn.Module.compile (in place) keeps the state dict's keys and gives the eager loss and gradients; a
    fused Adam takes the same steps as the default one (here on CPU, where torch has a fused Adam too)."""
    from raymetric.extractors import build_extractor
    from raymetric.optim import build_optimizer, optimizer_args

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def model_and_grads(compiled: bool):
        torch.manual_seed(0)
        model = build_extractor("timm", {"arch": "resnet10t", "embedding_size": 8})
        if compiled:
            model.compile(backend="aot_eager")
        loss = model(x).pow(2).sum()
        loss.backward()
        return model, loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    plain, plain_loss, plain_grads = model_and_grads(False)
    compiled, loss, grads = model_and_grads(True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6)

    def adam_steps(fused: bool):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(4, 5))]
        opt = build_optimizer("adam", params, optimizer_args("adam", {"lr": 1e-2}, fused, "cpu"))
        for step in range(3):
            opt.zero_grad()
            sum((p * (step + 1)).sin().sum() for p in params).backward()
            opt.step()
        return params, opt

    (default, default_opt), (fused, fused_opt) = adam_steps(False), adam_steps(True)
    assert default_opt.param_groups[0]["fused"] is None and fused_opt.param_groups[0]["fused"] is True
    for a, b in zip(default, fused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compile_and_fused_options_are_checked_on_the_driver():
    from raymetric.config import ConfigError, check_config, load_config

    base = [f"dataset_root={ROOT}"]
    with pytest.raises(ConfigError, match="config key compile_backend: unknown backend 'nope'"):
        check_config(load_config(os.path.join(ROOT, "configs", "demo.yaml"), [*base, "compile=true", "compile_backend=nope"]))
    with pytest.raises(ConfigError, match="config key fused_optimizer: optimizer 'rprop' has no fused kernel"):
        check_config(load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                                 [*base, "fused_optimizer=true", "optimizer={name: rprop, args: {lr: 0.01}}"]))

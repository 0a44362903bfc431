"""The gathered miner + loss on W gloo processes give one process's gradients on the concatenated batch.

Every case runs the training step of the recipe (``raymetric.step``: DDP around the model and around
a criterion with parameters, gathers, ``reduce_loss``, accumulation with ``no_sync``, clipping,
freezing) for a few optimizer updates, and records the gradients every update applies (model *and*
criterion parameters, e.g. ArcFace's class weights), the weights after them and the logged losses.
One process on the concatenated batches is the oracle.
"""

import numpy as np
import pytest
import torch

from raymetric.distributed import all_gather_variable, all_gather_with_grad, world
from raymetric.losses import build_criterion
from raymetric.optim import extractor_param_groups, param_groups, set_trainable
from raymetric.samplers import BalancedBatchSampler
from raymetric.step import micro_step, unwrap, wrap_ddp
from tests.ddp_utils import run_in_ddp

N_LABELS, PER_LABEL, DIM, EMB = 12, 5, 6, 8
P, K = 6, 3  # 2 global steps per epoch
HARD = {"name": "hard_triplets", "args": {}}


class TinyExtractor(torch.nn.Module):
    """A backbone and a head, like TimmExtractor, in float64."""

    feat_dim = EMB

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, EMB)

    def param_groups(self):
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}

    def forward(self, x):
        return torch.nn.functional.normalize(self.head(self.backbone(x)), dim=1)


def _data():
    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(N_LABELS), PER_LABEL)
    x = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    return x, torch.as_tensor(labels)


def _run(criterion_name, criterion_args, miner=None, accumulate=1, clip=None, freeze_epochs=0, n_updates=2):
    """One worker's share of ``n_updates`` SGD updates; returns the applied gradients, final weights, losses."""
    rank, world_size = world()
    x, labels = _data()
    torch.manual_seed(1)
    extractor = TinyExtractor().double()
    criterion = build_criterion(
        criterion_name, criterion_args, miner, seed=5, in_features=EMB, num_classes=N_LABELS,
        label2category={j: j % 3 for j in range(N_LABELS)},
    ).double()
    optimizer = torch.optim.SGD(param_groups(extractor, criterion, {"loss": {"lr": 0.5}}), lr=0.1)
    applied = []
    optimizer.register_step_pre_hook(
        lambda opt, *_: applied.append([p.grad.clone() if p.grad is not None else None
                                        for g in opt.param_groups for p in g["params"]])
    )
    criterion_ddp = wrap_ddp(criterion, torch.device("cpu"))
    sampler = BalancedBatchSampler(labels.numpy(), P, K, world_size=world_size, rank=rank, seed=3)
    losses, frozen, model, epoch = [], None, extractor, 0
    while len(applied) < n_updates:
        if frozen != (epoch < freeze_epochs):
            frozen = epoch < freeze_epochs
            set_trainable(extractor_param_groups(extractor)["backbone"], not frozen)
            model = wrap_ddp(model, torch.device("cpu"))
        sampler.set_epoch(epoch)
        for step, idx in enumerate(sampler):
            update = (step + 1) % accumulate == 0 or step + 1 == len(sampler)
            logs = micro_step(model, criterion_ddp, optimizer, x[idx], labels[idx], update=update,
                              accumulate=accumulate, clip_grad_norm=clip)
            losses.append(logs["loss"])
            if len(applied) == n_updates:
                break
        epoch += 1
    weights = [p.detach().clone() for p in [*unwrap(model).parameters(), *criterion.parameters()]]
    return applied, weights, losses


CASES = [
    ("triplet_with_miner", {"margin": 0.2}, HARD),
    ("triplet_with_miner", {"margin": None}, HARD),
    ("triplet_with_miner", {"margin": 0.2, "reduction": "sum"}, HARD),
    ("triplet", {"margin": 0.2}, None),
    ("triplet_with_miner", {"margin": 0.2}, {"name": "all_triplets", "args": {"max_output_triplets": 60}}),
    ("triplet_with_miner", {"margin": 0.5}, {"name": "n_hard_triplets", "args": {"n_positive": [1, 2], "n_negative": 3}}),
    ("triplet_with_miner", {"margin": 0.5}, {"name": "hard_cluster", "args": {}}),
    ("triplet_with_miner", {"margin": 0.5}, {"name": "miner_with_bank", "args": {"bank_size_in_batches": 2}}),
    ("arcface", {"m": 0.4, "s": 16.0, "smoothing_epsilon": 0.1}, None),
    ("mlp_arcface", {"mlp_features": [10, 6], "s": 8.0}, None),
    ("surrogate_precision", {"k": 3}, None),
    ("contrastive", {"pos_margin": 0.1, "neg_margin": 1.2}, None),
    ("multi_similarity", {}, None),
]
# Step options, each with a loss over the global batch and one with parameters.
OPTIONS = [
    ("triplet_with_miner", {"margin": 0.2}, HARD, {"accumulate": 2, "n_updates": 2}),
    ("arcface", {"m": 0.4, "s": 16.0}, None, {"accumulate": 2, "clip": 0.05, "n_updates": 2}),
    ("triplet_with_miner", {"margin": 0.2}, HARD, {"clip": 0.01}),
    ("mlp_arcface", {"mlp_features": [6]}, None, {"freeze_epochs": 1, "n_updates": 4}),
]
ALL = [(*case, {}) for case in CASES] + OPTIONS


def _all_cases():
    # One process group per world size for every case: spawning gloo processes dominates the cost.
    return [_run(*case[:3], **case[3]) for case in ALL], _gather_orders(), _bank_after_steps()


def _gather_orders():
    rank, world_size = world()
    x = torch.full((2, 1), float(rank))
    y = torch.arange(rank + 1).float()[:, None] + 10 * rank
    return all_gather_with_grad(x).flatten().tolist(), all_gather_variable(y).flatten().tolist()


def _bank_after_steps(n_steps=5):
    """The memory bank of a ``miner_with_bank`` criterion after ``n_steps`` training steps."""
    miner = {"name": "miner_with_bank", "args": {"bank_size_in_batches": 3}}
    criterion = build_criterion("triplet_with_miner", {"margin": 0.2}, miner)
    rank, world_size = world()
    x, labels = _data()
    torch.manual_seed(1)
    model = wrap_ddp(TinyExtractor().double(), torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = BalancedBatchSampler(labels.numpy(), P, K, world_size=world_size, rank=rank, seed=3)
    done = 0
    for epoch in range(n_steps):
        sampler.set_epoch(epoch)
        for idx in sampler:
            micro_step(model, criterion, optimizer, x[idx], labels[idx], update=True)
            done += 1
            if done == n_steps:
                return criterion.miner.state_dict()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ddp_results(request):
    return request.param, run_in_ddp(request.param, _all_cases, timeout=300)


def _case_id(case):
    name, args, miner, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in args.items()), *([miner["name"]] if miner else []),
                     *(f"{k}={v}" for k, v in options.items())])


@pytest.mark.parametrize("case_index", range(len(ALL)), ids=[_case_id(c) for c in ALL])
def test_gradients_equal_single_process(ddp_results, case_index):
    name, args, miner, options = ALL[case_index]
    ref_applied, ref_weights, ref_losses = _run(name, args, miner, **options)  # one process, no process group
    assert len(ref_applied) == options.get("n_updates", 2)
    _, per_rank = ddp_results
    for case_results, _, _ in per_rank:
        applied, weights, losses = case_results[case_index]
        for grads, ref_grads in zip(applied, ref_applied, strict=True):
            for g, rg in zip(grads, ref_grads, strict=True):
                if rg is None:  # frozen: no gradient on any worker
                    assert g is None
                else:
                    torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7)
        for w, rw in zip(weights, ref_weights, strict=True):
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-7)
        assert losses == pytest.approx(ref_losses, rel=1e-9)


def test_arcface_class_weights_get_gradients_and_move(ddp_results):
    index = next(i for i, c in enumerate(ALL) if c[0] == "arcface")
    _, per_rank = ddp_results
    applied, weights, _ = per_rank[0][0][index]
    class_weight_grad = applied[0][-1]  # the loss group comes last
    assert class_weight_grad.shape == (N_LABELS, EMB) and class_weight_grad.abs().sum() > 0
    for _, other_weights, _ in (r[0][index] for r in per_rank[1:]):
        assert torch.equal(other_weights[-1], weights[-1]), "class weights identical on every worker"


def test_frozen_backbone_does_not_move_then_trains(ddp_results):
    index = next(i for i, c in enumerate(ALL) if c[3].get("freeze_epochs"))
    applied, _, _ = ddp_results[1][0][0][index]
    assert applied[0][0] is None and applied[1][0] is None, "backbone frozen in epoch 0 (2 updates)"
    assert applied[2][0] is not None, "backbone trains from epoch 1"


def test_gathers_are_in_rank_order_on_every_rank(ddp_results):
    world_size, per_rank = ddp_results
    expected_fixed = [float(r) for r in range(world_size) for _ in range(2)]
    expected_variable = [float(10 * r + i) for r in range(world_size) for i in range(r + 1)]
    for _, (fixed, variable), _ in per_rank:
        assert fixed == expected_fixed
        assert variable == expected_variable


def test_memory_bank_identical_on_every_worker(ddp_results):
    _, per_rank = ddp_results
    banks = [bank for _, _, bank in per_rank]
    single = _bank_after_steps()
    assert banks[0]["filled"] == 3 * P * K and banks[0]["ptr"] == (5 * P * K) % (3 * P * K)
    for bank in banks[1:]:
        assert torch.equal(bank["bank_emb"], banks[0]["bank_emb"]), "bitwise the same bank on every worker"
        assert torch.equal(bank["bank_labels"], banks[0]["bank_labels"])
        assert (bank["ptr"], bank["filled"]) == (banks[0]["ptr"], banks[0]["filled"])
    torch.testing.assert_close(banks[0]["bank_emb"], single["bank_emb"], rtol=1e-6, atol=1e-9)
    assert torch.equal(banks[0]["bank_labels"], single["bank_labels"])

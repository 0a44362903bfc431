"""The gathered miner + loss on W gloo processes give one process's gradients on the concatenated batch."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raymetric.distributed import all_gather_nograd, all_gather_variable, all_gather_with_grad, world
from raymetric.losses import build_criterion, reduce_loss
from raymetric.samplers import BalancedBatchSampler
from tests.ddp_utils import run_in_ddp

N_LABELS, PER_LABEL, DIM = 12, 5, 6
P, K = 6, 3


def _data():
    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(N_LABELS), PER_LABEL)
    x = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    return x, torch.as_tensor(labels)


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).double()


def _step(criterion_name: str, criterion_args: dict, miner: dict | None, n_steps: int = 2):
    """One worker's share of `n_steps` SGD steps; returns grads of the first step and final weights."""
    rank, world_size = world()
    x, labels = _data()
    model = _model()
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    criterion = build_criterion(criterion_name, criterion_args, miner)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = BalancedBatchSampler(labels.numpy(), P, K, world_size=world_size, rank=rank, seed=3)
    first_grads, losses = None, []
    for step, idx in enumerate(list(sampler)[:n_steps]):
        emb = torch.nn.functional.normalize(model(x[idx]), dim=1)
        lab = labels[idx]
        ref_emb, ref_labels = all_gather_with_grad(emb), all_gather_nograd(lab)
        anchor_ref_index = rank * len(emb) + torch.arange(len(emb))
        loss, logs = reduce_loss(criterion(emb, lab, ref_emb, ref_labels, anchor_ref_index))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        losses.append(logs["loss"])
    return first_grads, [p.detach().clone() for p in model.parameters()], losses


CASES = [
    ("triplet_with_miner", {"margin": 0.2}, {"name": "hard_triplets", "args": {}}),
    ("triplet_with_miner", {"margin": None}, {"name": "hard_triplets", "args": {}}),
    ("triplet_with_miner", {"margin": 0.2, "reduction": "sum"}, {"name": "hard_triplets", "args": {}}),
]


def _all_cases():
    # One process group per world size for every case: spawning gloo processes dominates the cost.
    return [_step(*case) for case in CASES], _gather_orders()


def _gather_orders():
    rank, world_size = world()
    x = torch.full((2, 1), float(rank))
    y = torch.arange(rank + 1).float()[:, None] + 10 * rank
    return all_gather_with_grad(x).flatten().tolist(), all_gather_variable(y).flatten().tolist()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ddp_results(request):
    return request.param, run_in_ddp(request.param, _all_cases)


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_gradients_equal_single_process(ddp_results, case_index):
    ref_grads, ref_weights, ref_losses = _step(*CASES[case_index])  # one process, no process group
    _, per_rank = ddp_results
    for case_results, _ in per_rank:
        grads, weights, losses = case_results[case_index]
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7)
        for w, rw in zip(weights, ref_weights):
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-7)
        assert losses == pytest.approx(ref_losses, rel=1e-9)


def test_gathers_are_in_rank_order_on_every_rank(ddp_results):
    world_size, per_rank = ddp_results
    expected_fixed = [float(r) for r in range(world_size) for _ in range(2)]
    expected_variable = [float(10 * r + i) for r in range(world_size) for i in range(r + 1)]
    for _, (fixed, variable) in per_rank:
        assert fixed == expected_fixed
        assert variable == expected_variable

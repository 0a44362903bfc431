import math

import pytest
import torch

from raymetric.losses import CRITERIA, TripletLoss, TripletLossWithMiner, build_criterion, reduce_loss
from raymetric.miners import MINERS, HardTripletMiner, build_miner


def _batch(n_labels=4, k=3, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_labels * k, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(n_labels).repeat_interleave(k)
    return emb, labels


def _brute_force_hard(emb, labels):
    triplets = []
    for a in range(len(emb)):
        pos = [(float(torch.dist(emb[a], emb[p])), p) for p in range(len(emb)) if p != a and labels[p] == labels[a]]
        neg = [(float(torch.dist(emb[a], emb[n])), n) for n in range(len(emb)) if labels[n] != labels[a]]
        if pos and neg:
            p = max(pos, key=lambda t: (t[0], -t[1]))[1]  # farthest; ties: smallest index
            n = min(neg)[1]
            triplets.append((a, p, n))
    return triplets


def test_hard_miner_matches_brute_force():
    for seed in range(5):
        emb, labels = _batch(seed=seed)
        t = HardTripletMiner().mine(emb, labels, emb, labels, torch.arange(len(emb)))
        assert list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist())) == _brute_force_hard(emb, labels)


def test_hard_miner_local_anchors_against_global_batch():
    emb, labels = _batch(n_labels=6, k=2, seed=3)
    full = _brute_force_hard(emb, labels)
    rows = torch.arange(4, 8)  # this worker's slice of the global batch
    t = HardTripletMiner().mine(emb[rows], labels[rows], emb, labels, rows)
    got = [(int(rows[a]), p, n) for a, p, n in zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist())]
    assert got == [tr for tr in full if tr[0] in rows.tolist()]


def test_anchor_without_positive_or_negative_gives_no_triplet():
    emb = torch.randn(3, 2)
    t = HardTripletMiner().mine(emb, torch.tensor([0, 0, 1]), emb, torch.tensor([0, 0, 1]), torch.arange(3))
    assert t.anchor.tolist() == [0, 1]
    t = HardTripletMiner().mine(emb, torch.zeros(3, dtype=torch.long), emb, torch.zeros(3, dtype=torch.long), torch.arange(3))
    assert len(t.anchor) == 0


@pytest.mark.parametrize("margin", [None, 0.0, 0.2, 1.5])
def test_triplet_loss_against_loop(margin):
    emb, labels = _batch(seed=1)
    crit = TripletLossWithMiner(margin=margin, reduction="mean")
    loss, logs = reduce_loss(crit(emb, labels))
    values = []
    for a, p, n in _brute_force_hard(emb, labels):
        d_ap, d_an = float(torch.dist(emb[a], emb[p])), float(torch.dist(emb[a], emb[n]))
        x = d_ap - d_an
        values.append(math.log1p(math.exp(x)) if margin is None else max(0.0, x + margin))
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-9)
    assert logs["loss"] == pytest.approx(loss.item())
    sum_loss, _ = reduce_loss(TripletLossWithMiner(margin=margin, reduction="sum")(emb, labels))
    assert sum_loss.item() == pytest.approx(sum(values), rel=1e-9)


def test_triplet_logs():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    n = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    _, logs = reduce_loss(TripletLoss(margin=0.5)(a, p, n))
    # triplet 1: 1 - 2 + 0.5 < 0 (inactive); triplet 2: 3 - 2 + 0.5 > 0 (active)
    assert logs == pytest.approx({"loss": 0.75, "active_triplets": 0.5, "pos_dist": 2.0, "neg_dist": 2.0})


def test_zero_distance_positive_has_finite_gradient():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss, _ = reduce_loss(TripletLossWithMiner(margin=0.2)(emb, torch.tensor([0, 0, 1, 1])))
    loss.backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_runs_and_backprops(name):
    emb, labels = _batch()
    emb.requires_grad_(True)
    loss, logs = reduce_loss(build_criterion(name, {})(emb, labels))
    loss.backward()
    assert torch.isfinite(loss) and emb.grad is not None and "loss" in logs


@pytest.mark.parametrize("name", sorted(MINERS))
def test_every_miner_gives_valid_triplets(name):
    emb, labels = _batch(seed=2)
    t = build_miner(name).mine(emb, labels, emb, labels, torch.arange(len(emb)))
    for a, p, n in zip(*t):
        assert labels[a] == labels[p] and a != p and labels[a] != labels[n]

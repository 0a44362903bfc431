"""Every criterion against a brute-force loop over its triplets, pairs or samples, and the cross-worker split."""

import itertools
import math

import pytest
import torch

from raymetric.losses import (
    CRITERIA,
    ArcFaceLoss,
    ArcFaceLossWithMLP,
    LossTerms,
    build_criterion,
    reduce_loss,
    triplet_terms,
)
from raymetric.miners import Triplets

RUNTIME = {"seed": 0, "in_features": 5, "num_classes": 4, "label2category": {0: "a", 1: "a", 2: "b", 3: "b"}}
# Arguments that registered criteria need beyond their defaults.
REQUIRED = {"surrogate_precision": {"k": 2}, "mlp_arcface": {"mlp_features": [6, 3]}}


def _batch(n_labels=4, k=3, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_labels * k, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(n_labels).repeat_interleave(k)
    return emb, labels


def _dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _triplet_value(d_ap, d_an, margin):
    return math.log1p(math.exp(d_ap - d_an)) if margin is None else max(0.0, d_ap - d_an + margin)


def _hard_triplets_loop(emb, labels):
    out = []
    for a in range(len(emb)):
        pos = [(_dist(emb[a], emb[p]), p) for p in range(len(emb)) if p != a and labels[p] == labels[a]]
        neg = [(_dist(emb[a], emb[n]), n) for n in range(len(emb)) if labels[n] != labels[a]]
        if pos and neg:
            out.append((a, max(pos, key=lambda t: (t[0], -t[1]))[1], min(neg)[1]))
    return out


# ---------------------------------------------------------------- triplet losses


@pytest.mark.parametrize("margin", [None, 0.0, 0.2, 1.5])
def test_triplet_with_hard_miner_against_loop(margin):
    emb, labels = _batch(seed=1)
    crit = build_criterion("triplet_with_miner", {"margin": margin}, {"name": "hard_triplets", "args": {}})
    loss, logs = reduce_loss(crit(emb, labels))
    values = [_triplet_value(_dist(emb[a], emb[p]), _dist(emb[a], emb[n]), margin) for a, p, n in _hard_triplets_loop(emb, labels)]
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-9)
    assert logs["loss"] == pytest.approx(loss.item())
    crit_sum = build_criterion("triplet_with_miner", {"margin": margin, "reduction": "sum"}, {"name": "hard_triplets"})
    assert reduce_loss(crit_sum(emb, labels))[0].item() == pytest.approx(sum(values), rel=1e-9)


@pytest.mark.parametrize("margin", [None, 0.3])
def test_triplet_all_triplets_against_loop(margin):
    emb, labels = _batch(n_labels=3, k=3, seed=2)
    values = [
        _triplet_value(_dist(emb[a], emb[p]), _dist(emb[a], emb[n]), margin)
        for a, p, n in itertools.product(range(len(emb)), repeat=3)
        if a != p and labels[a] == labels[p] and labels[n] != labels[a]
    ]
    for crit in (build_criterion("triplet", {"margin": margin}),
                 build_criterion("triplet_with_miner", {"margin": margin}, {"name": "all_triplets"}),
                 build_criterion("triplet_with_miner", {"margin": margin})):  # OML's default miner: all triplets
        loss, logs = reduce_loss(crit(emb, labels))
        assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_dense_and_per_triplet_distances_agree():
    emb, labels = _batch(n_labels=3, k=4, seed=3)
    emb.requires_grad_(True)
    a, p, n = zip(*[(a, p, n) for a, p, n in itertools.product(range(12), repeat=3)
                    if a != p and labels[a] == labels[p] != labels[n]])
    many = Triplets(*(torch.tensor(v) for v in (a, p, n)))  # dense path: 2T > anchors x C
    few = Triplets(*(v[:5] for v in many))  # per-triplet path
    dense = triplet_terms(emb, many, margin=0.2).values
    per_triplet = triplet_terms(emb, few, margin=0.2).values
    torch.testing.assert_close(dense[:5], per_triplet, rtol=1e-12, atol=1e-12)
    (g_dense,) = torch.autograd.grad(dense[:5].sum(), emb)
    (g_few,) = torch.autograd.grad(per_triplet.sum(), emb)
    torch.testing.assert_close(g_dense, g_few, rtol=1e-12, atol=1e-12)


def test_triplet_logs():
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    # triplet 1: 1 - 2 + 0.5 < 0 (inactive); triplet 2: 3 - 2 + 0.5 > 0 (active)
    t = Triplets(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([3, 4]))
    _, logs = reduce_loss(triplet_terms(c, t, margin=0.5))
    assert logs == pytest.approx({"loss": 0.75, "active_triplets": 0.5, "pos_dist": 2.0, "neg_dist": 2.0})


def test_zero_distance_positive_has_finite_gradient():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss, _ = reduce_loss(build_criterion("triplet_with_miner", {"margin": 0.2}, {"name": "hard_triplets"})(emb, torch.tensor([0, 0, 1, 1])))
    loss.backward()
    assert torch.isfinite(emb.grad).all()


# ---------------------------------------------------------------- ArcFace


def _arcface_loop(x, y, weight, m, s, eps=0.0, categories=None):
    """OML's ArcFace, one sample and one class at a time, with acos: cos(theta + m) on the true class."""
    total = []
    n_classes = len(weight)
    y = [int(v) for v in y]  # plain ints: a torch bool in the arithmetic below would bring float32
    for i in range(len(x)):
        xi = x[i] / x[i].norm()
        logits = []
        for j in range(n_classes):
            cos = float(xi @ (weight[j] / weight[j].norm()))
            if j == y[i]:
                theta = math.acos(max(-1.0, min(1.0, cos)))
                cos = math.cos(theta + m) if cos > -math.cos(m) else cos - math.sin(m) * m
            logits.append(s * cos)
        log_z = math.log(sum(math.exp(v) for v in logits))
        if categories is None:
            target = [(1 - eps) * (j == y[i]) + eps / n_classes for j in range(n_classes)]
        else:
            same = [categories[j] == categories[y[i]] for j in range(n_classes)]
            target = [(1 - eps) * (j == y[i]) + (eps / sum(same) if same[j] else 0.0) for j in range(n_classes)]
        total.append(-sum(t * (v - log_z) for t, v in zip(target, logits)))
    return total


@pytest.mark.parametrize("eps, categories", [(0.0, None), (0.2, None), (0.2, {0: "a", 1: "a", 2: "b", 3: "b"})])
def test_arcface_against_loop(eps, categories):
    torch.manual_seed(0)
    emb, _ = _batch(n_labels=4, k=2, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    crit = ArcFaceLoss(5, 4, m=0.4, s=16.0, smoothing_epsilon=eps, label2category=categories).double()
    cats = None if categories is None else [categories[j] for j in range(4)]
    expected = _arcface_loop(emb, labels, crit.weight.detach(), 0.4, 16.0, eps, cats)
    terms = crit(emb, labels)
    torch.testing.assert_close(terms.values, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    accuracy = sum(int((emb[i] @ crit.weight.detach().T).argmax() == labels[i]) for i in range(8))
    assert float(terms.stats["accuracy"]) == accuracy


def test_mlp_arcface_is_arcface_after_the_mlp():
    torch.manual_seed(0)
    emb, labels = _batch(n_labels=4, k=2)
    crit = ArcFaceLossWithMLP(5, 4, mlp_features=[7, 3], m=0.3, s=10.0).double()
    expected = _arcface_loop(crit.mlp(emb).detach(), labels, crit.arcface.weight.detach(), 0.3, 10.0)
    torch.testing.assert_close(crit(emb, labels).values.detach(), torch.tensor(expected, dtype=torch.float64))


def test_arcface_weights_get_gradients():
    emb, labels = _batch(n_labels=4, k=2)
    crit = ArcFaceLoss(5, 4).double()
    reduce_loss(crit(emb, labels))[0].backward()
    assert crit.weight.grad is not None and crit.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- pair losses (loops over all pairs)


def test_surrogate_precision_against_loop():
    emb, labels = _batch(n_labels=3, k=3, seed=5)
    k, t1, t2 = 2, 1.0, 0.1
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    n = len(emb)
    d = [[_dist(emb[i], emb[j]) for j in range(n)] for i in range(n)]
    expected = []
    for i in range(n):
        gt = [bool(labels[i] == labels[j]) for j in range(n)]  # the item itself included, as in OML
        hits = 0.0
        for j in range(n):
            rank = sum(sig((d[i][j] - d[i][m]) / t2) for m in range(n))
            hits += sig((k + 1 - rank) / t1) * gt[j]
        expected.append(1 - hits / min(sum(gt), k + 1))
    terms = build_criterion("surrogate_precision", {"k": k, "temperature2": t2})(emb, labels)
    torch.testing.assert_close(terms.values, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert reduce_loss(terms)[0].item() == pytest.approx(sum(expected) / n)


def test_contrastive_against_loop():
    emb, labels = _batch(n_labels=3, k=3, seed=6)
    unit = emb / emb.norm(dim=1, keepdim=True)
    pos_m, neg_m = 0.3, 1.1
    pos, neg = [], []
    for i, j in itertools.product(range(len(emb)), repeat=2):
        d = _dist(unit[i], unit[j])
        if i != j and labels[i] == labels[j]:
            pos.append(max(0.0, d - pos_m))
        elif labels[i] != labels[j]:
            neg.append(max(0.0, neg_m - d))
    avg_nonzero = lambda v: sum(v) / max(1, sum(x > 0 for x in v))  # noqa: E731 (PML's AvgNonZeroReducer)
    loss, logs = reduce_loss(build_criterion("contrastive", {"pos_margin": pos_m, "neg_margin": neg_m})(emb, labels))
    assert loss.item() == pytest.approx(avg_nonzero(pos) + avg_nonzero(neg), rel=1e-9)
    assert logs["pos_loss"] == pytest.approx(avg_nonzero(pos))


def test_multi_similarity_against_loop():
    emb, labels = _batch(n_labels=3, k=3, seed=7)
    unit = emb / emb.norm(dim=1, keepdim=True)
    alpha, beta, base = 2.0, 10.0, 0.5
    expected = []
    for i in range(len(emb)):
        s = [float(unit[i] @ unit[j]) for j in range(len(emb))]
        pos = sum(math.exp(-alpha * (s[j] - base)) for j in range(len(emb)) if j != i and labels[j] == labels[i])
        neg = sum(math.exp(beta * (s[j] - base)) for j in range(len(emb)) if labels[j] != labels[i])
        expected.append(math.log1p(pos) / alpha + math.log1p(neg) / beta)
    terms = build_criterion("multi_similarity", {"alpha": alpha, "beta": beta, "base": base})(emb, labels)
    torch.testing.assert_close(terms.values, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- every criterion


def _build(name, **runtime):
    miner = {"name": "hard_triplets", "args": {}} if name == "triplet_with_miner" else None
    return build_criterion(name, REQUIRED.get(name, {}), miner, **(RUNTIME | runtime)).double()


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_runs_and_backprops(name):
    emb, labels = _batch()
    emb.requires_grad_(True)
    loss, logs = reduce_loss(_build(name)(emb, labels))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0 and "loss" in logs


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_splits_across_workers(name, world_size):
    """Each simulated worker's terms for its own anchors add up to one process's loss (no process group needed)."""
    emb, labels = _batch(n_labels=6, k=2, seed=8)
    runtime = {"num_classes": 6, "label2category": None}
    torch.manual_seed(0)
    single = reduce_loss(_build(name, **runtime)(emb, labels))[0].item()
    parts = []
    for rows in torch.arange(len(emb)).chunk(world_size):
        torch.manual_seed(0)  # the same class weights
        terms = _build(name, **runtime)(emb[rows], labels[rows], emb, labels, rows)
        parts.append(terms if isinstance(terms, list) else [terms])
    total = 0.0
    for part_index in range(len(parts[0])):
        values = torch.cat([p[part_index].values for p in parts])
        reduction = parts[0][part_index].reduction
        total += values.sum().item() / (len(values) if reduction == "mean" and len(values) else 1)
    assert total == pytest.approx(single, rel=1e-9)


def test_reduce_loss_of_several_parts():
    a = LossTerms(torch.tensor([1.0, 2.0, 3.0]), stats={"x": torch.tensor(6.0)})
    b = LossTerms(torch.tensor([10.0]), reduction="sum", stats={"y": torch.tensor(1.0)})
    loss, logs = reduce_loss([a, b])
    assert loss.item() == pytest.approx(2.0 + 10.0)
    assert logs == pytest.approx({"loss": 12.0, "x": 2.0, "y": 1.0})
    _, tensor_logs = reduce_loss([a, b], sync_logs=False)
    assert all(isinstance(v, torch.Tensor) for v in tensor_logs.values())
    with pytest.raises(ValueError, match="same stat twice"):
        reduce_loss([a, a])


def test_criterion_state_carries_the_miner_bank():
    emb, labels = _batch()
    crit = build_criterion("triplet_with_miner", {"margin": 0.2}, {"name": "miner_with_bank", "args": {"bank_size_in_batches": 2}})
    crit(emb, labels)
    state = crit.state_dict()
    fresh = build_criterion("triplet_with_miner", {"margin": 0.2}, {"name": "miner_with_bank", "args": {"bank_size_in_batches": 2}})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.miner.bank_emb, crit.miner.bank_emb) and fresh.miner.filled == len(emb)
    e2, l2 = _batch(seed=9)
    torch.testing.assert_close(reduce_loss(fresh(e2, l2))[0], reduce_loss(crit(e2, l2))[0])


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("triplet_with_miner", {"margin": -1}, "margin must be >= 0"),
        ("triplet", {"reduction": "none"}, "reduction must be one of"),
        ("arcface", {"smoothing_epsilon": 1.0}, "smoothing_epsilon must be in [0, 1)"),
        ("mlp_arcface", {"mlp_features": []}, "mlp_features must be a non-empty list"),
        ("surrogate_precision", {"k": 0}, "need k >= 1"),
        ("multi_similarity", {"alpha": 0}, "alpha and beta must be > 0"),
    ],
)
def test_bad_arguments_are_refused(name, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        build_criterion(name, args, **RUNTIME)

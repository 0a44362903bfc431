"""Every miner against a brute-force loop, and the cross-worker split: simulated workers, each with its own
anchors, together mine exactly the triplets one process mines from the whole batch."""

import itertools
import math

import pytest
import torch

from raymetric.miners import (
    MINERS,
    AllTripletsMiner,
    HardClusterMiner,
    HardTripletMiner,
    MinerWithBank,
    NHardTripletMiner,
    build_miner,
)

# Arguments that registered miners need beyond their defaults (none today).
REQUIRED = {"miner_with_bank": {"bank_size_in_batches": 2}}


def _batch(n_labels=4, k=3, dim=5, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_labels * k, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(n_labels).repeat_interleave(k)
    if shuffle:
        labels = labels[torch.randperm(len(labels), generator=g)]
    return emb, labels


def _dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _as_list(t):
    return list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist()))


def _all_loop(labels, anchors):
    n = len(labels)
    return [(a, p, q) for a in anchors for p in range(n) for q in range(n)
            if p != a and labels[p] == labels[a] and labels[q] != labels[a]]


def _nhard_loop(emb, labels, anchors, pos_slice, neg_slice, cand=None, cand_labels=None):
    cand = emb if cand is None else cand
    cand_labels = labels if cand_labels is None else cand_labels
    out = []
    for a in anchors:
        pos = sorted((-_dist(emb[a], cand[p]), p) for p in range(len(cand)) if p != a and cand_labels[p] == labels[a])
        neg = sorted((_dist(emb[a], cand[q]), q) for q in range(len(cand)) if cand_labels[q] != labels[a])
        out += [(a, p, q) for (_, p), (_, q) in itertools.product(pos[pos_slice], neg[neg_slice])]
    return out


# ---------------------------------------------------------------- oracles


def test_all_triplets_against_loop():
    emb, labels = _batch(n_labels=3, k=3, shuffle=True)
    rows = torch.tensor([1, 4, 7])
    t = AllTripletsMiner().mine(emb[rows], labels[rows], emb, labels, rows)
    assert _as_list(t) == _all_loop(labels.tolist(), rows.tolist())


def test_all_triplets_cap_is_a_seeded_subset_of_the_global_batch():
    emb, labels = _batch(n_labels=4, k=3)
    everything = _all_loop(labels.tolist(), range(len(labels)))
    first = AllTripletsMiner(max_output_triplets=50, seed=3)
    drawn = [_as_list(first.mine(emb, labels, emb, labels, torch.arange(12))) for _ in range(2)]
    for chosen in drawn:
        assert len(chosen) == 50 == len(set(chosen)) and set(chosen) <= set(everything)
        assert chosen == sorted(chosen), "lexicographic order"
    assert drawn[0] != drawn[1], "a new subset at every call"
    # The same seed and call count give the same subset; the count is state, so a resumed run continues.
    resumed = AllTripletsMiner(max_output_triplets=50, seed=3)
    resumed.load_state_dict({"calls": 1})
    assert _as_list(resumed.mine(emb, labels, emb, labels, torch.arange(12))) == drawn[1]
    other_seed = AllTripletsMiner(max_output_triplets=50, seed=4)
    assert _as_list(other_seed.mine(emb, labels, emb, labels, torch.arange(12))) != drawn[0]


def test_all_triplets_cap_larger_than_the_batch_keeps_everything():
    emb, labels = _batch(n_labels=2, k=2)
    t = AllTripletsMiner(max_output_triplets=10_000).mine(emb, labels, emb, labels, torch.arange(4))
    assert _as_list(t) == _all_loop(labels.tolist(), range(4))


def test_hard_triplets_against_loop():
    for seed in range(5):
        emb, labels = _batch(seed=seed, shuffle=True)
        t = HardTripletMiner().mine(emb, labels, emb, labels, torch.arange(len(emb)))
        assert _as_list(t) == _nhard_loop(emb, labels, range(len(emb)), slice(0, 1), slice(0, 1))


@pytest.mark.parametrize("n_positive, n_negative", [(1, 1), (2, 3), ([2, 3], 2), (1, [2, 4]), (5, 100)])
def test_n_hard_triplets_against_loop(n_positive, n_negative):
    emb, labels = _batch(n_labels=4, k=4, seed=1, shuffle=True)
    rows = torch.tensor([0, 3, 5, 9, 14])
    t = NHardTripletMiner(n_positive, n_negative).mine(emb[rows], labels[rows], emb, labels, rows)

    def as_slice(n):
        return slice(0, n) if isinstance(n, int) else slice(n[0] - 1, n[1])

    assert _as_list(t) == _nhard_loop(emb, labels, rows.tolist(), as_slice(n_positive), as_slice(n_negative))


def test_n_hard_with_one_and_one_is_hard_triplets():
    emb, labels = _batch(n_labels=5, k=3, seed=2)
    rows = torch.arange(len(emb))
    assert _as_list(NHardTripletMiner().mine(emb, labels, emb, labels, rows)) == _as_list(
        HardTripletMiner().mine(emb, labels, emb, labels, rows)
    )


def test_hard_cluster_against_loop():
    emb, labels = _batch(n_labels=4, k=3, seed=3, shuffle=True)
    mined = HardClusterMiner().sample(emb, labels, emb, labels, torch.arange(len(emb)))
    expected = []
    for u, lab in enumerate(sorted(set(labels.tolist()))):
        members = [i for i in range(len(emb)) if labels[i] == lab]
        mean = [sum(float(emb[i][d]) for i in members) / len(members) for d in range(emb.shape[1])]
        farthest = max(members, key=lambda i: (_dist(emb[i], mean), -i))
        others = [(v, m) for v, m in enumerate(sorted(set(labels.tolist()))) if m != lab]
        means = {v: [sum(float(emb[i][d]) for i in range(len(emb)) if labels[i] == m) / len(members)
                     for d in range(emb.shape[1])] for v, m in others}
        nearest = min(means, key=lambda v: (_dist(mean, means[v]), v))
        expected.append((mean, emb[farthest].tolist(), means[nearest]))
    c, t = mined.candidates, mined.triplets
    got = [(c[a].tolist(), c[p].tolist(), c[n].tolist()) for a, p, n in _as_list(t)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for gv, ev in zip(g, e):
            assert gv == pytest.approx(ev, rel=1e-12, abs=1e-12)


def test_hard_cluster_means_keep_autograd():
    emb, labels = _batch()
    emb.requires_grad_(True)
    mined = HardClusterMiner().sample(emb, labels, emb, labels, torch.arange(len(emb)))
    mined.candidates[mined.triplets.anchor].sum().backward()
    assert emb.grad.abs().sum() > 0


def test_bank_holds_the_last_global_batches_and_mines_them():
    steps = [_batch(n_labels=3, k=2, seed=s) for s in range(5)]
    miner = MinerWithBank(bank_size_in_batches=2, miner={"name": "n_hard_triplets", "args": {"n_positive": 2, "n_negative": 2}})
    for step, (emb, labels) in enumerate(steps):
        past = steps[max(0, step - 2) : step]
        mined = miner.sample(emb, labels, emb, labels, torch.arange(len(emb)))
        # Oracle: the inner miner's loop over this batch followed by the past batches, in bank order.
        bank_order = sorted(range(len(past)), key=lambda i: (max(0, step - 2) + i) % 2)
        cand = torch.cat([emb] + [past[i][0] for i in bank_order])
        cand_labels = torch.cat([labels] + [past[i][1] for i in bank_order])
        expected = _nhard_loop(emb, labels, range(len(emb)), slice(0, 2), slice(0, 2), cand, cand_labels)
        assert _as_list(mined.triplets) == expected
        torch.testing.assert_close(mined.candidates, cand)
    assert miner.filled == 12 and miner.ptr == (5 * 6) % 12
    assert torch.equal(miner.bank_labels, torch.cat([steps[4][1], steps[3][1]]))


def test_bank_with_a_capped_all_triplets_miner_keeps_the_cap():
    """The capped subset is drawn among the global batch's anchors: as the bank fills, the cap still holds
    (a subset drawn over the bank's rows too would lose every triplet anchored there)."""
    steps = [_batch(n_labels=3, k=2, seed=s) for s in range(4)]
    miner = MinerWithBank(bank_size_in_batches=2, miner={"name": "all_triplets", "args": {"max_output_triplets": 60}})
    counts = []
    for emb, labels in steps:
        bank_labels = miner.bank_labels[: miner.filled].clone() if miner.bank_labels is not None else labels[:0]
        cand_labels = torch.cat([labels, bank_labels])
        mined = miner.sample(emb, labels, emb, labels, torch.arange(len(emb)))
        triplets = _as_list(mined.triplets)
        # Oracle: every (anchor in the batch, positive, negative) among the candidates, by a loop.
        total = sum(1 for a in range(len(emb)) for p in range(len(cand_labels)) for n in range(len(cand_labels))
                    if p != a and cand_labels[p] == labels[a] and cand_labels[n] != labels[a])
        assert len(triplets) == len(set(triplets)) == min(60, total)
        for a, p, n in triplets:
            assert a < len(emb) and p != a and cand_labels[p] == labels[a] and cand_labels[n] != labels[a]
        counts.append(len(triplets))
    assert counts[-1] == 60 and counts[0] < 60  # the cap binds once the bank holds batches


def test_bank_refuses_a_changing_batch_size():
    miner = MinerWithBank(2)
    emb, labels = _batch(n_labels=3, k=2)
    miner.sample(emb, labels, emb, labels, torch.arange(6))
    with pytest.raises(ValueError, match="same global batch size"):
        miner.sample(emb[:4], labels[:4], emb[:4], labels[:4], torch.arange(4))


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("n_hard_triplets", {"n_positive": 0}, "n_positive must be >= 1"),
        ("n_hard_triplets", {"n_negative": [3, 2]}, "needs 1 <= from <= to"),
        ("n_hard_triplets", {"n_negative": "2"}, "an int or a [from, to] pair"),
        ("all_triplets", {"max_output_triplets": 0}, "max_output_triplets must be >= 1"),
        ("miner_with_bank", {"bank_size_in_batches": 0}, "bank_size_in_batches must be an int >= 1"),
        ("miner_with_bank", {"bank_size_in_batches": 1, "miner": {"name": "hard_cluster"}}, "inner miner must be one of"),
    ],
)
def test_bad_arguments_are_refused(name, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        build_miner(name, args)


# ---------------------------------------------------------------- every miner


def _labels_of_rows(miner, mined, ref_labels, bank_labels):
    """Labels of the candidate rows: reference rows, then bank rows (as before the call) or one per label (means)."""
    extra = len(mined.candidates) - len(ref_labels)
    if isinstance(miner, HardClusterMiner):
        return torch.cat([ref_labels, torch.unique(ref_labels)])
    if isinstance(miner, MinerWithBank) and extra:
        return torch.cat([ref_labels, bank_labels[:extra]])
    return ref_labels


def _global_triplets(miner, mined, ref_labels):
    """Triplets as comparable values: candidate rows by their content (bank and mean rows differ per call)."""
    c = mined.candidates.detach()
    return sorted((tuple(c[a].tolist()), tuple(c[p].tolist()), tuple(c[n].tolist())) for a, p, n in _as_list(mined.triplets))


@pytest.mark.parametrize("name", sorted(MINERS))
def test_every_miner_gives_valid_triplets(name):
    miner = build_miner(name, REQUIRED.get(name))
    for seed in range(3):  # several steps: the bank fills
        emb, labels = _batch(seed=seed, shuffle=True)
        bank_labels = getattr(miner, "bank_labels", None)
        bank_labels = None if bank_labels is None else bank_labels.clone()
        mined = miner.sample(emb, labels, emb, labels, torch.arange(len(emb)))
        row_labels = _labels_of_rows(miner, mined, labels, bank_labels)
        assert len(mined.triplets.anchor) > 0
        for a, p, n in _as_list(mined.triplets):
            assert row_labels[a] == row_labels[p] != row_labels[n] and a != p


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", sorted(MINERS))
def test_every_miner_splits_across_workers(name, world_size):
    single = build_miner(name, REQUIRED.get(name), seed=7)
    workers = [build_miner(name, REQUIRED.get(name), seed=7) for _ in range(world_size)]
    for seed in range(3):
        emb, labels = _batch(n_labels=6, k=2, seed=seed, shuffle=True)
        expected = _global_triplets(single, single.sample(emb, labels, emb, labels, torch.arange(len(emb))), labels)
        got = []
        for miner, rows in zip(workers, torch.arange(len(emb)).chunk(world_size)):
            got += _global_triplets(miner, miner.sample(emb[rows], labels[rows], emb, labels, rows), labels)
        assert sorted(got) == expected, f"step {seed}"

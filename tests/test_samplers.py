import itertools
import re

import numpy as np
import pytest

from raymetric.samplers import BalancedBatchSampler, SamplerError, build_sampler


def _labels(n_labels=12, sizes=(2, 3, 5, 7)):
    # Labels of varied sizes, some smaller than K, item indices shuffled so labels are interleaved.
    rng = np.random.default_rng(0)
    labels = np.concatenate([[lab] * sizes[lab % len(sizes)] for lab in range(n_labels)]) * 10 + 3
    return labels[rng.permutation(len(labels))]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_global_step_is_p_by_k_and_split_by_label(world_size):
    labels = _labels()
    P, K = 6, 4
    samplers = [BalancedBatchSampler(labels, P, K, world_size=world_size, rank=r, seed=7) for r in range(world_size)]
    single = BalancedBatchSampler(labels, P, K, seed=7)
    for epoch in (0, 1, 5):
        for s in samplers + [single]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1, "equal step counts per worker"
        assert len(per_rank[0]) == len(np.unique(labels)) // P
        seen = []
        for step, global_batch in enumerate(zip(*per_rank)):
            assert all(len(b) == P // world_size * K for b in global_batch)
            label_sets = [set(labels[b]) for b in global_batch]
            for a, b in itertools.combinations(label_sets, 2):
                assert not a & b, "a label appears on one worker only within a step"
            merged = np.concatenate(global_batch)
            counts = np.unique(labels[merged], return_counts=True)[1]
            assert len(counts) == P and (counts == K).all(), "P labels x K instances"
            # rank-order concatenation == the single-process batch
            assert merged.tolist() == list(single)[step]
            seen += sorted(set(labels[merged]))
        assert len(seen) == len(set(seen)), "every label at most once per epoch"


def test_small_labels_use_all_items_first_then_repeat():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    s = BalancedBatchSampler(labels, 2, 4, seed=0)
    for epoch in range(5):
        s.set_epoch(epoch)
        (batch,) = list(s)
        small = [i for i in batch if labels[i] == 0]
        assert set(small) == {0, 1} and len(small) == 4
        big = [i for i in batch if labels[i] == 1]
        assert len(set(big)) == 4, "no repeats when a label has enough items"


def test_plan_is_deterministic_and_changes_with_epoch_and_seed():
    labels = _labels()
    a, b = BalancedBatchSampler(labels, 4, 2, seed=1), BalancedBatchSampler(labels, 4, 2, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) != list(BalancedBatchSampler(labels, 4, 2, seed=2))


def test_resume_mid_epoch():
    labels = _labels()
    s = BalancedBatchSampler(labels, 4, 2, world_size=2, rank=1, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start_step(1)
    assert list(s) == full[1:] and len(s) == len(full) - 1


@pytest.mark.parametrize(
    "labels, P, K, W, message",
    [
        ([0, 0, 1], 2, 2, 1, "label(s) have 1"),
        ([0, 0, 1, 1], 3, 2, 1, "n_labels=3 is more than the 2 labels"),
        ([0, 0, 1, 1], 2, 1, 1, "n_instances must be > 1"),
        ([0, 0, 1, 1], 1, 2, 1, "n_labels must be > 1"),
        ([0, 0, 1, 1, 2, 2], 3, 2, 2, "divisible by the number of workers"),
    ],
)
def test_impossible_settings_name_the_numbers(labels, P, K, W, message):
    with pytest.raises(SamplerError, match=re.escape(message)):
        BalancedBatchSampler(labels, P, K, world_size=W)


def test_registry():
    s = build_sampler("balance", [0, 0, 1, 1], {"n_labels": 2, "n_instances": 2})
    assert isinstance(s, BalancedBatchSampler)
    with pytest.raises(ValueError, match="known"):
        build_sampler("nope", [0, 0], {})

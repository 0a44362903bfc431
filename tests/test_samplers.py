import itertools
import re

import numpy as np
import pytest

from raymetric.samplers import (
    SAMPLERS,
    BalancedBatchSampler,
    SamplerError,
    ShuffledBatchSampler,
    build_sampler,
)


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


# ---------------------------------------------------------------- category samplers and plain shuffled batches


def _categorised(n_categories=4, labels_per_category=(3, 4, 5, 6), sizes=(2, 3, 5)):
    """Labels of varied sizes in categories of varied sizes, items interleaved; one category per label."""
    rng = np.random.default_rng(1)
    labels, categories, label = [], [], 0
    for c in range(n_categories):
        for _ in range(labels_per_category[c]):
            n = sizes[label % len(sizes)]
            labels += [label] * n
            categories += [f"cat{c}"] * n
            label += 1
    order = rng.permutation(len(labels))
    return np.array(labels)[order], np.array(categories, dtype=object)[order]


# name -> (args, one global step's expected number of groups)
CATEGORY_CASES = {
    "category_balance": {"n_categories": 2, "n_labels": 3, "n_instances": 4},
    "distinct_category_balance": {"n_categories": 2, "n_labels": 3, "n_instances": 4, "epoch_size": 7},
}


def _per_rank(name, args, labels, categories, world_size, epoch, seed=11):
    samplers = [build_sampler(name, labels, args, world_size=world_size, rank=r, seed=seed, categories=categories)
                for r in range(world_size)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(CATEGORY_CASES))
def test_category_samplers_invariants(name, world_size):
    args = CATEGORY_CASES[name]
    labels, categories = _categorised()
    label_category = {lab: cat for lab, cat in zip(labels, categories)}
    C, P, K = args["n_categories"], args["n_labels"], args["n_instances"]
    single = _per_rank(name, args, labels, categories, 1, epoch=3)[0]
    expected_steps = args.get("epoch_size", -(-len(set(labels)) // P))  # OML: ceil(L / n_labels) steps
    for epoch in (0, 3):
        per_rank = _per_rank(name, args, labels, categories, world_size, epoch)
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == expected_steps
        for step, global_batch in enumerate(zip(*per_rank)):
            assert all(len(b) == C * P * K // world_size for b in global_batch)
            merged = np.concatenate(global_batch)
            if epoch == 3:
                assert merged.tolist() == single[step], "rank-order concatenation == the single-process batch"
            step_labels = labels[merged]
            uniq, counts = np.unique(step_labels, return_counts=True)
            assert len(uniq) == C * P and (counts == K).all(), "C x P distinct labels x K instances"
            cats, per_cat = np.unique([label_category[lab] for lab in uniq], return_counts=True)
            assert len(cats) == C and (per_cat == P).all(), "C categories with P labels each"
            label_sets = [set(labels[b]) for b in global_batch]
            for a, b in itertools.combinations(label_sets, 2):
                assert not a & b, "a label's instances stay on one worker"
            for lab in uniq:
                items = merged[step_labels == lab]
                n_items = (labels == lab).sum()
                assert len(set(items)) == min(K, n_items), "distinct items first, repeats only when the label is short"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distinct_category_reuses_a_label_only_after_its_category_is_exhausted(world_size):
    labels, categories = _categorised()
    label_category = {lab: cat for lab, cat in zip(labels, categories)}
    all_of = {c: {lab for lab, cc in label_category.items() if cc == c} for c in set(categories)}
    args = CATEGORY_CASES["distinct_category_balance"] | {"epoch_size": 30}
    per_rank = _per_rank("distinct_category_balance", args, labels, categories, world_size, epoch=0)
    batches = [np.concatenate(step) for step in zip(*per_rank)]  # the global batches
    # Replay OML's rule on the observed batches: a category's unused labels are used before any repeat;
    # the whole state resets when fewer than n_categories categories have unused labels.
    unused = {c: set(v) for c, v in all_of.items()}
    for batch in batches:
        if sum(bool(v) for v in unused.values()) < args["n_categories"]:
            unused = {c: set(v) for c, v in all_of.items()}
        by_cat = {}
        for lab in set(labels[batch]):
            by_cat.setdefault(label_category[lab], set()).add(lab)
        for cat, labs in by_cat.items():
            assert unused[cat], f"category {cat} picked with no unused label"
            fresh = labs & unused[cat]
            assert fresh == labs or fresh == unused[cat], "all remaining unused labels before any used one"
            unused[cat] -= labs


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shuffled_batches(world_size):
    labels = _labels()
    bs = 6
    per_rank = [list(ShuffledBatchSampler(labels, bs, world_size=world_size, rank=r, seed=2)) for r in range(world_size)]
    single = list(ShuffledBatchSampler(labels, bs, seed=2))
    assert all(len(b) == len(labels) // bs for b in per_rank)
    merged = [sum(step, []) for step in zip(*per_rank)]
    assert merged == single
    flat = sum(single, [])
    assert len(flat) == len(set(flat)) == len(labels) // bs * bs, "every item at most once per epoch"


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(SAMPLERS) + [None])
def test_every_sampler_is_deterministic_and_resumes(name, world_size):
    labels, categories = _categorised()
    args = CATEGORY_CASES.get(name) or ({"n_labels": 6, "n_instances": 2} if name else {"batch_size": 12})
    rank = world_size - 1
    make = lambda seed: build_sampler(name, labels, args, world_size=world_size, rank=rank, seed=seed, categories=categories)  # noqa: E731
    a, b = make(5), make(5)
    for s in (a, b):
        s.set_epoch(2)
    full = list(a)
    assert full == list(b), "same (seed, epoch): same batches"
    b.set_epoch(3)
    assert list(b) != full
    c = make(6)
    c.set_epoch(2)
    assert list(c) != full
    a.set_start_step(2)
    assert list(a) == full[2:] and len(a) == len(full) - 2 and a.state_dict() == {"epoch": 2, "step": 2}


@pytest.mark.parametrize(
    "name, args, categories, W, message",
    [
        ("category_balance", {"n_categories": 1, "n_labels": 2, "n_instances": 2}, None, 1, "needs a 'category' column"),
        ("category_balance", {"n_categories": 5, "n_labels": 2, "n_instances": 2}, "ok", 1, "n_categories=5 must be in [1, 4]"),
        ("category_balance", {"n_categories": 2, "n_labels": 4, "n_instances": 2}, "ok", 1,
         "every category needs >= 4 labels (or set sampler.args.resample_labels=true); categories with fewer (labels): {'cat0': 3}"),
        ("distinct_category_balance", {"n_categories": 2, "n_labels": 5, "n_instances": 2, "epoch_size": 3}, "ok", 1,
         "categories with fewer (labels): {'cat0': 3, 'cat1': 4}"),
        ("distinct_category_balance", {"n_categories": 2, "n_labels": 2, "n_instances": 2, "epoch_size": 0}, "ok", 1,
         "epoch_size must be >= 1"),
        ("category_balance", {"n_categories": 1, "n_labels": 3, "n_instances": 2}, "ok", 2,
         "n_categories x n_labels = 1 x 3 = 3 must be divisible by the number of workers (ray.num_workers=2)"),
        ("category_balance", {"n_categories": 1, "n_labels": 2, "n_instances": 1}, "ok", 1, "n_instances must be > 1"),
    ],
)
def test_category_sampler_errors_name_the_numbers(name, args, categories, W, message):
    labels, cats = _categorised()
    with pytest.raises(SamplerError, match=re.escape(message)):
        build_sampler(name, labels, args, world_size=W, categories=cats if categories else None)


def test_resample_labels_allows_small_categories():
    labels, categories = _categorised()
    args = {"n_categories": 2, "n_labels": 5, "n_instances": 2, "resample_labels": True, "weight_categories": False}
    s = build_sampler("category_balance", labels, args, categories=categories)
    for batch in s:
        assert len(batch) == 2 * 5 * 2


def test_shuffled_errors():
    with pytest.raises(SamplerError, match=re.escape("bs_train=3 must be divisible by the number of workers")):
        ShuffledBatchSampler(np.arange(10), 3, world_size=2)
    with pytest.raises(SamplerError, match=re.escape("bs_train=11 must be in [1, 10]")):
        ShuffledBatchSampler(np.arange(10), 11)

"""The batch plan: equal shapes across ranks, disjoint samples, determinism, repeats, resume."""

from __future__ import annotations

from collections import Counter

import pytest

from sana_ray.data.sampler import BatchPlan, SamplerError

# 3 buckets of sizes 10, 7 and 3 (e.g. square, landscape, portrait latents).
BUCKETS = [0] * 10 + [1] * 7 + [2] * 3


def test_every_rank_same_bucket_and_disjoint():
    plan = BatchPlan(BUCKETS, None, batch_size=2, world_size=2, seed=1)
    # Global batch 4: bucket 0 gives 2 (10 // 4), bucket 1 gives 1, bucket 2 none.
    assert plan.global_batches_per_epoch() == 3
    for index in range(3 * 5):  # five epochs
        batches = [plan.batch(index, rank) for rank in range(2)]
        assert all(len(b) == 2 for b in batches)
        assert len({BUCKETS[i] for b in batches for i in b}) == 1
        assert set(batches[0]).isdisjoint(batches[1])
    # Within one epoch no sample is drawn twice (no repeats).
    epoch = [i for index in range(3) for rank in range(2) for i in plan.batch(index, rank)]
    assert len(epoch) == len(set(epoch)) == plan.samples_per_epoch == 12


def test_deterministic_and_seed_dependent():
    a = BatchPlan(BUCKETS, None, batch_size=2, world_size=1, seed=7)
    b = BatchPlan(BUCKETS, None, batch_size=2, world_size=1, seed=7)
    c = BatchPlan(BUCKETS, None, batch_size=2, world_size=1, seed=8)
    run = lambda plan: [plan.batch(i, 0) for i in range(40)]  # noqa: E731
    assert run(a) == run(b)
    assert run(a) != run(c)
    # Epochs are reshuffled.
    per_epoch = a.global_batches_per_epoch()
    assert run(a)[:per_epoch] != run(a)[per_epoch : 2 * per_epoch]


def test_resume_from_any_index_equals_continuing():
    full = BatchPlan(BUCKETS, [1] * 20, batch_size=3, world_size=2, seed=3)
    expected = [[full.batch(i, r) for r in range(2)] for i in range(50)]
    for k in (0, 1, 7, 13, 31):
        resumed = BatchPlan(BUCKETS, [1] * 20, batch_size=3, world_size=2, seed=3)  # a fresh process
        assert [[resumed.batch(i, r) for r in range(2)] for i in range(k, 50)] == expected[k:]


def test_repeats_arithmetic():
    buckets = [0, 0, 0, 0]
    repeats = [0, 1, 2, 3]  # 1 + 2 + 3 + 4 = 10 draws per epoch
    plan = BatchPlan(buckets, repeats, batch_size=1, world_size=2, seed=0)
    assert plan.global_batches_per_epoch() == 5
    counts = Counter(i for index in range(5) for r in range(2) for i in plan.batch(index, r))
    assert counts == {0: 1, 1: 2, 2: 3, 3: 4}
    # With a remainder: 10 draws, global batch 4 -> 2 batches, 2 draws dropped per epoch.
    plan = BatchPlan(buckets, repeats, batch_size=2, world_size=2, seed=0)
    assert plan.global_batches_per_epoch() == 2 and plan.samples_per_epoch == 8


def test_too_small_error_names_numbers_and_fix():
    with pytest.raises(SamplerError) as error:
        BatchPlan([0, 0, 0, 1, 1], None, batch_size=2, world_size=2, seed=0)
    message = str(error.value)
    assert "global batch of 4" in message and "batch_size 2 x 2 workers" in message
    assert "bucket 0: 3" in message and "bucket 1: 2" in message and "largest: 3" in message
    assert "repeats" in message and "batch_size" in message and "num_workers" in message
    # A repeat fixes it.
    assert BatchPlan([0, 0, 0, 1, 1], [1] * 5, batch_size=2, world_size=2, seed=0).global_batches_per_epoch() == 2


def test_bad_arguments():
    plan = BatchPlan([0, 0], None, batch_size=1, world_size=2, seed=0)
    with pytest.raises(IndexError):
        plan.batch(0, 2)
    with pytest.raises(ValueError):
        BatchPlan([0, 0], [0], batch_size=1, world_size=1, seed=0)


def test_probability_weights_fix_counts_and_vary_subsets():
    # Dataset 0: 8 samples at weight 1; dataset 1: 8 samples at weight 0.5 (same bucket).
    buckets = [0] * 16
    groups = [0] * 8 + [1] * 8
    weights = [1.0] * 8 + [0.5] * 8
    plan = BatchPlan(buckets, None, batch_size=2, world_size=2, seed=0, weights=weights, groups=groups)
    assert plan.samples_per_epoch == 12 and plan.global_batches_per_epoch() == 3  # 8 + round(0.5 x 8)
    subsets = []
    for epoch in range(4):
        draws = [i for index in range(epoch * 3, epoch * 3 + 3) for r in range(2) for i in plan.batch(index, r)]
        counts = Counter(draws)
        assert all(counts[i] == 1 for i in range(8))  # weight 1: every sample once
        subsets.append(frozenset(i for i in counts if i >= 8))
        assert len(subsets[-1]) == 4  # half of dataset 1
    assert len(set(subsets)) > 1  # a different half each epoch
    # A weight above 1 oversamples: whole copies plus a fraction.
    plan = BatchPlan([0] * 4, None, batch_size=1, world_size=1, seed=0, weights=[2.5] * 4, groups=[0] * 4)
    assert plan.samples_per_epoch == 10
    counts = Counter(plan.batch(i, 0)[0] for i in range(10))
    assert sorted(counts.values()) == [2, 2, 3, 3]
    # Determinism and resume are unchanged with weights.
    again = BatchPlan(buckets, None, batch_size=2, world_size=2, seed=0, weights=weights, groups=groups)
    plan = BatchPlan(buckets, None, batch_size=2, world_size=2, seed=0, weights=weights, groups=groups)
    assert [again.batch(i, 1) for i in range(7, 20)] == [plan.batch(i, 1) for i in range(7, 20)]


def test_too_small_error_uses_bucket_labels():
    with pytest.raises(SamplerError, match=r"512x512 px: 3, 512x768 px: 1 \(largest: 3\)"):
        BatchPlan([0, 0, 0, 1], None, batch_size=2, world_size=2, seed=0, bucket_labels=["512x512 px", "512x768 px"])

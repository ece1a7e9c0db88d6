"""Batch samplers: seeded epoch order, full coverage, length grouping, and length-sorted evaluation batches."""

from __future__ import annotations

import random

import pytest

from finetune.sampling import LENGTH_WINDOW_BATCHES, EpochBatchSampler, LengthSortedBatchSampler


def flat(batches: list[list[int]]) -> list[int]:
    return [index for batch in batches for index in batch]


def skewed_lengths(count: int, seed: int = 0) -> list[int]:
    """Return token counts like review lengths: mostly short, a long tail up to 128."""
    rng = random.Random(seed)
    return [min(128, int(rng.lognormvariate(3.0, 0.8)) + 2) for _ in range(count)]


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    """Return the tokens a batch-wise padding collator produces: each batch padded to its longest text."""
    return sum(len(batch) * max(lengths[index] for index in batch) for batch in batches)


# ---------------------------------------------------------------------------------------------------------------
# EpochBatchSampler


@pytest.mark.parametrize("lengths", [None, skewed_lengths(103)], ids=["shuffle", "by_length"])
def test_epoch_order_is_pure_function(lengths):
    first = EpochBatchSampler(103, 8, seed=7, lengths=lengths)
    second = EpochBatchSampler(103, 8, seed=7, lengths=lengths)
    second.set_epoch(5)
    list(second)  # iterating another epoch first must not change what epoch 2 yields
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    assert first.batches_for_epoch(2) == list(first)


@pytest.mark.parametrize("lengths", [None, skewed_lengths(103)], ids=["shuffle", "by_length"])
def test_epoch_order_changes_with_epoch(lengths):
    sampler = EpochBatchSampler(103, 8, seed=7, lengths=lengths)
    assert sampler.batches_for_epoch(0) != sampler.batches_for_epoch(1)


@pytest.mark.parametrize("lengths", [None, skewed_lengths(103)], ids=["shuffle", "by_length"])
def test_epoch_order_changes_with_seed(lengths):
    first = EpochBatchSampler(103, 8, seed=7, lengths=lengths)
    second = EpochBatchSampler(103, 8, seed=8, lengths=lengths)
    assert first.batches_for_epoch(0) != second.batches_for_epoch(0)


@pytest.mark.parametrize("lengths", [None, skewed_lengths(103)], ids=["shuffle", "by_length"])
@pytest.mark.parametrize("epoch", [0, 1, 4])
def test_epoch_covers_every_index_once(lengths, epoch):
    sampler = EpochBatchSampler(103, 8, seed=7, lengths=lengths)
    assert sorted(flat(sampler.batches_for_epoch(epoch))) == list(range(103))


@pytest.mark.parametrize("lengths", [None, skewed_lengths(103)], ids=["shuffle", "by_length"])
def test_epoch_batch_sizes(lengths):
    # 103 = 12 x 8 + 7: twelve full batches and one of 7, never dropped.
    sampler = EpochBatchSampler(103, 8, seed=7, lengths=lengths)
    sizes = sorted(len(batch) for batch in sampler.batches_for_epoch(0))
    assert len(sampler) == 13
    assert sizes == [7] + [8] * 12


def test_epoch_without_shuffle_in_order():
    sampler = EpochBatchSampler(10, 4, seed=7, shuffle=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_length_grouping_reduces_padding():
    lengths = skewed_lengths(2000)
    grouped = EpochBatchSampler(2000, 16, seed=3, lengths=lengths).batches_for_epoch(0)
    shuffled = EpochBatchSampler(2000, 16, seed=3).batches_for_epoch(0)
    # Sorting inside windows of 50 batches leaves only the spread within a batch: under half the tokens
    # (about a third with these lengths).
    assert padded_tokens(grouped, lengths) < 0.5 * padded_tokens(shuffled, lengths)
    assert padded_tokens(grouped, lengths) >= sum(lengths)


def test_length_grouping_sorts_within_window():
    lengths = skewed_lengths(2000)
    batch_size = 16
    batches = EpochBatchSampler(2000, batch_size, seed=3, lengths=lengths).batches_for_epoch(0)
    for batch in batches:
        batch_lengths = [lengths[index] for index in batch]
        assert batch_lengths == sorted(batch_lengths, reverse=True)
    assert LENGTH_WINDOW_BATCHES * batch_size < 2000  # the test spans more than one window


def test_sampler_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="got 3 lengths for 4 examples"):
        EpochBatchSampler(4, 2, seed=0, lengths=[1, 2, 3])


def test_sampler_rejects_empty_dataset():
    with pytest.raises(ValueError, match="at least one example"):
        EpochBatchSampler(0, 2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# LengthSortedBatchSampler


def test_length_sorted_order():
    sampler = LengthSortedBatchSampler([3, 9, 1, 9, 5, 2, 7], batch_size=3)
    # Longest first; equal lengths keep dataset order (indices 1 and 3 both have 9 tokens).
    assert sampler.order == [1, 3, 6, 4, 0, 5, 2]
    assert list(sampler) == [[1, 3, 6], [4, 0, 5], [2]]
    assert len(sampler) == 3


def test_length_sorted_only_last_batch_short():
    sampler = LengthSortedBatchSampler(skewed_lengths(23), batch_size=4)
    sizes = [len(batch) for batch in sampler]
    assert sizes == [4, 4, 4, 4, 4, 3]
    assert sorted(flat(list(sampler))) == list(range(23))

"""Deterministic batch order: each epoch's batches are a pure function of (seed, epoch).

Because the order never depends on a random generator's running state, a run resumed in the middle of an
epoch rebuilds exactly the batches the uninterrupted run would have seen, and skips the ones already done.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# Length-aware batching sorts by length inside windows of this many batches, so batches contain texts of similar
# length (less padding) while the order across windows stays random.
LENGTH_WINDOW_BATCHES = 50


class EpochBatchSampler(Sampler[list[int]]):
    """Yields lists of example indices for one epoch; call `set_epoch` before each epoch.

    With `lengths`, examples are shuffled, cut into windows of `LENGTH_WINDOW_BATCHES` batches, sorted by
    length inside each window and batched. The batch order is then shuffled again. Without `lengths` it is a
    plain seeded shuffle. The last batch may be smaller (never dropped), so every example is seen each epoch.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        shuffle: bool = True,
    ):
        if num_examples < 1:
            raise ValueError("EpochBatchSampler needs at least one example")
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"got {len(lengths)} lengths for {num_examples} examples")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches_for_epoch(self.epoch))

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            order = list(range(self.num_examples))
            return [order[i : i + self.batch_size] for i in range(0, self.num_examples, self.batch_size)]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        if self.lengths is not None:
            window = self.batch_size * LENGTH_WINDOW_BATCHES
            order = [
                index
                for start in range(0, len(order), window)
                for index in sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, self.num_examples, self.batch_size)]
        if self.lengths is not None:
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in batch_order]
        return batches


class LengthSortedBatchSampler(Sampler[list[int]]):
    """Evaluation batches of similar length (longest first), so padding is minimal; the order is fixed.

    `order[i]` is the dataset index of the i-th example yielded, to map outputs back to dataset order. Only the
    last batch may be smaller, as Accelerate expects when it trims the duplicates of an uneven last round.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int):
        self.batch_size = batch_size
        self.order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start : start + self.batch_size]

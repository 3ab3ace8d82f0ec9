"""Examples packed end to end into sequences (best-fit decreasing), and the padding each way of
batching leaves."""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from instructune_jobs.data.collector import collector_paused
from instructune_jobs.data.types import IGNORE_INDEX, PackedSequence, TokenizedExample


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest item first, each into the fullest bin it still fits in.
    Deterministic: ties are broken by item index, then by bin creation order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for item in order:
        length = lengths[item]
        if length > capacity:
            raise ValueError(f"item {item} has length {length} > capacity {capacity}")
        position = bisect.bisect_left(free, (length, -1))
        if position == len(free):
            bins.append([item])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            space, bin_index = free.pop(position)
            bins[bin_index].append(item)
            bisect.insort(free, (space - length, bin_index))
    return bins


@collector_paused()
def pack_examples(
    examples: Sequence[TokenizedExample], max_seq_length: int, seed: int | None = None
) -> list[PackedSequence]:
    """Examples packed into sequences of at most max_seq_length tokens (best-fit decreasing).

    position_ids restart at 0 for each example, and the first label of each example is ignored so
    that no token is ever trained to predict the next example. The packs come out in creation
    order, or shuffled when a seed is given."""
    bins = best_fit_decreasing([len(example) for example in examples], max_seq_length)
    # One shared list of positions: slicing it reuses its int objects instead of making new ones.
    positions = list(range(max_seq_length))
    packs = [_concatenate([examples[i] for i in items], positions) for items in bins]
    if seed is not None:
        random.Random(seed).shuffle(packs)
    return packs


def _concatenate(examples: Sequence[TokenizedExample], positions: list[int]) -> PackedSequence:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        first = len(labels)
        input_ids += example.input_ids
        labels += example.labels
        if example.labels:
            labels[first] = IGNORE_INDEX
        position_ids += positions[: len(example)]
    return PackedSequence(input_ids, labels, position_ids, [len(example) for example in examples])


def packing_padding_fraction(packs: Sequence[PackedSequence], max_seq_length: int) -> float:
    """Padding share when every pack is padded to max_seq_length (the fixed-shape worst case)."""
    if not packs:
        return 0.0
    return 1.0 - sum(len(pack) for pack in packs) / (len(packs) * max_seq_length)


def dynamic_padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Padding share when consecutive batches are padded to their own longest sequence."""
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return 1.0 - sum(lengths) / padded if padded else 0.0


def fixed_padding_fraction(lengths: Sequence[int], max_seq_length: int) -> float:
    """Padding share when every sequence is padded to max_seq_length (padding="max_length")."""
    return 1.0 - sum(lengths) / (len(lengths) * max_seq_length) if lengths else 0.0

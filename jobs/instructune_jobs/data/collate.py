"""Batches of torch tensors, padded or packed; torch is imported only when a batch is built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from instructune_jobs.data.types import IGNORE_INDEX, PackedSequence, TokenizedExample

if TYPE_CHECKING:
    import torch


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def block_diagonal_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (batch, 1, seq, seq) additive mask: 0 where token i may attend token j (same packed
    example, j <= i), the dtype's minimum elsewhere. Examples start where position_ids is 0.

    Additive (rather than boolean) because both the eager and the sdpa attention of transformers
    accept it as given; the minimum (not -inf) keeps a fully masked row from turning into NaN."""
    import torch

    dtype = dtype or torch.float32
    segments = torch.cumsum((position_ids == 0).to(torch.int64), dim=-1)  # (batch, seq)
    same_example = segments.unsqueeze(-1) == segments.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same_example & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


@dataclass
class PaddingCollator:
    """Unpacked batches padded (on the right) to the batch's longest example."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        length = _round_up(max(len(example) for example in batch), self.pad_to_multiple_of)
        # Rows filled in numpy, from lists or arrays alike (prepared data is read as arrays).
        input_ids = np.full((len(batch), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, example in enumerate(batch):
            size = len(example)
            input_ids[row, :size] = example.input_ids
            labels[row, :size] = example.labels
            attention_mask[row, :size] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention_mask),
        }


@dataclass
class PackedCollator:
    """Batches of packs. Padding after the last example gets position_ids restarting at 0, so it
    forms a segment of its own that no real token attends to.

    attention="4d_mask" (CPU, eager/sdpa): adds a block-diagonal causal `attention_mask`
    (batch x seq x seq; an fp32 mask also works for a bf16 model).
    attention="position_ids": no mask; transformers finds the example boundaries in position_ids
    itself (flash-attention kernels; sdpa and eager too when use_cache=False, as in training),
    which saves the mask's seq^2 memory. Both give the same logits (tests/unit/test_packing.py).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    attention: Literal["4d_mask", "position_ids"] = "4d_mask"
    mask_dtype: Any = None  # torch dtype of the 4D mask; the model's compute dtype (default fp32)

    def __call__(self, batch: Sequence[PackedSequence]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        length = _round_up(max(len(pack) for pack in batch), self.pad_to_multiple_of)
        # numpy fills a row from a list of ints several times faster than torch.tensor reads one.
        input_ids = np.full((len(batch), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty((len(batch), length), dtype=np.int64)
        ramp = np.arange(length, dtype=np.int64)
        for row, pack in enumerate(batch):
            size = len(pack)
            input_ids[row, :size] = pack.input_ids
            labels[row, :size] = pack.labels
            position_ids[row, :size] = pack.position_ids
            position_ids[row, size:] = ramp[: length - size]
        result = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
        if self.attention == "4d_mask":
            result["attention_mask"] = block_diagonal_causal_mask(result["position_ids"], self.mask_dtype)
        return result

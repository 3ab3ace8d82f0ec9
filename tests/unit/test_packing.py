"""Packing: best-fit decreasing, examples kept apart, same loss as unpacked."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from instructune_jobs.data.collate import PackedCollator, PaddingCollator, block_diagonal_causal_mask
from instructune_jobs.data.formats import rows_to_conversations
from instructune_jobs.data.packing import (
    best_fit_decreasing,
    dynamic_padding_fraction,
    fixed_padding_fraction,
    pack_examples,
    packing_padding_fraction,
)
from instructune_jobs.data.template import render_chat
from instructune_jobs.data.tokenize import tokenize_conversations
from instructune_jobs.data.types import IGNORE_INDEX, LocatedRow, TokenizedExample
from instructune_jobs.synthetic import extraction_rows, general_rows, length_mix_rows

pytestmark = pytest.mark.unit


def example(length: int, seed: int = 0) -> TokenizedExample:
    rng = random.Random(seed)
    ids = [rng.randrange(10, 1000) for _ in range(length)]
    prompt = length // 2
    return TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def tokenized(tokenizer: Any, rows: list[dict[str, str]], max_seq_length: int) -> list[TokenizedExample]:
    # alpaca- and dolly-shaped rows would come from different objects; read each kind on its own
    examples: list[TokenizedExample] = []
    for kind in ("output", "response"):
        located = [LocatedRow("mem", i + 1, row) for i, row in enumerate(rows) if kind in row]
        conversations, invalid, _ = rows_to_conversations(located)
        assert invalid == []
        examples += tokenize_conversations(conversations, tokenizer, None, max_seq_length)[0]
    return examples


def test_best_fit_decreasing_fills_bins_tightly_and_keeps_every_item() -> None:
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in 3 bins of 10: no waste


def test_an_item_longer_than_the_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([3, 11], capacity=10)


def test_packing_padding_is_at_most_one_percent_on_an_alpaca_dolly_length_mix(tokenizer: Any) -> None:
    max_seq_length = 1024
    examples = tokenized(tokenizer, length_mix_rows(3000, seed=0), max_seq_length)
    assert len(examples) > 2900  # only the longest tail is refused as too long
    lengths = [len(e) for e in examples]
    packed = packing_padding_fraction(pack_examples(examples, max_seq_length), max_seq_length)
    naive = fixed_padding_fraction(lengths, max_seq_length)
    dynamic = dynamic_padding_fraction(lengths, batch_size=8)
    assert packed <= 0.01
    assert naive > 0.6 and dynamic > 0.3  # what padding costs without packing


def test_packs_respect_the_limit_and_contain_every_example_once() -> None:
    examples = [example(n, seed=n) for n in [300, 120, 90, 90, 60, 45, 30, 17, 5, 250, 200]]
    packs = pack_examples(examples, 320)
    assert all(len(p) <= 320 for p in packs)
    assert sorted(n for p in packs for n in p.example_lengths) == sorted(len(e) for e in examples)
    concatenated = sorted(tuple(p.input_ids) for p in packs)
    rebuilt = []
    for pack in packs:
        offset = 0
        for length in pack.example_lengths:
            rebuilt.append(tuple(pack.input_ids[offset : offset + length]))
            offset += length
    assert sorted(rebuilt) == sorted(tuple(e.input_ids) for e in examples)
    assert len(concatenated) == len(packs)


def test_position_ids_restart_and_no_example_learns_from_its_predecessor() -> None:
    first, second = example(5, seed=1), example(4, seed=2)
    (pack,) = pack_examples([first, second], 16)
    assert pack.position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # each example's first label is ignored: nothing is trained to predict across the boundary
    assert pack.labels[0] == IGNORE_INDEX and pack.labels[5] == IGNORE_INDEX
    assert pack.labels[1:5] == first.labels[1:] and pack.labels[6:] == second.labels[1:]


def test_packing_is_deterministic_and_a_seed_shuffles_pack_order() -> None:
    examples = [example(n, seed=n) for n in range(5, 200, 7)]
    assert pack_examples(examples, 256) == pack_examples(examples, 256)
    shuffled = pack_examples(examples, 256, seed=3)
    assert sorted(map(tuple, (p.input_ids for p in shuffled))) == sorted(
        map(tuple, (p.input_ids for p in pack_examples(examples, 256)))
    )


def test_block_diagonal_mask_keeps_examples_apart_and_causal() -> None:
    torch = pytest.importorskip("torch")
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_diagonal_causal_mask(position_ids)
    assert mask.shape == (1, 1, 6, 6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask.min().item() == torch.finfo(torch.float32).min


def test_packed_collator_pads_as_a_separate_segment() -> None:
    pytest.importorskip("torch")
    packs = pack_examples([example(3), example(2, seed=1), example(6, seed=2)], 6)
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(packs)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].shape == (2, 1, 8, 8)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]  # [3, 2] then 3 pads
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all() and (batch["input_ids"][1, 5:] == 0).all()
    real_to_pad = batch["attention_mask"][1, 0, :5, 5:]
    assert (real_to_pad < 0).all()  # no real token attends padding
    assert "attention_mask" not in PackedCollator(pad_token_id=0, attention="position_ids")(packs)


def test_padding_collator_pads_right_with_ignored_labels() -> None:
    pytest.importorskip("torch")
    batch = PaddingCollator(pad_token_id=7)([example(3), example(5, seed=1)])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert (
        batch["input_ids"][0, 3:].tolist() == [7, 7] and batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2
    )


def per_example_losses_unpacked(model: Any, examples: list[TokenizedExample], pad_id: int) -> list[float]:
    import torch.nn.functional as F

    losses = []
    for ex in examples:
        batch = PaddingCollator(pad_id)([ex])
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        losses.append(
            F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX).item()
        )
    return losses


def per_example_losses_packed(
    model: Any, examples: list[TokenizedExample], pad_id: int, attention: str, max_seq_length: int
) -> list[float]:
    import torch.nn.functional as F

    packs = pack_examples(examples, max_seq_length)
    assert any(len(p.example_lengths) > 1 for p in packs)  # the test is about packed sequences
    batch = PackedCollator(pad_id, attention=attention)(packs)  # type: ignore[arg-type]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    by_identity: dict[tuple[int, ...], float] = {}
    for row, pack in enumerate(packs):
        offset = 0
        for length in pack.example_lengths:
            span = slice(offset, offset + length)
            loss = F.cross_entropy(
                logits[row, span][:-1], batch["labels"][row, span][1:], ignore_index=IGNORE_INDEX
            )
            by_identity[tuple(pack.input_ids[span])] = loss.item()
            offset += length
    return [by_identity[tuple(ex.input_ids)] for ex in examples]


@pytest.mark.parametrize(
    ("attn_implementation", "attention"),
    [("eager", "4d_mask"), ("sdpa", "4d_mask"), ("sdpa", "position_ids")],
)
def test_packed_and_unpacked_per_example_losses_agree(
    tokenizer: Any, tiny_model_dir: Path, attn_implementation: str, attention: str
) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=attn_implementation
    ).eval()
    rows = extraction_rows(5, seed=4) + general_rows(7, seed=4)
    examples = list({tuple(e.input_ids): e for e in tokenized(tokenizer, rows, 256)}.values())
    with torch.no_grad():
        unpacked = per_example_losses_unpacked(model, examples, tokenizer.pad_token_id)
        packed = per_example_losses_packed(model, examples, tokenizer.pad_token_id, attention, 256)
    assert max(abs(a - b) for a, b in zip(unpacked, packed, strict=True)) < 1e-2


@pytest.fixture
def tokenizer_left_padding(tokenizer: Any) -> Iterator[Any]:
    """The session tokenizer as another caller leaves it: a `tokenizer(..., padding="max_length",
    truncation=True)` call (an eval loop, a `datasets` .map, the bench's peer) leaves padding and
    truncation switched on in the Rust backend, which `encode_batch` then applies."""
    tokenizer(["warm up"], add_special_tokens=False, padding="max_length", truncation=True, max_length=256)
    backend = tokenizer.backend_tokenizer
    assert backend.padding is not None and backend.truncation is not None
    yield tokenizer
    backend.no_padding()
    backend.no_truncation()


def test_every_accepted_examples_tokens_reach_the_batches_exactly_once(tokenizer_left_padding: Any) -> None:
    """Rows -> conversations -> tokens -> packs -> position_ids batches conserves every token, on a
    tokenizer another caller left padding/truncating (this lost ~99% of the rows: padded encodings
    got empty label spans and were rejected as "no assistant tokens")."""
    torch = pytest.importorskip("torch")
    tokenizer, max_seq_length = tokenizer_left_padding, 256
    rows = length_mix_rows(300, seed=3)
    examples: list[TokenizedExample] = []
    too_long: list[str] = []
    rendered: list[str] = []
    for kind in ("output", "response"):
        located = [LocatedRow("mem", i + 1, row) for i, row in enumerate(rows) if kind in row]
        conversations, invalid, _ = rows_to_conversations(located)
        assert invalid == []
        # several chunks, the last one partial
        accepted, rejected = tokenize_conversations(
            conversations, tokenizer, None, max_seq_length, batch_size=64
        )
        examples += accepted
        too_long += [row.reason for row in rejected]
        rendered += [render_chat(tokenizer, conv.messages) for conv in conversations]
    assert tokenizer.backend_tokenizer.padding["length"] == 256  # the caller's state is given back

    # every row is accounted for, and only too-long rows are refused, exactly those
    assert len(examples) + len(too_long) == len(rows)
    assert all("longer than max_seq_length" in reason for reason in too_long)
    expected = [ids for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    assert sorted(tuple(e.input_ids) for e in examples) == sorted(
        tuple(ids) for ids in expected if len(ids) <= max_seq_length
    )
    assert 0 < len(too_long) < len(rows) // 10  # the size exercises both paths

    packs = pack_examples(examples, max_seq_length, seed=0)
    segments: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for pack in packs:
        offset = 0
        for length in pack.example_lengths:
            segments.append(
                (
                    tuple(pack.input_ids[offset : offset + length]),
                    tuple(pack.labels[offset : offset + length]),
                )
            )
            offset += length
        assert offset == len(pack) <= max_seq_length
    assert sorted(segments) == sorted((tuple(e.input_ids), (IGNORE_INDEX, *e.labels[1:])) for e in examples)

    total = target = 0
    collate = PackedCollator(tokenizer.pad_token_id, attention="position_ids")
    for start in range(0, len(packs), 8):
        batch = packs[start : start + 8]
        tensors = collate(batch)
        for row, pack in enumerate(batch):
            assert tensors["input_ids"][row, : len(pack)].tolist() == pack.input_ids
            assert (tensors["labels"][row, len(pack) :] == IGNORE_INDEX).all()
        total += sum(len(pack) for pack in batch)
        target += int((tensors["labels"] != IGNORE_INDEX).sum())
    assert total == sum(len(e) for e in examples)
    assert target == sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
    assert torch.is_tensor(tensors["position_ids"])

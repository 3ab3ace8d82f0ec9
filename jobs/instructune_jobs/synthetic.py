"""Offline stand-ins for a model hub and for datasets (no hub is reachable here).

- `build_tiny_llama`: a byte-level BPE tokenizer trained locally on text generated here, with a
  ChatML-like chat template, and a random-init LlamaForCausalLM, saved like any hub model. The
  loading code that reads it is the real one.
- `extraction_rows`: the synthetic extraction task (clause -> JSON with party, amount, date).
  The held-out split words clauses and instructions differently from the training split.
- `general_rows`: a small general alpaca-like set for mixing and forgetting probes.
- `length_mix_rows`: alpaca- and dolly-shaped rows whose lengths follow those sets' mix, for
  packing and pipeline benchmarks.
- `upload_rows` / `upload_directory`: put rows or a model directory into S3 for tests and the demo.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from instructune_jobs.storage import split_s3_uri

PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, TURN_START, TURN_END]

# ChatML, as Qwen and others use it. {% generation %} marks the assistant's tokens for
# transformers' return_assistant_tokens_mask; it renders nothing itself.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ---------------------------------------------------------------------------------------------
# The extraction task
# ---------------------------------------------------------------------------------------------

EXTRACTION_KEYS = ("party", "amount", "date")
EXTRACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "party": {"type": "string", "minLength": 1},
        "amount": {"type": "integer"},
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
    },
    "required": list(EXTRACTION_KEYS),
    "additionalProperties": False,
}

_NAME_HEADS = [
    "Acme",
    "Borealis",
    "Cobalt",
    "Delta",
    "Evergreen",
    "Falcon",
    "Granite",
    "Harbor",
    "Ionic",
    "Juniper",
    "Keystone",
    "Lumen",
    "Meridian",
    "Northwind",
    "Orion",
    "Pinnacle",
    "Quartz",
    "Redwood",
    "Summit",
    "Titan",
    "Umbra",
    "Vertex",
    "Willow",
    "Xenon",
    "Yarrow",
    "Zephyr",
    "Atlas",
    "Beacon",
    "Crescent",
    "Drift",
]
_NAME_TAILS = [
    "Logistics",
    "Holdings",
    "Systems",
    "Foods",
    "Energy",
    "Labs",
    "Partners",
    "Media",
    "Capital",
    "Robotics",
    "Textiles",
    "Freight",
]
_NAME_SUFFIXES = ["Inc.", "Ltd.", "LLC", "GmbH", "Corp.", "S.A."]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

_TRAIN_CLAUSES = [
    "{party} shall pay {amount} to the Supplier no later than {date}.",
    "On {date}, {party} agreed to remit {amount} for the services described herein.",
    "The Buyer, {party}, will transfer {amount} by {date}.",
    "{party} owes a fee of {amount}, due on {date}.",
    "Payment of {amount} is to be made by {party} on or before {date}.",
    "Under this agreement {party} commits to paying {amount} on {date}.",
    "The invoice of {amount} issued to {party} falls due on {date}.",
    "{party} will settle the outstanding balance of {amount} on {date}.",
]
_HELDOUT_CLAUSES = [
    "Effective {date}, the licensee {party} is obligated to settle a statement totalling {amount}.",
    "As consideration, {amount} shall be delivered by {party}, with the deadline set at {date}.",
    '{party} (the "Tenant") must deposit {amount} into escrow before {date}.',
    "It is hereby agreed that the sum of {amount} will be paid by {party} no later than {date}.",
    "By {date}, a payment amounting to {amount} must be received from {party}.",
]
_TRAIN_INSTRUCTIONS = [
    "Extract the party, amount and date from the clause. Answer with a JSON object with the keys party, "
    "amount and date.",
    'Read the contract clause and return a JSON object with the keys "party", "amount" and "date".',
    "Return the paying party, the amount and the due date of this clause as JSON (keys: party, amount, date).",
    "Give a JSON object with keys party, amount, date for the following clause.",
]
_HELDOUT_INSTRUCTIONS = [
    "From the contract text below, pull out who pays, how much and when. Reply only with JSON using the "
    "keys party, amount and date.",
    "Identify the obligor, the sum and the deadline in this provision; output JSON with keys party, amount, date.",
    "Convert the clause into a JSON record holding party, amount and date.",
]


def _party(rng: random.Random) -> str:
    return f"{rng.choice(_NAME_HEADS)} {rng.choice(_NAME_TAILS)} {rng.choice(_NAME_SUFFIXES)}"


def _amount(rng: random.Random) -> tuple[int, str]:
    value = rng.choice([rng.randrange(100, 10_000), rng.randrange(1_000, 1_000_000, 50)])
    shown = rng.choice(["${:,}", "USD {:,}", "{:,} dollars", "${:,}.00"]).format(value)
    return value, shown


def _date(rng: random.Random) -> tuple[str, str]:
    day = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(0, 8 * 365))
    month = _MONTHS[day.month - 1]
    shown = rng.choice([f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", day.isoformat()])
    return day.isoformat(), shown


def extraction_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """Alpaca rows {instruction, input, output}: extract {party, amount, date} from a clause as
    JSON. split="heldout" uses clause and instruction wordings never seen in split="train"."""
    if split not in ("train", "heldout"):
        raise ValueError("split is train or heldout")
    clauses, instructions = (
        (_TRAIN_CLAUSES, _TRAIN_INSTRUCTIONS)
        if split == "train"
        else (_HELDOUT_CLAUSES, _HELDOUT_INSTRUCTIONS)
    )
    rng = random.Random(f"extraction-{split}-{seed}")
    rows = []
    for _ in range(n):
        party = _party(rng)
        amount, amount_text = _amount(rng)
        date, date_text = _date(rng)
        clause = rng.choice(clauses).format(party=party, amount=amount_text, date=date_text)
        answer = {"party": party, "amount": amount, "date": date}
        rows.append({"instruction": rng.choice(instructions), "input": clause, "output": json.dumps(answer)})
    return rows


# ---------------------------------------------------------------------------------------------
# A small general set
# ---------------------------------------------------------------------------------------------

_WORDS = [
    "apple",
    "river",
    "mountain",
    "garden",
    "window",
    "silver",
    "planet",
    "candle",
    "forest",
    "bridge",
    "harbor",
    "pencil",
    "thunder",
    "meadow",
    "rocket",
    "violin",
    "desert",
    "island",
    "lantern",
    "marble",
    "orange",
    "pepper",
    "quiet",
    "rabbit",
    "sunset",
    "tiger",
    "valley",
    "winter",
    "yellow",
    "zebra",
]
_OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("early", "late"),
    ("light", "dark"),
    ("open", "closed"),
    ("fast", "slow"),
    ("full", "empty"),
    ("high", "low"),
    ("happy", "sad"),
    ("strong", "weak"),
]
_CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("India", "New Delhi"),
    ("Chile", "Santiago"),
    ("Spain", "Madrid"),
]


def _general_row(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(7)
    word = rng.choice(_WORDS)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 2:
        return {
            "instruction": f"Write the word '{word}' in capital letters.",
            "input": "",
            "output": word.upper(),
        }
    if kind == 3:
        return {
            "instruction": f"How many letters does the word '{word}' have?",
            "input": "",
            "output": f"The word '{word}' has {len(word)} letters.",
        }
    if kind == 4:
        numbers = rng.sample(range(100), 5)
        return {
            "instruction": "Sort these numbers in ascending order.",
            "input": ", ".join(map(str, numbers)),
            "output": ", ".join(map(str, sorted(numbers))),
        }
    if kind == 5:
        low, high = rng.choice(_OPPOSITES)
        return {"instruction": f"What is the opposite of '{low}'?", "input": "", "output": high}
    country, capital = rng.choice(_CAPITALS)
    return {
        "instruction": f"What is the capital of {country}?",
        "input": "",
        "output": f"The capital of {country} is {capital}.",
    }


def general_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of small general tasks (arithmetic, spelling, sorting, capitals)."""
    rng = random.Random(f"general-{seed}")
    return [_general_row(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Alpaca + Dolly shaped length mix (for packing and pipeline benchmarks)
# ---------------------------------------------------------------------------------------------

_FILLER = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "can",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "model",
    "data",
    "answer",
    "question",
    "system",
    "language",
    "first",
    "time",
    "people",
    "years",
    "way",
    "work",
    "world",
    "life",
    "day",
    "part",
    "number",
    "city",
    "country",
    "water",
    "history",
    "music",
    "science",
    "house",
    "school",
    "family",
    "story",
    "example",
    "result",
    "process",
    "level",
    "order",
    "company",
    "market",
]


def _words(rng: random.Random, mean_log: float, sigma: float, cap: int) -> str:
    count = max(1, min(cap, round(rng.lognormvariate(mean_log, sigma))))
    return " ".join(rng.choice(_FILLER) for _ in range(count))


def length_mix_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Half alpaca-shaped rows (short instruction, optional input, answer of ~40 words), half
    dolly-shaped (optional long context, longer response), with log-normal word counts close to
    those sets' published length distributions (long tails included)."""
    rng = random.Random(f"length-mix-{seed}")
    rows: list[dict[str, str]] = []
    for index in range(n):
        if index % 2 == 0:
            rows.append(
                {
                    "instruction": _words(rng, 2.4, 0.5, 80),
                    "input": _words(rng, 2.8, 0.9, 300) if rng.random() < 0.4 else "",
                    "output": _words(rng, 3.5, 0.9, 700),
                }
            )
        else:
            rows.append(
                {
                    "instruction": _words(rng, 2.5, 0.6, 100),
                    "context": _words(rng, 4.6, 0.9, 900) if rng.random() < 0.3 else "",
                    "response": _words(rng, 3.8, 1.0, 900),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Tiny Llama + tokenizer
# ---------------------------------------------------------------------------------------------


def _chatml(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)


def tokenizer_corpus(seed: int = 0) -> Iterator[str]:
    """Text the tokenizer learns its merges from: the synthetic tasks rendered as chats, plus
    filler prose, so that the benchmark and test texts tokenize to a realistic 1-2 tokens a word."""
    rows = (
        extraction_rows(600, seed, "train") + extraction_rows(200, seed, "heldout") + general_rows(600, seed)
    )
    for row in rows:
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        yield _chatml([{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])
    for row in length_mix_rows(300, seed):
        yield " ".join(row.values())


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 2000, split_digits: bool = False) -> Any:
    """A byte-level BPE tokenizer (GPT-2/Llama 3 style: any text encodes, no unknown tokens)
    trained on `corpus`, wrapped as a transformers fast tokenizer with the ChatML template.
    split_digits: one token per digit (as Llama and Qwen do), so "7,313" and "7313" share their
    digit tokens and a model can copy numbers digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover leading spaces exactly; the loss mask relies on them.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=TURN_END, pad_token=PAD_TOKEN, model_max_length=2048
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama(
    out_dir: str | Path,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    vocab_size: int = 2000,
    intermediate: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Save a random-init LlamaForCausalLM with a locally trained tokenizer to out_dir (the
    layout `from_pretrained` reads) and return out_dir. Embeddings are not tied, so LoRA's
    modules_to_save can train embed_tokens and lm_head separately."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(tokenizer_corpus(seed), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# Upload to S3 (tests and the demo)
# ---------------------------------------------------------------------------------------------


def rows_to_bytes(rows: Sequence[dict[str, Any]], name: str) -> bytes:
    """Rows encoded by the name's suffix: .jsonl, .jsonl.gz or .parquet."""
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(list(rows)), buffer)
        return buffer.getvalue()
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    # mtime=0: the same rows give the same bytes, hence the same ETag
    return gzip.compress(data, mtime=0) if name.endswith(".gz") else data


def ensure_bucket(client: Any, bucket: str) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def upload_bytes(data: bytes, uri: str, client: Any | None = None) -> str:
    """Put one object and return its ETag."""
    from instructune_jobs.storage import s3_client_from_env

    client = client or s3_client_from_env()
    bucket, key = split_s3_uri(uri)
    ensure_bucket(client, bucket)
    etag: str = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
    return etag


def upload_rows(rows: Sequence[dict[str, Any]], uri: str, client: Any | None = None) -> str:
    """Put rows as one object (encoding chosen by the uri's suffix) and return its ETag."""
    return upload_bytes(rows_to_bytes(rows, uri), uri, client)


def upload_directory(local_dir: str | Path, uri: str, client: Any | None = None) -> list[str]:
    """Put every file under local_dir below the prefix uri (e.g. a saved model); returns the uris."""
    from instructune_jobs.storage import s3_client_from_env

    client = client or s3_client_from_env()
    root = Path(local_dir)
    prefix = uri.rstrip("/")
    uploaded = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = f"{prefix}/{path.relative_to(root).as_posix()}"
        upload_bytes(path.read_bytes(), target, client)
        uploaded.append(target)
    return uploaded

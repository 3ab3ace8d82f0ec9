"""The data step: read every source, validate, audit, tokenize, apply the invalid-row policy, mix
sources by weight, split off validation and pack (`load_examples`). The only module of the
package that reads objects, through a `storage.ObjectReader`."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from instructune_jobs.config import InvalidRowsPolicy, TrainConfig
from instructune_jobs.data.audit import AuditFinding, audit_conversations, prompt_keys
from instructune_jobs.data.formats import parse_object_bytes, rows_to_conversations
from instructune_jobs.data.packing import dynamic_padding_fraction, pack_examples, packing_padding_fraction
from instructune_jobs.data.template import resolve_chat_template, template_hash
from instructune_jobs.data.tokenize import tokenize_conversations
from instructune_jobs.data.types import (
    IGNORE_INDEX,
    Format,
    InvalidRow,
    PackedSequence,
    SourcedConversation,
    TokenizedExample,
)
from instructune_jobs.storage import DATA_SUFFIXES, ObjectReader, SchemeReader

_MAX_REPORTED_INVALID = 20
T = TypeVar("T")


class DataValidationError(ValueError):
    """The data step refused the data; `invalid_rows` says which rows and why."""

    def __init__(
        self,
        message: str,
        invalid_rows: Sequence[InvalidRow] = (),
        total_rows: int = 0,
        audit: Sequence[AuditFinding] = (),
    ):
        shown = "\n".join(f"  {row}" for row in invalid_rows[:_MAX_REPORTED_INVALID])
        more = len(invalid_rows) - _MAX_REPORTED_INVALID
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{message}\n{shown}{suffix}" if shown else message)
        self.invalid_rows = list(invalid_rows)
        self.total_rows = total_rows
        self.audit = list(audit)  # what the audits found before the data was refused


@dataclass
class DataStats:
    rows: int = 0  # rows read, valid or not
    invalid_rows: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    tokens: int = 0  # training tokens, prompt included
    target_tokens: int = 0  # training tokens that carry loss
    padding_fraction: float = 0.0  # of training batches as the training loader will build them
    template_hash: str = ""
    etags: dict[str, str] = field(default_factory=dict)  # object uri -> ETag, for lineage
    formats: dict[str, str] = field(default_factory=dict)  # object uri -> format read as
    invalid_samples: list[InvalidRow] = field(default_factory=list)
    duplicates: int = 0  # rows dropped as duplicates (data/audit.py)
    contaminated: int = 0  # rows dropped as prompts of an evaluation set
    pii_rows: int = 0  # rows with personal data (redacted, dropped or only reported)
    # evaluation sets, probe and validation source read for decontamination: uri -> ETag
    reference_etags: dict[str, str] = field(default_factory=dict)

    @property
    def audited_rows(self) -> int:
        return self.duplicates + self.contaminated + self.pii_rows

    def to_status(self) -> dict[str, Any]:
        """The tune's `status.data` (camelCase, as the CRD has it)."""
        return {
            "rows": self.rows,
            "invalidRows": self.invalid_rows,
            "duplicateRows": self.duplicates,
            "contaminatedRows": self.contaminated,
            "piiRows": self.pii_rows,
            "tokens": self.tokens,
            "paddingFraction": round(self.padding_fraction, 6),
            "templateHash": self.template_hash,
        }


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    # Set when training.packing is on: what the training loader should iterate over.
    packed_train: list[PackedSequence] | None
    chat_template: str  # the template text in force; serving must be given exactly this
    stats: DataStats
    invalid: list[InvalidRow]
    # What the audits found, row by row (not kept in prepared files: the counts are in stats).
    audit: list[AuditFinding] = field(default_factory=list)

    @property
    def training_items(self) -> Sequence[TokenizedExample] | Sequence[PackedSequence]:
        return self.packed_train if self.packed_train is not None else self.train


def enforce_invalid_rows_policy(
    invalid: Sequence[InvalidRow], total_rows: int, policy: InvalidRowsPolicy
) -> None:
    """fail: any invalid row fails the step. skip: fail only when the invalid fraction is above
    max_fraction (a broken export should not silently train on what is left of it)."""
    if not invalid:
        return
    if policy.policy == "fail":
        raise DataValidationError("invalid row (invalidRows.policy is fail)", invalid[:1], total_rows)
    fraction = len(invalid) / max(total_rows, 1)
    if fraction > policy.max_fraction:
        raise DataValidationError(
            f"{len(invalid)} of {total_rows} rows are invalid ({fraction:.2%}), more than "
            f"invalidRows.maxFraction {policy.max_fraction:.2%}",
            invalid,
            total_rows,
        )


def mix_sources(sources: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> list[T]:
    """Mix sources so that source i makes up weights[i]/sum(weights) of the result, without
    repeating any row: the mix is as large as the scarcest source (relative to its weight) allows.
    A single source is used whole. The result is shuffled, deterministically for a seed."""
    if len(sources) != len(weights) or not sources:
        raise ValueError("one weight per source, at least one source")
    rng = random.Random(seed)
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    mix_size = min(len(items) / share for items, share in zip(sources, shares, strict=True))
    mixed: list[T] = []
    for items, share in zip(sources, shares, strict=True):
        count = min(len(items), round(mix_size * share))
        chosen = sorted(rng.sample(range(len(items)), count))
        mixed.extend(items[i] for i in chosen)
    rng.shuffle(mixed)
    return mixed


def split_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded `fraction` of items, at least one when fraction > 0 and
    there are two or more items."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = round(len(items) * fraction)
    if fraction > 0 and count == 0 and len(items) >= 2:
        count = 1
    held_out = set(order[:count])
    train = [item for i, item in enumerate(items) if i not in held_out]
    validation = [items[i] for i in sorted(held_out)]
    return train, validation


@dataclass
class ConversationsRead:
    conversations: list[SourcedConversation]
    invalid: list[InvalidRow]
    rows: int
    etags: dict[str, str]
    formats: dict[str, str]


def read_conversations(
    uri: str,
    reader: ObjectReader,
    fmt: Format | Literal["auto"] = "auto",
    field_mapping: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> ConversationsRead:
    """Every valid row of the object(s) a uri names as a conversation, with the invalid rows,
    the number of rows read, each object's ETag and the format each was read as."""
    refs = reader.list_objects(uri)
    if not refs:
        raise DataValidationError(f"no data objects ({', '.join(DATA_SUFFIXES)}) at {uri}")
    result = ConversationsRead([], [], 0, {}, {})
    for ref in refs:
        rows, unreadable = parse_object_bytes(reader.read_object(ref), ref.uri)
        conversations, invalid, used = rows_to_conversations(rows, fmt, field_mapping, system_prompt)
        result.conversations.extend(conversations)
        result.invalid.extend(unreadable + invalid)
        result.rows += len(rows) + len(unreadable)
        result.etags[ref.uri] = ref.etag
        if used:
            result.formats[ref.uri] = used
    return result


def read_any_format(
    uri: str, reader: ObjectReader, field_mapping: Mapping[str, str], system_prompt: str | None
) -> ConversationsRead:
    """Evaluation sets and probes may come in any supported format (detected per object). The
    training field mapping applies when the set shares the training data's columns; a set in
    canonical columns (a general probe, typically) is read without it."""
    read = read_conversations(uri, reader, "auto", field_mapping, system_prompt)
    if field_mapping and not read.conversations:
        read = read_conversations(uri, reader, "auto", None, system_prompt)
    return read


def load_examples(cfg: TrainConfig, tokenizer: Any, reader: ObjectReader | None = None) -> PreparedData:
    """The data step: read every training source (and the validation source), validate, render
    with the chat template, tokenize with loss on assistant tokens only, apply the invalid-row
    policy, mix sources by weight, split off validation, and pack when training.packing is on.
    Raises DataValidationError with a per-row report when the data is refused."""
    reader = reader or SchemeReader()
    data_cfg, training = cfg.dataset, cfg.training
    template = resolve_chat_template(tokenizer, cfg.template.chat_template)
    stats = DataStats(template_hash=template_hash(template))
    invalid: list[InvalidRow] = []

    audit_cfg, findings, seen = data_cfg.audit, list[AuditFinding](), dict[str, str]()

    def read(uri: str) -> list[SourcedConversation]:
        read = read_conversations(
            uri, reader, data_cfg.format, data_cfg.field_mapping, cfg.template.system_prompt
        )
        stats.rows += read.rows
        stats.etags.update(read.etags)
        stats.formats.update(read.formats)
        invalid.extend(read.invalid)
        # policy "fail" stops at the first bad row, before spending time tokenizing
        if data_cfg.invalid_rows.policy == "fail":
            enforce_invalid_rows_policy(invalid, stats.rows, data_cfg.invalid_rows)
        return read.conversations

    def audit_and_tokenize(
        conversations: list[SourcedConversation], references: set[str]
    ) -> list[TokenizedExample]:
        kept, found, counts = audit_conversations(
            conversations,
            deduplicate=audit_cfg.deduplicate,
            reference_prompts=references,
            pii=audit_cfg.pii,
            seen=seen,
            system_prompt=cfg.template.system_prompt,
        )
        findings.extend(found)
        stats.duplicates += counts.duplicates
        stats.contaminated += counts.contaminated
        stats.pii_rows += counts.pii_rows
        examples, too_long = tokenize_conversations(kept, tokenizer, template, training.max_seq_length)
        invalid.extend(too_long)
        return examples

    validation_rows = read(data_cfg.validation.uri) if data_cfg.validation.uri else None
    references: set[str] = set()
    if audit_cfg.decontaminate:
        references = reference_prompts(cfg, reader, stats.reference_etags)
        references |= prompt_keys(validation_rows or [])
    per_source = [audit_and_tokenize(read(source.uri), references) for source in data_cfg.train]
    validation_source = audit_and_tokenize(validation_rows, set()) if validation_rows is not None else None
    stats.invalid_rows = len(invalid)
    stats.invalid_samples = invalid[:_MAX_REPORTED_INVALID]
    enforce_invalid_rows_policy(invalid, stats.rows, data_cfg.invalid_rows)
    for source, examples in zip(data_cfg.train, per_source, strict=True):
        if not examples:
            dropped = [f for f in findings if f.object.startswith(source.uri) and f.action == "dropped"]
            why = f" ({len(dropped)} dropped by the audits, see the audit report)" if dropped else ""
            raise DataValidationError(
                f"training source {source.uri} has no valid rows{why}", invalid, stats.rows, findings
            )

    mixed = mix_sources(per_source, [source.weight for source in data_cfg.train], training.seed)
    if validation_source is not None:
        train, validation = mixed, validation_source
    else:
        train, validation = split_validation(mixed, data_cfg.validation.fraction, training.seed)

    packed = pack_examples(train, training.max_seq_length, seed=training.seed) if training.packing else None
    stats.train_examples, stats.validation_examples = len(train), len(validation)
    stats.tokens = sum(len(example) for example in train)
    stats.target_tokens = sum(sum(1 for label in ex.labels if label != IGNORE_INDEX) for ex in train)
    if packed is not None:
        stats.padding_fraction = packing_padding_fraction(packed, training.max_seq_length)
    else:
        stats.padding_fraction = dynamic_padding_fraction(
            [len(ex) for ex in train], training.batch_size_per_device
        )
    return PreparedData(train, validation, packed, template, stats, invalid, findings)


def reference_prompts(cfg: TrainConfig, reader: ObjectReader, etags: dict[str, str]) -> set[str]:
    """The prompts evaluation will ask (evaluation sets and the general probe, read in any format,
    as evaluation reads them), for decontamination; their ETags go into `etags`."""
    uris = [d.uri for d in cfg.evaluation.datasets]
    if cfg.evaluation.general_probe is not None:
        uris.append(cfg.evaluation.general_probe.uri)
    prompts: set[str] = set()
    for uri in uris:
        read = read_any_format(uri, reader, cfg.dataset.field_mapping, cfg.template.system_prompt)
        etags.update(read.etags)
        prompts |= prompt_keys(read.conversations)
    return prompts

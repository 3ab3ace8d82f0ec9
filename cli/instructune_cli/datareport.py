"""Pure: what `instructune validate` prints, from what the job's data step found.

`DataCheck` holds the data step's findings as plain values (datacheck.py fills it from
`load_examples`); `report_lines` turns them into the lines printed: every refused row as
`file:line: reason` (the job's own InvalidRow rendering), then the statistics and the verdict.
The padding figures are the job's own functions (data/packing.py) over the same lengths, in the
same order, so the one in force equals the job's `status.data.paddingFraction`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from instructune_jobs.data.audit import AuditFinding
from instructune_jobs.data.packing import best_fit_decreasing, dynamic_padding_fraction
from instructune_jobs.data.types import InvalidRow, too_long_tokens


@dataclass(frozen=True)
class LengthStats:
    count: int
    p50: int
    p95: int
    max: int


@dataclass
class DataCheck:
    """What the data step made of the data, and whether the job would refuse it."""

    formats: dict[str, str]  # object -> the row format it was read as
    rows: int  # rows read, valid or not
    invalid: list[InvalidRow]
    audit: list[AuditFinding]
    pii_policy: str
    train_lengths: list[int]  # tokens of each training example, in the order training sees them
    validation_lengths: list[int]
    target_tokens: int  # training tokens that carry loss
    max_seq_length: int
    packing: bool
    batch_size: int
    invalid_policy: str  # invalidRows.policy
    max_invalid_fraction: float  # invalidRows.maxFraction
    refused: str | None = None  # why the job would refuse the data; None: it would train on it
    notes: list[str] = field(default_factory=list)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of ascending values (q in (0, 1]): a length some row really has."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def length_stats(lengths: Sequence[int]) -> LengthStats:
    ordered = sorted(lengths)
    return LengthStats(
        len(ordered), percentile(ordered, 0.5), percentile(ordered, 0.95), ordered[-1] if ordered else 0
    )


def too_long(invalid: Sequence[InvalidRow]) -> list[int]:
    """The lengths of the rows refused for exceeding maxSeqLength."""
    return [n for row in invalid if (n := too_long_tokens(row.reason)) is not None]


def packed_padding_fraction(lengths: Sequence[int], max_seq_length: int) -> tuple[int, float]:
    """(sequences, padding share) of the examples packed as the job packs them: best-fit
    decreasing into sequences of max_seq_length, each padded to it."""
    if not lengths:
        return 0, 0.0
    bins = len(best_fit_decreasing(lengths, max_seq_length))
    return bins, 1.0 - sum(lengths) / (bins * max_seq_length)


def audit_summary(audit: Sequence[AuditFinding], pii_policy: str) -> str:
    kinds = Counter(finding.kind for finding in audit)
    actions = {"drop": "dropped", "redact": "redacted", "report": "reported"}
    pii = (
        f"personal data {kinds['pii']} {actions[pii_policy]}"
        if pii_policy in actions
        else "personal data not looked for"
    )
    return (
        f"duplicates {kinds['duplicate']} dropped, evaluation prompts {kinds['contamination']} dropped, {pii}"
    )


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


def batches_line(check: DataCheck) -> str:
    lengths, limit = check.train_lengths, check.max_seq_length
    sequences, packed = packed_padding_fraction(lengths, limit)
    dynamic = dynamic_padding_fraction(lengths, check.batch_size)
    packed_text = f"{sequences} sequence(s) of {limit} tokens, {100 * (1 - packed):.1f}% tokens"
    dynamic_text = f"batches of {check.batch_size} padded to their longest, {100 * (1 - dynamic):.1f}% tokens"
    if check.packing:
        return f"packing on: {packed_text} ({100 * packed:.1f}% padding); unpacked, {dynamic_text}"
    return f"packing off: {dynamic_text} ({100 * dynamic:.1f}% padding); packed, {packed_text}"


def verdict_line(check: DataCheck) -> str:
    invalid, rows = len(check.invalid), check.rows
    policy = f"invalidRows.policy {check.invalid_policy}"
    if check.invalid_policy == "skip":
        policy += f", maxFraction {100 * check.max_invalid_fraction:.2f}%"
    if check.refused is not None:
        return f"refused: {check.refused}"
    return f"accepted: {invalid} of {rows} rows invalid ({_percent(invalid, rows)}; {policy})"


def report_lines(check: DataCheck, max_errors: int | None = None, findings: bool = False) -> list[str]:
    """Every refused row (`file:line: reason`, the first max_errors), the audit findings when
    asked, then the statistics and the verdict."""
    # In file and line order (the data step finds unreadable lines before invalid rows).
    ordered = sorted(check.invalid, key=lambda row: (row.object, row.line))
    shown = ordered if max_errors is None else ordered[:max_errors]
    lines = [str(row) for row in shown]
    if len(check.invalid) > len(shown):
        lines.append(f"... and {len(check.invalid) - len(shown)} more invalid rows")
    if findings:
        lines += [f"{f.object}:{f.line}: {f.kind} ({f.detail}), {f.action}" for f in check.audit]
    formats = ", ".join(sorted(set(check.formats.values()))) or "no format detected"
    lines.append(f"rows:       {check.rows} read ({formats}), {len(check.invalid)} invalid")
    lines.append(f"audits:     {audit_summary(check.audit, check.pii_policy)}")
    train, validation = check.train_lengths, check.validation_lengths
    if train or validation:
        tokens = sum(train)
        stats = length_stats([*train, *validation])
        lines.append(f"examples:   {len(train)} training, {len(validation)} validation")
        lines.append(
            f"tokens:     {tokens} training tokens, {check.target_tokens} "
            f"({_percent(check.target_tokens, tokens)}) on assistant turns"
        )
        lines.append(
            f"length:     p50 {stats.p50}, p95 {stats.p95}, max {stats.max} tokens "
            f"(maxSeqLength {check.max_seq_length})"
        )
    longer = too_long(check.invalid)
    lines.append(
        f"too long:   {len(longer)} over maxSeqLength {check.max_seq_length} (refused, never truncated)"
        + (f"; longest {max(longer)} tokens" if longer else "")
    )
    if train:
        lines.append(f"batches:    {batches_line(check)}")
    lines += check.notes
    lines.append(verdict_line(check))
    return lines

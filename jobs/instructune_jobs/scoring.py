"""Pure scoring of generated responses against references: no torch, no I/O.

What counts (strict scoring, robust extraction):

- `parse_response` finds the first JSON object in a response robustly (it skips prose or a code
  fence before it, and knows braces inside strings), but the response is *valid JSON* only when
  that object is the whole response apart from surrounding whitespace. A response that wraps the
  object in prose or a ```json fence, stops mid-object (truncated by max_new_tokens), or is a JSON
  array/scalar is not valid: a serving client that calls json.loads() on it would fail.
- `jsonSchema` counts a response only when it is valid JSON (above) and satisfies the schema.
- `regex` must match the whole response (re.fullmatch) after stripping surrounding whitespace.
- `exactMatch` with fields: the response is valid JSON and every named field equals the
  reference's value (JSON equality: 1 == 1.0, but true != 1 and "1" != 1; strings exactly,
  no case folding). Per-field accuracy is reported too. Without fields: the whole response equals
  the reference (as JSON when both parse, else as whitespace-stripped text).

Keys alone say little: a model that always emits one fixed JSON with the right keys is 100%
jsonValid and jsonSchema but scores on exactMatch only where its fixed values happen to be right.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedResponse:
    """The first JSON object found in a response, and whether the response is strictly JSON."""

    value: dict[str, Any] | None  # the first JSON object found, even if surrounded by text
    strict: bool  # the response is exactly one JSON object (plus whitespace)
    # "ok", "empty", "no_json_object", "invalid_json", "truncated", "leading_text", "trailing_text"
    reason: str


def parse_response(text: str) -> ParsedResponse:
    """Extract the first JSON object of `text`; `strict` tells whether it is the whole response."""
    stripped = text.strip()
    if not stripped:
        return ParsedResponse(None, False, "empty")
    start = stripped.find("{")
    while start != -1:
        try:
            value, end = _DECODER.raw_decode(stripped, start)
        except json.JSONDecodeError:
            if _never_closes(stripped, start):
                # Still open at the end: every later "{" lies inside this object. Ending on "}"
                # means quotes or brackets are unbalanced (malformed), otherwise it was cut off,
                # typically by max_new_tokens.
                return ParsedResponse(None, False, "invalid_json" if stripped.endswith("}") else "truncated")
            start = stripped.find("{", start + 1)
            continue
        if isinstance(value, dict):
            if start > 0:
                return ParsedResponse(value, False, "leading_text")
            if end < len(stripped):
                return ParsedResponse(value, False, "trailing_text")
            return ParsedResponse(value, True, "ok")
        start = stripped.find("{", start + 1)
    return ParsedResponse(None, False, "no_json_object")


def _never_closes(text: str, start: int) -> bool:
    """Whether the object opened at `start` is still open at the end of `text` (string-aware)."""
    depth, in_string, escaped = 0, False, False
    for char in text[start:]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return False
    return True


def json_equal(a: Any, b: Any) -> bool:
    """JSON value equality: numbers compare by value, but booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


_MISSING = object()


def _get_field(obj: dict[str, Any], path: str) -> Any:
    """Top-level key, or a dotted path into nested objects when no key has the dotted name."""
    if path in obj:
        return obj[path]
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            return _MISSING
        current = current[part]
    return current


def json_schema_valid(parsed: ParsedResponse, schema: dict[str, Any]) -> bool:
    if not parsed.strict:
        return False
    validator_cls = jsonschema.validators.validator_for(schema)
    return validator_cls(schema).is_valid(parsed.value)


def regex_full_match(text: str, pattern: str | re.Pattern[str]) -> bool:
    return re.fullmatch(pattern, text.strip()) is not None


def field_matches(
    parsed: ParsedResponse, reference: ParsedResponse, fields: Sequence[str]
) -> dict[str, bool]:
    """Per named field: the strictly valid response has the reference's value for it.

    A field the reference lacks is expected to be absent from the response as well.
    """
    result: dict[str, bool] = {}
    for name in fields:
        expected = _get_field(reference.value, name) if reference.value is not None else _MISSING
        if not parsed.strict or parsed.value is None:
            result[name] = False
            continue
        got = _get_field(parsed.value, name)
        if expected is _MISSING or got is _MISSING:
            result[name] = expected is _MISSING and got is _MISSING
        else:
            result[name] = json_equal(got, expected)
    return result


def whole_match(response: str, reference: str) -> bool:
    """The response equals the reference: as JSON when both parse as JSON, else as stripped text."""
    try:
        return json_equal(json.loads(response), json.loads(reference))
    except (json.JSONDecodeError, ValueError):
        return response.strip() == reference.strip()


@dataclass
class MetricSpec:
    """The generation metrics to compute, in a torch-free shape (built from EvaluationConfig)."""

    json_valid: bool = False
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    exact_match: list[str] | None = None  # [] means whole-response match

    @classmethod
    def from_config(cls, metrics: Iterable[Any]) -> MetricSpec:
        """From EvaluationConfig.metrics (objects with `.type`); `loss` is not a generation metric."""
        spec = cls()
        for metric in metrics:
            kind = metric.type
            if kind == "json_valid":
                spec.json_valid = True
            elif kind == "json_schema":
                spec.json_schema = metric.schema_
            elif kind == "regex":
                spec.regex = metric.pattern
            elif kind == "exact_match":
                spec.exact_match = list(metric.fields)
        return spec

    @property
    def needs_generation(self) -> bool:
        return (
            self.json_valid
            or self.json_schema is not None
            or self.regex is not None
            or self.exact_match is not None
        )


@dataclass
class SampleScore:
    """Scores of one response; None where the metric was not asked for."""

    json_valid: bool | None = None
    json_schema: bool | None = None
    regex: bool | None = None
    exact_match: bool | None = None
    fields: dict[str, bool] = field(default_factory=dict)
    parse: str = ""  # ParsedResponse.reason

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"parse": self.parse}
        for key, value in (
            ("jsonValid", self.json_valid),
            ("jsonSchema", self.json_schema),
            ("regex", self.regex),
            ("exactMatch", self.exact_match),
        ):
            if value is not None:
                out[key] = value
        if self.fields:
            out["fields"] = dict(self.fields)
        return out


def score_sample(response: str, reference: str, spec: MetricSpec) -> SampleScore:
    parsed = parse_response(response)
    score = SampleScore(parse=parsed.reason)
    if spec.json_valid:
        score.json_valid = parsed.strict
    if spec.json_schema is not None:
        score.json_schema = json_schema_valid(parsed, spec.json_schema)
    if spec.regex is not None:
        score.regex = regex_full_match(response, spec.regex)
    if spec.exact_match is not None:
        if spec.exact_match:
            score.fields = field_matches(parsed, parse_response(reference), spec.exact_match)
            score.exact_match = all(score.fields.values())
        else:
            score.exact_match = whole_match(response, reference)
    return score


def aggregate_scores(scores: Sequence[SampleScore], spec: MetricSpec) -> dict[str, float]:
    """Fractions over samples, keyed jsonValid / jsonSchema / regex / exactMatch /
    fieldMatch.<field>. Keys depend only on `spec`, so they are stable even for zero samples."""
    n = len(scores)

    def fraction(values: Iterable[bool | None]) -> float:
        return sum(1 for v in values if v) / n if n else 0.0

    out: dict[str, float] = {}
    if spec.json_valid:
        out["jsonValid"] = fraction(s.json_valid for s in scores)
    if spec.json_schema is not None:
        out["jsonSchema"] = fraction(s.json_schema for s in scores)
    if spec.regex is not None:
        out["regex"] = fraction(s.regex for s in scores)
    if spec.exact_match is not None:
        out["exactMatch"] = fraction(s.exact_match for s in scores)
        for name in spec.exact_match:
            out[f"fieldMatch.{name}"] = fraction(s.fields.get(name) for s in scores)
    return out


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped so that a diverged model still reports a finite float."""
    return math.exp(min(loss, 50.0))


def forgetting_metrics(tuned_probe_loss: float, base_probe_loss: float | None) -> dict[str, float]:
    """Change of the general-probe loss from base to tuned: positive means the model forgot."""
    out = {"forgetting.probeLoss": float(tuned_probe_loss)}
    if base_probe_loss is not None:
        increase = tuned_probe_loss - base_probe_loss
        out["forgetting.lossIncrease"] = float(increase)
        out["forgetting.relativeLossIncrease"] = float(increase / base_probe_loss) if base_probe_loss else 0.0
    return out

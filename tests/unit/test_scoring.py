"""Pure scoring of generations: what counts as valid JSON, schema, regex and exact match."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from instructune_jobs.config import EvaluationConfig
from instructune_jobs.data.template import TemplateMismatchError, template_hash
from instructune_jobs.evaluate import add_means_over_datasets, check_template
from instructune_jobs.models import TrainedArtifacts, locate_trained_artifacts
from instructune_jobs.scoring import (
    MetricSpec,
    aggregate_scores,
    field_matches,
    forgetting_metrics,
    json_equal,
    json_schema_valid,
    parse_response,
    perplexity,
    regex_full_match,
    score_sample,
    whole_match,
)

pytestmark = pytest.mark.unit

SCHEMA = {
    "type": "object",
    "properties": {"party": {"type": "string"}, "amount": {"type": "integer"}, "due": {"type": "string"}},
    "required": ["party", "amount", "due"],
    "additionalProperties": False,
}
FIELDS = ["party", "amount", "due"]


def ref(party: str, amount: int, due: str) -> str:
    return json.dumps({"party": party, "amount": amount, "due": due})


def test_a_bare_json_object_with_surrounding_whitespace_is_strictly_valid() -> None:
    parsed = parse_response('  \n{"a": 1, "b": "x}"}\n')
    assert parsed.strict and parsed.reason == "ok"
    assert parsed.value == {"a": 1, "b": "x}"}


@pytest.mark.parametrize(
    ("text", "reason", "extracted"),
    [
        ('Sure! {"a": 1}', "leading_text", {"a": 1}),
        ('```json\n{"a": 1}\n```', "leading_text", {"a": 1}),
        ('{"a": 1} and more', "trailing_text", {"a": 1}),
        ('{"a": 1}{"b": 2}', "trailing_text", {"a": 1}),
        ('{"a": {"b": 1}, "c": "unterminated', "truncated", None),
        ('{"a": tru', "truncated", None),
        ('{"party": "Acme, "date": 4}', "invalid_json", None),
        ("[1, 2]", "no_json_object", None),
        ("no json here", "no_json_object", None),
        ("{'a': 1}", "no_json_object", None),
        ("   ", "empty", None),
    ],
)
def test_first_object_is_extracted_but_anything_besides_it_makes_the_response_invalid(
    text: str, reason: str, extracted: dict | None
) -> None:
    parsed = parse_response(text)
    assert not parsed.strict
    assert parsed.reason == reason
    assert parsed.value == extracted


def test_extraction_skips_a_malformed_object_and_finds_the_next_one() -> None:
    parsed = parse_response('{oops} then {"a": 1}')
    assert parsed.value == {"a": 1}
    assert not parsed.strict


def test_json_valid_fraction_counts_only_strict_objects() -> None:
    spec = MetricSpec(json_valid=True)
    responses = ['{"a": 1}', 'x {"a": 1}', '{"a": 1', "[]"]
    scores = [score_sample(r, "{}", spec) for r in responses]
    assert [s.json_valid for s in scores] == [True, False, False, False]
    assert aggregate_scores(scores, spec) == {"jsonValid": 0.25}


def test_schema_passes_only_for_a_valid_object_that_satisfies_it() -> None:
    assert json_schema_valid(parse_response(ref("Acme", 5, "May")), SCHEMA)
    assert not json_schema_valid(parse_response('{"party": "Acme", "amount": "5", "due": "May"}'), SCHEMA)
    assert not json_schema_valid(parse_response('{"party": "Acme", "amount": 5}'), SCHEMA)
    assert not json_schema_valid(
        parse_response('{"party": "Acme", "amount": 5, "due": "May", "x": 1}'), SCHEMA
    )
    # Right content but wrapped in prose: a client calling json.loads would fail, so it fails here.
    assert not json_schema_valid(parse_response("Result: " + ref("Acme", 5, "May")), SCHEMA)


def test_regex_must_match_the_whole_stripped_response() -> None:
    assert regex_full_match("  ID-1234\n", r"ID-\d{4}")
    assert not regex_full_match("ID-1234 extra", r"ID-\d{4}")
    assert not regex_full_match("the ID-1234", r"ID-\d{4}")


def test_json_equality_compares_numbers_by_value_but_keeps_types_apart() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal("1", 1)
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not json_equal({"a": [1, 2]}, {"a": [2, 1]})
    assert not json_equal("Acme", "acme")


def test_exact_match_is_reported_per_field_against_the_reference() -> None:
    reference = parse_response(ref("Acme", 5, "May"))
    got = field_matches(parse_response(ref("Acme", 7, "May")), reference, FIELDS)
    assert got == {"party": True, "amount": False, "due": True}
    # Invalid JSON matches no field, even when the values inside are right.
    assert field_matches(parse_response("ok " + ref("Acme", 5, "May")), reference, FIELDS) == dict.fromkeys(
        FIELDS, False
    )


def test_a_field_missing_from_the_reference_must_be_missing_from_the_response() -> None:
    reference = parse_response('{"party": "Acme"}')
    assert field_matches(parse_response('{"party": "Acme"}'), reference, ["party", "due"]) == {
        "party": True,
        "due": True,
    }
    assert field_matches(parse_response('{"party": "Acme", "due": null}'), reference, ["due"]) == {
        "due": False
    }


def test_dotted_field_names_reach_into_nested_objects() -> None:
    reference = parse_response('{"buyer": {"name": "Acme"}}')
    assert field_matches(
        parse_response('{"buyer": {"name": "Acme", "x": 1}}'), reference, ["buyer.name"]
    ) == {"buyer.name": True}


def test_exact_match_without_fields_compares_the_whole_response() -> None:
    assert whole_match('{"b": 2, "a": 1}', '{"a": 1, "b": 2}')
    assert whole_match(" yes \n", "yes")
    assert not whole_match('{"a": 1}', '{"a": 2}')


def test_a_model_emitting_one_fixed_json_scores_full_marks_on_keys_but_low_exact_match() -> None:
    # The measured failure mode: the right keys every time, the values of one memorised example.
    spec = MetricSpec.from_config(
        EvaluationConfig.model_validate(
            {"metrics": ["json_valid", {"json_schema": SCHEMA}, {"exact_match": FIELDS}]}
        ).metrics
    )
    references = [
        ref(p, a, d)
        for p, a, d in [("Acme", 5, "May"), ("Birch", 10, "June"), ("Cobalt", 3, "July"), ("Dune", 8, "May")]
    ]
    fixed = ref("Acme", 5, "May")
    scores = [score_sample(fixed, reference, spec) for reference in references]
    metrics = aggregate_scores(scores, spec)
    assert metrics["jsonValid"] == 1.0
    assert metrics["jsonSchema"] == 1.0
    assert metrics["exactMatch"] == 0.25
    assert metrics["fieldMatch.party"] == 0.25
    assert metrics["fieldMatch.due"] == 0.5
    assert metrics["fieldMatch.amount"] == 0.25


def test_aggregate_keys_are_stable_for_zero_samples() -> None:
    spec = MetricSpec(json_valid=True, regex="x", exact_match=["a"])
    assert aggregate_scores([], spec) == {
        "jsonValid": 0.0,
        "regex": 0.0,
        "exactMatch": 0.0,
        "fieldMatch.a": 0.0,
    }


def test_metric_spec_ignores_loss_and_knows_whether_generation_is_needed() -> None:
    only_loss = MetricSpec.from_config(EvaluationConfig.model_validate({"metrics": ["loss"]}).metrics)
    assert not only_loss.needs_generation
    spec = MetricSpec.from_config(EvaluationConfig.model_validate({"metrics": [{"regex": "a+"}]}).metrics)
    assert spec.needs_generation and spec.regex == "a+"


def test_per_sample_scores_serialise_only_the_metrics_asked_for() -> None:
    spec = MetricSpec(json_valid=True, exact_match=["a"])
    assert score_sample('{"a": 1}', '{"a": 1}', spec).as_dict() == {
        "parse": "ok",
        "jsonValid": True,
        "exactMatch": True,
        "fields": {"a": True},
    }


def test_forgetting_is_the_increase_of_probe_loss_from_base_to_tuned() -> None:
    metrics = forgetting_metrics(2.5, 2.0)
    assert metrics == {
        "forgetting.probeLoss": 2.5,
        "forgetting.lossIncrease": 0.5,
        "forgetting.relativeLossIncrease": 0.25,
    }
    assert forgetting_metrics(2.5, None) == {"forgetting.probeLoss": 2.5}


def test_perplexity_is_exp_of_loss_and_stays_finite() -> None:
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e6))


# --- evaluation helpers that need no model -------------------------------------------------


class _Tokenizer:
    def __init__(self, chat_template: str | None):
        self.chat_template = chat_template


def _artifacts(tmp_path: Path, manifest: dict | None = None, tokenizer: bool = True) -> TrainedArtifacts:
    return TrainedArtifacts(
        "adapter",
        tmp_path / "adapter",
        tmp_path / "tokenizer" if tokenizer else None,
        manifest or {},
        str(tmp_path),
    )


def test_the_template_hash_is_checked_against_the_trained_tokenizer_and_the_manifest(tmp_path: Path) -> None:
    trained = "{{ messages }}"
    assert check_template(trained, _Tokenizer(trained), _artifacts(tmp_path)) == template_hash(trained)
    with pytest.raises(TemplateMismatchError, match="trained tokenizer"):
        check_template("{{ other }}", _Tokenizer(trained), _artifacts(tmp_path))
    with pytest.raises(TemplateMismatchError, match="training manifest"):
        check_template(trained, _Tokenizer(trained), _artifacts(tmp_path, {"templateHash": "0" * 64}))
    # Without a trained tokenizer the manifest alone decides.
    assert check_template(
        trained,
        _Tokenizer(None),
        _artifacts(tmp_path, {"templateHash": template_hash(trained)}, tokenizer=False),
    )


def test_trained_artifacts_are_found_in_the_final_layout_adapter_first(tmp_path: Path) -> None:
    for sub, marker in (
        ("adapter", "adapter_config.json"),
        ("model", "config.json"),
        ("tokenizer", "tokenizer_config.json"),
    ):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / marker).write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps({"templateHash": "abc"}))
    found = locate_trained_artifacts(tmp_path, "s3://artifacts/run/final")
    assert (found.kind, found.weights_dir, found.tokenizer_dir) == (
        "adapter",
        tmp_path / "adapter",
        tmp_path / "tokenizer",
    )
    assert found.manifest == {"templateHash": "abc"}
    assert locate_trained_artifacts(tmp_path / "model", "m").kind == "full"
    with pytest.raises(FileNotFoundError):
        locate_trained_artifacts(tmp_path / "tokenizer", "t")


def test_unprefixed_metrics_are_the_mean_over_datasets() -> None:
    metrics = {"a.loss": 1.0, "b.loss": 3.0, "a.jsonValid": 0.5, "forgetting.probeLoss": 2.0}
    assert add_means_over_datasets(metrics, ["a", "b"]) == {**metrics, "loss": 2.0, "jsonValid": 0.5}

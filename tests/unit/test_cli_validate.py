"""`instructune validate`: the job's data step on local files (and S3 names), with a tokenizer
built here (instructune_jobs.synthetic.build_tokenizer): the rows it refuses as `file:line: reason`,
the statistics, and the exit code of the job's own invalid-rows rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from instructune_cli.app import app
from instructune_cli.datacheck import CheckOptions, build_config, check_data
from instructune_cli.datareport import packed_padding_fraction
from instructune_jobs.data.pipeline import load_examples
from instructune_jobs.models import load_tokenizer
from instructune_jobs.storage import MemoryObjectReader, SchemeReader

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

GOOD = [
    {"instruction": "Name the capital of France.", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello politely.", "output": "Hello, nice to meet you."},
    {"instruction": "Give the opposite of hot.", "output": "Cold."},
    {"instruction": "Spell cat backwards.", "output": "tac"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with the ChatML template, trained here in a second."""
    pytest.importorskip("transformers")
    from instructune_jobs.synthetic import build_tokenizer, tokenizer_corpus

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(tokenizer_corpus(0), vocab_size=600).save_pretrained(folder)
    return folder


def _jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _run(cwd: Path, *args: str) -> Any:
    """The command as a user runs it from `cwd` (relative paths are the user's)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return CliRunner().invoke(app, list(args))


def _bad_data(folder: Path) -> Path:
    return _jsonl(
        folder / "data" / "train.jsonl",
        [
            GOOD[0],
            "{not json",
            {"instruction": "Say nothing.", "output": "   "},
            GOOD[1],
            {"instruction": "Count.", "output": 3},
            GOOD[2],
            GOOD[3],
            GOOD[4],
        ],
    )


def test_each_refused_row_is_printed_as_file_line_reason_and_too_many_refuse_the_data_with_exit_1(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    _bad_data(tmp_path)

    result = _run(tmp_path, "validate", "data/train.jsonl", "--tokenizer", str(tokenizer_dir))

    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "data/train.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "data/train.jsonl:3: empty response in field 'output'",
        "data/train.jsonl:5: field 'output' must be a string, got number",
    ]
    assert lines[3] == "rows:       8 read (alpaca), 3 invalid"
    # The job's rule (invalidRows skip, maxFraction 1% by default): 3 of 8 is far too many.
    assert lines[-1] == "refused: 3 of 8 rows are invalid (37.50%), more than invalidRows.maxFraction 1.00%"
    assert result.exit_code == 1


def test_the_same_rows_are_accepted_with_exit_0_under_a_max_fraction_they_fit(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    _bad_data(tmp_path)

    result = _run(
        tmp_path,
        "validate",
        "data/train.jsonl",
        "--tokenizer",
        str(tokenizer_dir),
        "--max-invalid-fraction",
        "0.5",
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "accepted: 3 of 8 rows invalid (37.5%; invalidRows.policy skip, maxFraction 50.00%)"
    )
    assert "examples:   4 training, 1 validation" in result.stdout


def test_policy_fail_refuses_at_one_bad_row_yet_every_bad_row_is_listed(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    _bad_data(tmp_path)

    result = _run(
        tmp_path, "validate", "data/train.jsonl", "--tokenizer", str(tokenizer_dir), "--invalid-rows", "fail"
    )

    assert result.exit_code == 1
    assert [line for line in result.stdout.splitlines() if line.startswith("data/train.jsonl:")] == [
        "data/train.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "data/train.jsonl:3: empty response in field 'output'",
        "data/train.jsonl:5: field 'output' must be a string, got number",
    ]
    assert result.stdout.splitlines()[-1] == "refused: invalid row (invalidRows.policy is fail)"


def test_rows_over_max_seq_length_are_refused_not_truncated_and_counted_with_the_longest(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    long_answer = "The quick brown fox jumps over the lazy dog. " * 12
    _jsonl(tmp_path / "d.jsonl", [*GOOD, {"instruction": "Tell a story.", "output": long_answer}])

    result = _run(
        tmp_path,
        "validate", "d.jsonl", "--tokenizer", str(tokenizer_dir), "--max-seq-length", "48",
        "--max-invalid-fraction", "0.5",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    refused = [line for line in result.stdout.splitlines() if line.startswith("d.jsonl:")]
    assert len(refused) == 1 and refused[0].startswith("d.jsonl:6: row has ")
    tokens = int(refused[0].split("row has ")[1].split()[0])
    assert tokens > 48 and refused[0].endswith(f"row has {tokens} tokens, longer than max_seq_length 48")
    assert (
        f"too long:   1 over maxSeqLength 48 (refused, never truncated); longest {tokens} tokens"
        in result.stdout.splitlines()
    )
    length = next(line for line in result.stdout.splitlines() if line.startswith("length:"))
    assert int(length.split("max ")[1].split()[0]) <= 48  # what is kept fits


def test_the_tunes_manifest_gives_the_format_and_invalid_rows_policy(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """As the end-to-end test's refused tune: alpaca rows read as dolly under policy fail."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["dataset"]["format"] = "dolly"
    doc["spec"]["dataset"]["invalidRows"] = {"policy": "fail"}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(doc))
    _jsonl(tmp_path / "general.jsonl", GOOD[:2])

    # Offline: the tune's evaluation sets (read to decontaminate) are in S3.
    result = _run(
        tmp_path,
        "validate", "general.jsonl", "--tune", "tune.yaml", "--tokenizer", str(tokenizer_dir), "--no-decontaminate",
    )  # fmt: skip

    assert result.exit_code == 1
    assert result.stdout.splitlines()[:2] == [
        "general.jsonl:1: missing field 'response'",
        "general.jsonl:2: missing field 'response'",
    ]
    assert result.stdout.splitlines()[-1] == "refused: training source general.jsonl has no valid rows"


def test_the_tunes_limits_apply_unless_a_flag_says_otherwise(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(doc))
    from_tune = build_config(CheckOptions(data=str(tmp_path / "x.jsonl"), tune=tmp_path / "tune.yaml"))
    assert from_tune.training.max_seq_length == 256 and from_tune.dataset.format == "alpaca"
    assert from_tune.base_model.uri == "s3://models/tiny-llama/"
    assert [s.uri for s in from_tune.dataset.train] == [str(tmp_path / "x.jsonl")]
    assert from_tune.template.system_prompt == doc["spec"]["template"]["systemPrompt"]
    flagged = build_config(
        CheckOptions(
            data=str(tmp_path / "x.jsonl"), tune=tmp_path / "tune.yaml", max_seq_length=64, packing=False
        )
    )
    assert (flagged.training.max_seq_length, flagged.training.packing) == (64, False)
    assert build_config(CheckOptions(tune=tmp_path / "tune.yaml")).dataset.train[0].uri == (
        "s3://datasets/extraction/train.jsonl"
    )


def test_the_statistics_are_those_of_the_jobs_own_data_step(tmp_path: Path, tokenizer_dir: Path) -> None:
    rows = [{"instruction": f"Repeat the word {w}.", "output": f"{w} " * (i % 7 + 1)} for i, w in enumerate(
        ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota"] * 3
    )]  # fmt: skip
    path = _jsonl(tmp_path / "d.jsonl", rows)
    options = CheckOptions(data=str(path), tokenizer=str(tokenizer_dir), max_seq_length=64)

    check = check_data(options)

    job = load_examples(build_config(options), load_tokenizer(tokenizer_dir), SchemeReader())
    assert check.train_lengths == [len(e) for e in job.train]
    assert check.validation_lengths == [len(e) for e in job.validation]
    assert check.target_tokens == job.stats.target_tokens and check.rows == job.stats.rows == 30
    assert packed_padding_fraction(check.train_lengths, 64)[1] == pytest.approx(job.stats.padding_fraction)
    assert check.refused is None


def test_a_folder_is_read_as_a_prefix_and_the_audits_findings_name_their_file(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    _jsonl(tmp_path / "shards" / "a.jsonl", GOOD[:3])
    _jsonl(
        tmp_path / "shards" / "b.jsonl",
        [GOOD[0], {"instruction": "Mail jane@example.com", "output": "Done."}],
    )

    result = _run(tmp_path, "validate", "shards/", "--tokenizer", str(tokenizer_dir), "--findings")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "shards/b.jsonl:1: duplicate (of shards/a.jsonl:1), dropped",
        "shards/b.jsonl:2: pii (email), redacted",
    ]
    assert lines[3] == (
        "audits:     duplicates 1 dropped, evaluation prompts 0 dropped, personal data 1 redacted"
    )


def test_s3_objects_are_named_by_their_uri(tokenizer_dir: Path) -> None:
    body = "".join(json.dumps(r) + "\n" for r in [GOOD[0], {"instruction": "x"}, *GOOD[1:]]).encode()
    reader = MemoryObjectReader({"s3://datasets/team/train.jsonl": body})

    check = check_data(
        CheckOptions(data="s3://datasets/team/", tokenizer=str(tokenizer_dir), max_invalid_fraction=0.5),
        reader,
    )

    assert [str(row) for row in check.invalid] == ["s3://datasets/team/train.jsonl:2: missing field 'output'"]
    assert check.formats == {"s3://datasets/team/train.jsonl": "alpaca"}


def test_without_a_tokenizer_or_a_tune_validate_says_what_is_missing_and_exits_4(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d.jsonl", GOOD)

    result = _run(tmp_path, "validate", "d.jsonl")

    assert result.exit_code == 4
    assert result.stderr.strip() == (
        "error: give --tokenizer (a model folder, s3://... or hf://...) or --tune with a manifest"
    )

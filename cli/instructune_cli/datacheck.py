"""`instructune validate`: the job's own data step, run here on a file, a directory or S3.

The data is read, validated, audited and tokenized by `instructune_jobs.data.pipeline.load_examples`
with the configuration the job would get: from a tune's manifest through the operator's own
`build_train_config`, or from the flags. Only the invalid-rows policy is relaxed while it runs, so
that every bad row is found (the job stops at the first one under policy `fail`); the verdict is
then the job's own rule, `enforce_invalid_rows_policy`, on everything found.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from instructune_cli.connect import CliError
from instructune_cli.datareport import DataCheck
from instructune_jobs.config import InvalidRowsPolicy, ModelSource, TrainConfig
from instructune_jobs.data.audit import AuditFinding
from instructune_jobs.data.pipeline import DataValidationError, enforce_invalid_rows_policy, load_examples
from instructune_jobs.data.types import InvalidRow, TemplateError
from instructune_jobs.models import load_tokenizer
from instructune_jobs.storage import ObjectReader, SchemeReader, Storage
from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.train_config import build_train_config

# What a model folder holds besides the tokenizer: never downloaded to validate data.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


@dataclass(frozen=True)
class CheckOptions:
    """The flags of `validate`; None: the tune's value, else the job's default."""

    data: str | None = None
    tokenizer: str | None = None
    format: str | None = None
    max_seq_length: int | None = None
    packing: bool | None = None
    invalid_policy: str | None = None
    max_invalid_fraction: float | None = None
    decontaminate: bool | None = None
    tune: Path | None = None


def _absolute(location: str) -> str:
    """s3:// as it is; a local path made absolute (the job's config takes no relative paths)."""
    if location.startswith(("s3://", "hf://")):
        return location
    return str(Path(location.removeprefix("file://")).expanduser().resolve())


def _tune_config(manifest: Path) -> TrainConfig:
    try:
        doc = yaml.safe_load(manifest.read_text())
        meta = doc.get("metadata") or {}
        spec = InstructionTuneSpec.model_validate(doc["spec"])
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError) as err:
        raise CliError(f"{manifest}: not an InstructionTune manifest ({err})") from err
    except ValidationError as err:
        raise CliError(f"{manifest}: invalid spec: {err}") from err
    return build_train_config(spec, meta.get("namespace") or "default", meta.get("name") or "", "", 0)


# Where each flag goes in the job's configuration (TrainConfig's fields).
_FLAGS = (
    ("format", ("dataset", "format")),
    ("max_seq_length", ("training", "max_seq_length")),
    ("packing", ("training", "packing")),
    ("decontaminate", ("dataset", "audit", "decontaminate")),
    ("invalid_policy", ("dataset", "invalid_rows", "policy")),
    ("max_invalid_fraction", ("dataset", "invalid_rows", "max_fraction")),
)


def build_config(options: CheckOptions) -> TrainConfig:
    """The configuration the job would run with: the tune's (when given) with the flags on top; the
    data given replaces the tune's training sources (and its validation source: a fraction of the
    data given is held out instead)."""
    if options.tune is None and options.data is None:
        raise CliError("give the data to validate, or --tune with a manifest")
    if options.tune is None and options.tokenizer is None:
        raise CliError("give --tokenizer (a model folder, s3://... or hf://...) or --tune with a manifest")
    config: dict[str, Any] = (
        _tune_config(options.tune).model_dump(mode="json", by_alias=True)
        if options.tune is not None
        else {"base_model": {"uri": _absolute(options.tokenizer or "")}, "dataset": {"train": []}}
    )
    dataset = config["dataset"]
    if options.data is not None:
        dataset["train"] = [{"uri": _absolute(options.data)}]
        if (dataset.get("validation") or {}).get("uri"):
            dataset["validation"] = {}
    if options.tokenizer is not None:
        config["base_model"] = {"uri": _absolute(options.tokenizer)}
    for name, path in _FLAGS:
        value = getattr(options, name)
        if value is not None:
            *parents, leaf = path
            at = config
            for key in parents:
                at = at.setdefault(key, {})
            at[leaf] = value
    try:
        return TrainConfig.model_validate(config)
    except ValidationError as err:
        raise CliError(f"invalid options: {err}") from err


@contextmanager
def tokenizer_at(uri: str, storage: Storage | None = None) -> Iterator[Any]:
    """The tokenizer of a model folder: local, s3:// (every file but the weights, downloaded to a
    temporary folder) or hf://org/name@revision (the same, from the hub)."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        source = ModelSource(uri=uri)
        path = snapshot_download(
            source.hf_repo or "", revision=source.hf_revision, ignore_patterns=[f"*{s}" for s in _WEIGHTS]
        )
        yield _load(Path(path), uri)
        return
    if not uri.startswith("s3://"):
        if not Path(uri).is_dir():
            raise CliError(f"no model folder at {uri}")
        yield _load(Path(uri), uri)
        return
    with tempfile.TemporaryDirectory(prefix="instructune-tokenizer-") as folder:
        try:
            (storage or Storage()).download_prefix(
                uri.rstrip("/") + "/", Path(folder), wanted=lambda name: not name.endswith(_WEIGHTS)
            )
        except FileNotFoundError as err:
            raise CliError(str(err)) from err
        yield _load(Path(folder), uri)


def _load(path: Path, uri: str) -> Any:
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise CliError(f"no tokenizer in {uri}: {err}") from err


def _shown(typed: str) -> Callable[[str], str]:
    """Object names (in a row's place, or in an audit's detail: "of <object>:<line>") as the user
    typed the data's location: a relative path stays relative."""
    if typed.startswith("s3://"):
        return lambda text: text
    prefix, shown = _absolute(typed), typed.rstrip(os.sep) or typed
    return lambda text: text.replace(prefix, shown)


def check_data(options: CheckOptions, reader: ObjectReader | None = None) -> DataCheck:
    """Runs the data step as the job would and says whether it would refuse the data."""
    cfg = build_config(options)
    # Every bad row is wanted, not the first: the job's policy is applied afterwards.
    lenient = cfg.model_copy(deep=True)
    lenient.dataset.invalid_rows = InvalidRowsPolicy(policy="skip", max_fraction=1.0)
    show = _shown(options.data or "s3://")
    check = DataCheck(
        formats={},
        rows=0,
        invalid=[],
        audit=[],
        pii_policy=cfg.dataset.audit.pii,
        train_lengths=[],
        validation_lengths=[],
        target_tokens=0,
        max_seq_length=cfg.training.max_seq_length,
        packing=cfg.training.packing,
        batch_size=cfg.training.batch_size_per_device,
        invalid_policy=cfg.dataset.invalid_rows.policy,
        max_invalid_fraction=cfg.dataset.invalid_rows.max_fraction,
    )
    with tokenizer_at(cfg.base_model.uri) as tokenizer:
        try:
            data = load_examples(lenient, tokenizer, reader or SchemeReader())
        except FileNotFoundError as err:
            raise CliError(str(err)) from err
        except (BotoCoreError, ClientError) as err:
            raise CliError(
                f"reading S3 failed: {err} (credentials and endpoint come from AWS_* and AWS_ENDPOINT_URL; "
                "--no-decontaminate skips reading a tune's evaluation sets)"
            ) from err
        except TemplateError as err:
            check.refused = str(err)
            return check
        except DataValidationError as err:
            _found(check, err.invalid_rows, err.audit, show)
            check.rows = err.total_rows
            check.refused = show(str(err).splitlines()[0])
            return check
    _found(check, data.invalid, data.audit, show)
    check.rows = data.stats.rows
    check.formats = {show(name): fmt for name, fmt in data.stats.formats.items()}
    check.train_lengths = [len(example) for example in data.train]
    check.validation_lengths = [len(example) for example in data.validation]
    check.target_tokens = data.stats.target_tokens
    try:
        enforce_invalid_rows_policy(data.invalid, data.stats.rows, cfg.dataset.invalid_rows)
    except DataValidationError as err:
        check.refused = str(err).splitlines()[0]
    return check


def _found(
    check: DataCheck, invalid: list[InvalidRow], audit: list[AuditFinding], show: Callable[[str], str]
) -> None:
    check.invalid = [dataclasses.replace(row, object=show(row.object)) for row in invalid]
    check.audit = [dataclasses.replace(f, object=show(f.object), detail=show(f.detail)) for f in audit]

"""The data step, run once per attempt on the cluster rather than once per rank.

    prepare_on_cluster(cfg, layout)   the driver: one Ray task reads, validates and tokenizes the
                                      data (or finds it already prepared) and returns its URI;
                                      refused data raises InvalidDataError before any training
                                      worker (or GPU) is taken
    prepare_data(cfg, layout)         that task's body
    read_prepared(uri)                every training worker: the prepared data, no tokenizer work
    read_validation(uri)              evaluation: the validation split, for its loss

The prepared data sits at `<root>/data/prepared-<key>.npz`. The key covers everything that
decides its contents (the data objects' ETags, the base model revision the tokenizer comes from,
the data, template and packing settings, the seed, and the versions of the code that renders and
tokenizes), so a retried or resumed attempt reuses it and changed data never is.

The file is numpy arrays plus one JSON document, read with allow_pickle=False: whoever can write
the bucket can change what the model learns, but not run code in the training processes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from instructune_jobs.artifacts import ArtifactLayout, fetch_base_model
from instructune_jobs.config import TrainConfig
from instructune_jobs.contract import ExitCode, PermanentJobError
from instructune_jobs.data.pipeline import DataStats, DataValidationError, PreparedData, load_examples
from instructune_jobs.data.types import InvalidRow, PackedSequence, TemplateError, TokenizedExample
from instructune_jobs.models import load_tokenizer
from instructune_jobs.storage import ObjectReader, SchemeReader, Storage, join_uri

log = logging.getLogger("instructune.prepare")

# Bump when load_examples' output for the same inputs changes (rendering, masking, packing,
# audits): the package version alone does not change with every commit.
PREPARED_FORMAT = 3
_CODE_PACKAGES = ("instructune", "transformers", "tokenizers", "jinja2")
_PREFIX = "prepared-"


class InvalidDataError(PermanentJobError, ValueError):
    """The data was refused (rows that do not fit under policy "fail", too many skipped, no
    template to render with): a retry would be refused the same way."""

    exit_code = ExitCode.INVALID_DATA
    what = "the data was refused"


# ---------------------------------------------------------------------------------------------
# Key and file format (pure)
# ---------------------------------------------------------------------------------------------


def prepared_key(
    cfg: TrainConfig, base_revision: str, etags: dict[str, str], code_versions: dict[str, str]
) -> str:
    """What decides the prepared data's contents, hashed. Learning rate, steps, LoRA settings or
    the world size do not: a run that changes only those reuses the same tokens."""
    decisive = {
        "format": PREPARED_FORMAT,
        "dataset": cfg.dataset.model_dump(mode="json", by_alias=True),
        "template": cfg.template.model_dump(mode="json", by_alias=True),
        "maxSeqLength": cfg.training.max_seq_length,
        "packing": cfg.training.packing,
        # only for the padding fraction reported of unpacked batches
        "batchSizePerDevice": cfg.training.batch_size_per_device,
        "seed": cfg.training.seed,
        "baseModelRevision": base_revision,
        "etags": dict(sorted(etags.items())),
        "code": dict(sorted(code_versions.items())),
    }
    canonical = json.dumps(decisive, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def code_versions() -> dict[str, str]:
    versions = {}
    for name in _CODE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def prepared_uri(layout: ArtifactLayout, key: str) -> str:
    return join_uri(layout.root, "data", f"{_PREFIX}{key[:32]}.npz")


def _flat(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    values = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum()))
    return values, lengths


def _split(values: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    as_list = values.tolist()
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends][:-1]
    return [as_list[start:end] for start, end in zip(starts, ends, strict=True)]


def _views(values: np.ndarray, lengths: np.ndarray) -> list[Any]:
    """Consecutive slices of `values` as numpy views: no copy, 4 bytes a token, where a list
    holds an 8-byte pointer and a 28-byte int object per token."""
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _restarting_positions(example_lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... n-1 for every example, end to end: a pack's position ids."""
    starts = np.cumsum(example_lengths) - example_lengths
    return np.arange(int(example_lengths.sum()), dtype=np.int32) - np.repeat(starts, example_lengths).astype(
        np.int32
    )


def _example_arrays(name: str, examples: list[TokenizedExample]) -> dict[str, np.ndarray]:
    ids, lengths = _flat([e.input_ids for e in examples])
    labels, _ = _flat([e.labels for e in examples])
    return {f"{name}_ids": ids, f"{name}_labels": labels, f"{name}_lengths": lengths}


def _examples(arrays: Any, name: str, as_views: bool = False) -> list[TokenizedExample]:
    lengths = arrays[f"{name}_lengths"]
    split = _views if as_views else _split
    ids, labels = split(arrays[f"{name}_ids"], lengths), split(arrays[f"{name}_labels"], lengths)
    return [TokenizedExample(i, lab) for i, lab in zip(ids, labels, strict=True)]


def encode_prepared(data: PreparedData) -> bytes:
    """PreparedData as an .npz file (no pickles). A packed run's training examples are stored in
    their packs only (that is all training reads), and position ids are rebuilt from the
    examples' lengths: a third of the size of storing everything."""
    packs = data.packed_train
    meta = {
        "format": PREPARED_FORMAT,
        "chatTemplate": data.chat_template,
        "stats": asdict(data.stats),
        "invalid": [asdict(row) for row in data.invalid],
        "packed": packs is not None,
    }
    arrays: dict[str, Any] = {
        "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        **_example_arrays("validation", data.validation),
    }
    if packs is None:
        arrays.update(_example_arrays("train", data.train))
    else:
        arrays["packed_ids"], arrays["packed_lengths"] = _flat([p.input_ids for p in packs])
        arrays["packed_labels"], _ = _flat([p.labels for p in packs])
        arrays["packed_examples"], arrays["packed_counts"] = _flat([p.example_lengths for p in packs])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_prepared(blob: bytes) -> PreparedData:
    """The PreparedData encode_prepared stored; for a packed run `train` is empty (its examples
    are in `packed_train`). The training items' token sequences are int32 numpy views into one
    array per field (the collators copy them into batch rows): a rank holding a billion packed
    tokens needs ~13 GB for them, not ~89 as lists (BENCHMARKS.md). Validation examples are lists."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
        meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
        if meta.get("format") != PREPARED_FORMAT:
            raise ValueError(f"prepared data of format {meta.get('format')}, expected {PREPARED_FORMAT}")
        stats_fields = dict(meta["stats"])
        stats_fields["invalid_samples"] = [InvalidRow(**row) for row in stats_fields["invalid_samples"]]
        packed = None
        if meta["packed"]:
            lengths, example_lengths = arrays["packed_lengths"], arrays["packed_examples"]
            packed = [
                PackedSequence(ids, labels, positions, examples)
                for ids, labels, positions, examples in zip(
                    _views(arrays["packed_ids"], lengths),
                    _views(arrays["packed_labels"], lengths),
                    _views(_restarting_positions(example_lengths), lengths),
                    _split(example_lengths, arrays["packed_counts"]),
                    strict=True,
                )
            ]
        return PreparedData(
            train=[] if packed is not None else _examples(arrays, "train", as_views=True),
            validation=_examples(arrays, "validation"),
            packed_train=packed,
            chat_template=meta["chatTemplate"],
            stats=DataStats(**stats_fields),
            invalid=[InvalidRow(**row) for row in meta["invalid"]],
        )


# ---------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    uri: str
    reused: bool


def _listed_etags(cfg: TrainConfig, reader: ObjectReader) -> dict[str, str]:
    """The ETag of every object the data step will read (what load_examples records)."""
    uris = [source.uri for source in cfg.dataset.train]
    if cfg.dataset.validation.uri:
        uris.append(cfg.dataset.validation.uri)
    if cfg.dataset.audit.decontaminate:
        uris += [d.uri for d in cfg.evaluation.datasets]
        if cfg.evaluation.general_probe is not None:
            uris.append(cfg.evaluation.general_probe.uri)
    return {ref.uri: ref.etag for uri in uris for ref in reader.list_objects(uri)}


def prepare_data(
    cfg: TrainConfig,
    layout: ArtifactLayout,
    storage: Storage | None = None,
    reader: ObjectReader | None = None,
) -> Prepared:
    """Read, validate, tokenize and pack the data into `<root>/data/`, unless data prepared from
    the same inputs is already there. Raises InvalidDataError when the data is refused."""
    storage, reader = storage or Storage(), reader or SchemeReader()
    base = fetch_base_model(cfg.base_model, storage)
    versions = code_versions()
    existing = prepared_uri(layout, prepared_key(cfg, base.revision, _listed_etags(cfg, reader), versions))
    if storage.exists(existing):
        log.info("data already prepared from the same inputs: %s", existing)
        return Prepared(existing, reused=True)
    try:
        data = load_examples(cfg, load_tokenizer(base.path), reader)
    except DataValidationError as err:
        report_invalid_rows(err.invalid_rows, layout, storage)
        write_rows_report(err.audit, layout.audit_report, storage)
        raise InvalidDataError(str(err)) from err
    except TemplateError as err:
        raise InvalidDataError(str(err)) from err
    report_invalid_rows(data.invalid, layout, storage)
    write_rows_report(data.audit, layout.audit_report, storage)
    if data.audit:
        log.warning(
            "audits: %d duplicate rows and %d rows with evaluation prompts dropped, %d rows with "
            "personal data (%s); every row in %s",
            data.stats.duplicates,
            data.stats.contaminated,
            data.stats.pii_rows,
            cfg.dataset.audit.pii,
            layout.audit_report,
        )
    # Keyed by the ETags actually read, in case an object changed after the listing above.
    read_etags = data.stats.etags | data.stats.reference_etags
    uri = prepared_uri(layout, prepared_key(cfg, base.revision, read_etags, versions))
    storage.write_bytes(uri, encode_prepared(data))
    for stale in storage.list(join_uri(layout.root, "data")):
        if stale.uri.rsplit("/", 1)[-1].startswith(_PREFIX) and stale.uri != uri:
            storage.delete(stale.uri)
    log.info(
        "prepared %d training and %d validation examples (%d rows read, %d refused): %s",
        data.stats.train_examples,
        data.stats.validation_examples,
        data.stats.rows,
        data.stats.invalid_rows,
        uri,
    )
    return Prepared(uri, reused=False)


def write_rows_report(rows: Sequence[Any], uri: str, storage: Storage) -> None:
    """Dataclass rows as JSON lines at uri; no rows, no file (one left by earlier data goes)."""
    if not rows:
        if storage.exists(uri):
            storage.delete(uri)
        return
    body = "".join(json.dumps(asdict(row)) + "\n" for row in rows).encode("utf-8")
    storage.write_bytes(uri, body, "application/x-ndjson")


def report_invalid_rows(rows: Sequence[InvalidRow], layout: ArtifactLayout, storage: Storage) -> None:
    """Every refused row into `<root>/data/invalid-rows.jsonl` (status.data.invalidRowsReport
    names it): skipped rows must be findable, not only counted."""
    write_rows_report(rows, layout.invalid_rows, storage)
    if not rows:
        return
    shown = "; ".join(str(row) for row in rows[:5])
    log.warning("%d rows refused (all in %s), first: %s", len(rows), layout.invalid_rows, shown)


def prepare_on_cluster(cfg: TrainConfig, layout: ArtifactLayout) -> Prepared:
    """prepare_data as one Ray task with a worker's CPUs (the head may have few, and no model
    cache), never a GPU: tokenizing needs none."""
    import ray

    def run(config_json: str, root: str) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            prepared = prepare_data(TrainConfig.from_json(config_json), ArtifactLayout(root))
        except InvalidDataError as err:
            # Returned, not raised: Ray would wrap the exception in its own type and traceback.
            return {"invalid": str(err)}
        return {"uri": prepared.uri, "reused": prepared.reused}

    cpus = cfg.resources.cpus_per_worker / max(1, cfg.resources.gpus_per_worker)
    task = ray.remote(num_cpus=cpus, num_gpus=0, max_retries=0)(run)
    result: dict[str, Any] = ray.get(task.remote(cfg.to_json(), layout.root))
    if "invalid" in result:
        raise InvalidDataError(result["invalid"])
    return Prepared(result["uri"], result["reused"])


def _read(uri: str, storage: Storage | None) -> bytes:
    blob = (storage or Storage()).read_bytes(uri)
    if blob is None:
        raise FileNotFoundError(f"no prepared data at {uri}")
    return blob


def read_prepared(uri: str, storage: Storage | None = None) -> PreparedData:
    return decode_prepared(_read(uri, storage))


def read_validation(uri: str, storage: Storage | None = None) -> list[TokenizedExample]:
    """Only the validation split: the tokens, with the training masks, that training never saw."""
    with np.load(io.BytesIO(_read(uri, storage)), allow_pickle=False) as arrays:
        return _examples(arrays, "validation")

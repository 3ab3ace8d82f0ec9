"""Where a tune's files live (the layout), the base model's local copy and the lineage manifest.

Layout under the run's root (`checkpointing.uri`, else `output.uri`), shared with evaluate.py:

    <root>/checkpoints/checkpoint_step_<N>/   checkpoints (checkpointing.py), uploaded by every rank;
                                            the last `keep_last` complete ones are kept
        instructune_state.json              step, epoch, config hash, loss: written last, once
                                            every rank's part is uploaded, so its presence is
                                            what makes a checkpoint complete
    <root>/final/adapter/                   PEFT save_pretrained (lora, qlora)
    <root>/final/model/                     full fine-tune, or base+adapter merged (output.merge)
    <root>/final/tokenizer/                 tokenizer with the chat template trained with
    <root>/final/manifest.json              copy of manifest.json, so final/ describes itself
    <root>/manifest.json                    lineage: base model + revision, data ETags, hashes,
                                            package versions
    <root>/metrics.jsonl                    one line per optimizer step (all attempts)
    <root>/progress.json                    latest progress and checkpoints
    <root>/eval/report.json                 written by evaluate.py
    <root>/data/prepared-<key>.npz          the tokenized (and packed) data, see prepare.py
    <root>/data/invalid-rows.jsonl          every row the data step refused: object, line, reason
    <root>/data/audit.jsonl                 every row an audit dropped, redacted or flagged

Roots are s3:// prefixes or local directories (tests, the offline demo), read and written
through storage.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructune_jobs.config import ModelSource, TrainConfig
from instructune_jobs.storage import ObjectRef, Storage, join_uri

CHECKPOINT_PREFIX = "checkpoint_step_"
RUN_NAME = "checkpoints"  # Ray Train's run name: the checkpoints' folder under the root
MODEL_CACHE = Path(
    os.environ.get("INSTRUCTUNE_MODEL_CACHE", str(Path(tempfile.gettempdir()) / "instructune-models"))
)
LINEAGE_PACKAGES = (
    "instructune",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "ray",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "accelerate",
)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactLayout:
    root: str

    @classmethod
    def for_config(cls, cfg: TrainConfig, fallback_root: str | None = None) -> ArtifactLayout:
        root = cfg.checkpointing.uri or cfg.output.uri or fallback_root
        if not root:
            raise ValueError("nowhere to put checkpoints and artifacts: set checkpointing.uri")
        return cls(root.rstrip("/"))

    def _at(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    @property
    def checkpoints(self) -> str:
        return self._at(RUN_NAME)

    def checkpoint(self, step: int) -> str:
        return self._at(RUN_NAME, checkpoint_dir_name(step))

    @property
    def final(self) -> str:
        return self._at("final")

    @property
    def final_adapter(self) -> str:
        return self._at("final", "adapter")

    @property
    def final_model(self) -> str:
        return self._at("final", "model")

    @property
    def final_tokenizer(self) -> str:
        return self._at("final", "tokenizer")

    @property
    def final_manifest(self) -> str:
        return self._at("final", "manifest.json")

    @property
    def manifest(self) -> str:
        return self._at("manifest.json")

    @property
    def metrics(self) -> str:
        return self._at("metrics.jsonl")

    @property
    def progress(self) -> str:
        return self._at("progress.json")

    @property
    def eval_report(self) -> str:
        return self._at("eval", "report.json")

    @property
    def invalid_rows(self) -> str:
        return self._at("data", "invalid-rows.jsonl")

    @property
    def audit_report(self) -> str:
        return self._at("data", "audit.jsonl")


def checkpoint_dir_name(step: int) -> str:
    # Zero-padded so that lexical order (S3 listings) is step order.
    return f"{CHECKPOINT_PREFIX}{step:09d}"


# ---------------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalModel:
    path: Path
    source: str
    revision: str  # hub commit, or "sha256:<digest of the objects' names and ETags/contents>"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Workers on one node share a download: the first downloads, the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def content_revision(objects: list[ObjectRef], base_uri: str) -> str:
    base = base_uri.rstrip("/") + "/"
    listing = "\n".join(f"{o.uri.removeprefix(base)} {o.etag}" for o in sorted(objects, key=lambda o: o.uri))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def fetch_base_model(
    source: ModelSource, storage: Storage | None = None, cache_dir: Path = MODEL_CACHE
) -> LocalModel:
    """A local copy of the base model and its revision. s3:// prefixes are downloaded once per
    node (keyed by content), hf:// through the hub client at the pinned revision, local paths used
    as they are."""
    storage = storage or Storage()
    uri = source.uri
    if source.scheme == "hf":
        from huggingface_hub import HfApi, snapshot_download

        repo, revision = source.hf_repo, source.hf_revision or "main"
        assert repo is not None
        commit = HfApi().model_info(repo, revision=revision).sha or revision
        path = snapshot_download(repo, revision=commit)
        return LocalModel(Path(path), uri, commit)
    prefix = uri if uri.endswith("/") else uri + "/"
    objects = storage.list(prefix)
    if not objects:
        raise FileNotFoundError(f"no model files under {uri}")
    revision = content_revision(objects, prefix)
    if not uri.startswith("s3://"):
        return LocalModel(Path(uri.removeprefix("file://")), uri, revision)
    target = cache_dir / revision.removeprefix("sha256:")[:32]
    with _file_lock(target.with_suffix(".lock")):
        if not (target / ".complete").is_file():
            shutil.rmtree(target, ignore_errors=True)
            storage.download_prefix(prefix, target)
            (target / ".complete").touch()
    return LocalModel(target, uri, revision)


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LINEAGE_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def build_lineage_status(cfg: TrainConfig, base_revision: str, data_etags: dict[str, str]) -> dict[str, Any]:
    """The tune's `status.lineage` (camelCase, operator/api.py's Lineage)."""
    return {
        "baseModelRevision": base_revision,
        "dataEtags": dict(sorted(data_etags.items())),
        "configHash": cfg.config_hash(),
        "image": os.environ.get("INSTRUCTUNE_IMAGE") or None,
        "version": package_versions().get("instructune"),
    }


def build_manifest(
    cfg: TrainConfig,
    *,
    base: LocalModel,
    data_stats: dict[str, Any],
    data_etags: dict[str, str],
    template_hash: str,
    outputs: dict[str, str],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to reproduce (and trust) the trained weights."""
    return {
        "kind": "InstructionTuneManifest",
        "tune": {
            "namespace": cfg.run.namespace,
            "name": cfg.run.name,
            "uid": cfg.run.uid,
            "attempt": cfg.run.attempt,
        },
        "baseModel": {"uri": base.source, "revision": base.revision},
        "data": {"etags": dict(sorted(data_etags.items())), **data_stats},
        "configHash": cfg.config_hash(),
        "templateHash": template_hash,
        "method": cfg.method.type,
        "outputs": outputs,
        "training": training,
        "packages": package_versions(),
        "image": os.environ.get("INSTRUCTUNE_IMAGE") or None,
        "config": json.loads(cfg.to_json()),
    }

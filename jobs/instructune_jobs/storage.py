"""Every object-store access of the job: s3:// (boto3, or pyarrow for Ray Train) and local paths.

Two views of the same stores:

    ObjectReader (S3ObjectReader, LocalObjectReader, MemoryObjectReader, SchemeReader)
        lists and reads the data objects a dataset uri names (the data step)
    Storage
        reads, writes, lists, uploads and downloads a run's files (checkpoints, reports, models)

Credentials and the endpoint come from the process environment only.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet")


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(part.strip("/") for part in parts if part)])


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


@dataclass(frozen=True)
class ObjectRef:
    """One stored object: its uri, ETag (an MD5 of the content for local files) and size."""

    uri: str
    etag: str
    size: int


class ObjectReader(Protocol):
    def list_objects(self, uri: str) -> list[ObjectRef]:
        """The data objects a uri names: the object itself, or every data object under a prefix."""
        ...

    def read_object(self, ref: ObjectRef) -> bytes: ...


def is_data_object(key: str) -> bool:
    return key.lower().endswith(DATA_SUFFIXES)


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3 uri: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def s3_client_from_env() -> Any:
    """boto3 S3 client for the endpoint in AWS_ENDPOINT_URL or INSTRUCTUNE_S3_ENDPOINT (MinIO and
    other S3-compatibles need path-style addressing); credentials come from the usual AWS_* env."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("INSTRUCTUNE_S3_ENDPOINT") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


class LazyS3Client:
    """Holds the S3 client given, or one made from the environment on first use (so that
    constructing a reader never needs credentials)."""

    def __init__(self, client: Any | None = None):
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client_from_env()
        return self._client


def _list_s3(client: Any, bucket: str, prefix: str) -> list[ObjectRef]:
    """Every object whose key starts with `prefix`, in the listing's (lexical) order."""
    refs = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            refs.append(ObjectRef(f"s3://{bucket}/{item['Key']}", item["ETag"].strip('"'), item["Size"]))
    return refs


class S3ObjectReader(LazyS3Client):
    def _list(self, bucket: str, prefix: str) -> list[ObjectRef]:
        return _list_s3(self.client, bucket, prefix)

    def list_objects(self, uri: str) -> list[ObjectRef]:
        bucket, key = split_s3_uri(uri)
        if key and not key.endswith("/"):
            # "s3://b/data.jsonl" is that object; "s3://b/data" is the prefix "data/".
            exact = [ref for ref in self._list(bucket, key) if ref.uri == uri]
            if exact:
                return exact
            key += "/"
        refs = [ref for ref in self._list(bucket, key) if is_data_object(ref.uri)]
        return sorted(refs, key=lambda ref: ref.uri)

    def read_object(self, ref: ObjectRef) -> bytes:
        bucket, key = split_s3_uri(ref.uri)
        body: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body


class LocalObjectReader:
    """Local files (file:///path or /path) for tests and the offline demo. The ETag is the MD5
    of the content, as S3 gives for single-part uploads."""

    def list_objects(self, uri: str) -> list[ObjectRef]:
        path = Path(uri.removeprefix("file://"))
        if path.is_file():
            paths = [path]
        elif path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file() and is_data_object(p.name))
        else:
            raise FileNotFoundError(f"no such file or directory: {uri}")
        return [ObjectRef(str(p), hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_size) for p in paths]

    def read_object(self, ref: ObjectRef) -> bytes:
        return Path(ref.uri).read_bytes()


class MemoryObjectReader:
    """Objects held in memory ({uri: bytes}); a uri ending in "/" lists a prefix."""

    def __init__(self, objects: Mapping[str, bytes]):
        self.objects = dict(objects)

    def list_objects(self, uri: str) -> list[ObjectRef]:
        if uri in self.objects:
            names = [uri]
        else:
            prefix = uri if uri.endswith("/") else uri + "/"
            names = sorted(name for name in self.objects if name.startswith(prefix) and is_data_object(name))
        return [ObjectRef(n, hashlib.md5(self.objects[n]).hexdigest(), len(self.objects[n])) for n in names]

    def read_object(self, ref: ObjectRef) -> bytes:
        return self.objects[ref.uri]


class SchemeReader:
    """Dispatches s3:// to S3 and everything else to the local file system."""

    def __init__(self, s3: ObjectReader | None = None, local: ObjectReader | None = None):
        self.s3 = s3 or S3ObjectReader()
        self.local = local or LocalObjectReader()

    def _for(self, uri: str) -> ObjectReader:
        return self.s3 if uri.startswith("s3://") else self.local

    def list_objects(self, uri: str) -> list[ObjectRef]:
        return self._for(uri).list_objects(uri)

    def read_object(self, ref: ObjectRef) -> bytes:
        return self._for(ref.uri).read_object(ref)


def read_object_bytes(uri: str, reader: ObjectReader | None = None) -> bytes:
    """All of one object's bytes (small files: an evaluation schema, a report)."""
    reader = reader or SchemeReader()
    refs = reader.list_objects(uri)
    if len(refs) != 1:
        raise FileNotFoundError(f"expected one object at {uri}, found {len(refs)}")
    return reader.read_object(refs[0])


class Storage(LazyS3Client):
    """Small object I/O for s3:// and local roots; one S3 client, created on first use."""

    def write_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            return
        path = _local(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see half a file

    def read_bytes(self, uri: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            try:
                body: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
            return body
        path = _local(uri)
        return path.read_bytes() if path.is_file() else None

    def exists(self, uri: str) -> bool:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except self.client.exceptions.ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True
        return _local(uri).is_file()

    def delete(self, uri: str) -> None:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            self.client.delete_object(Bucket=bucket, Key=key)
        else:
            _local(uri).unlink(missing_ok=True)

    def list(self, prefix_uri: str) -> list[ObjectRef]:
        """Every object under a prefix (recursively), sorted by uri."""
        if prefix_uri.startswith("s3://"):
            bucket, key = split_s3_uri(prefix_uri)
            key = key.rstrip("/") + "/" if key else ""
            return sorted(_list_s3(self.client, bucket, key), key=lambda o: o.uri)
        root = _local(prefix_uri)
        if not root.is_dir():
            return []
        return [
            ObjectRef(str(p), _file_md5(p), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()
        ]

    def upload_directory(self, local_dir: Path, uri: str) -> builtins.list[str]:
        written = []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            target = join_uri(uri, path.relative_to(local_dir).as_posix())
            if target.startswith("s3://"):
                bucket, key = split_s3_uri(target)
                self.client.upload_file(str(path), bucket, key)
            else:
                _local(target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, _local(target))
            written.append(target)
        return written

    def delete_prefix(self, uri: str, first: str | None = None) -> None:
        """Delete every object under a prefix; `first` (a name directly under it) goes before
        the rest, so a reader never sees the prefix without it but with other parts missing."""
        objects = self.list(uri)
        if first is not None:
            head = join_uri(uri, first)
            objects.sort(key=lambda o: o.uri.replace(os.sep, "/") != head.replace(os.sep, "/"))
        for obj in objects:
            self.delete(obj.uri)
        if not uri.startswith("s3://"):
            shutil.rmtree(_local(uri), ignore_errors=True)

    def download_prefix(
        self, uri: str, dest: Path, wanted: Callable[[str], bool] | None = None
    ) -> builtins.list[ObjectRef]:
        """Every object under the prefix (or those whose path under it `wanted` accepts)."""
        objects = self.list(uri)
        if not objects:
            raise FileNotFoundError(f"no objects under {uri}")
        base = uri.rstrip("/") + "/"
        if wanted is not None:
            objects = [o for o in objects if wanted(o.uri.replace(os.sep, "/").removeprefix(base))]
        for obj in objects:
            target = (
                dest / obj.uri[len(base) :]
                if uri.startswith("s3://")
                else dest / Path(obj.uri).relative_to(_local(uri))
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            if uri.startswith("s3://"):
                bucket, key = split_s3_uri(obj.uri)
                self.client.download_file(bucket, key, str(target))
            else:
                shutil.copyfile(obj.uri, target)
        return objects


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ray_storage(root: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig. For S3: a pyarrow
    S3FileSystem on the configured endpoint; pyarrow reads the credentials from the environment
    itself, so they never pass through the config or Ray's job info."""
    if not root.startswith("s3://"):
        return str(_local(root)), None
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("INSTRUCTUNE_S3_ENDPOINT")
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    bucket, key = split_s3_uri(root)
    return f"{bucket}/{key}".rstrip("/"), fs.S3FileSystem(**kwargs)

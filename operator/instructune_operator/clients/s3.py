"""S3 access of the operator itself: only deleting a tune's artifacts when its spec asks for it."""

from __future__ import annotations

import os

import boto3


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


def delete_prefix(uri: str, endpoint: str | None = None) -> int:
    bucket, prefix = _split(uri)
    endpoint = endpoint or os.environ.get("INSTRUCTUNE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    deleted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})  # type: ignore[typeddict-item]
            deleted += len(keys)
    return deleted

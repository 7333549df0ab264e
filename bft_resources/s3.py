"""Objects on S3 (or any S3-compatible store) through dagster-aws's ``S3Resource``.

The client comes from ``S3Resource.get_client()``: endpoint URL, region and credentials
are the resource's fields (set from ``EnvVar``) or, where unset, boto3's standard chain
(environment, profile, instance role). Nothing here logs a credential.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bft_resources.files import file_lock

if TYPE_CHECKING:
    from dagster_aws.s3 import S3Resource

SCHEME = "s3://"
_READY = ".bft-complete"  # written last into a downloaded folder


def is_s3(uri: str) -> bool:
    return uri.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # no leading slash; a "folder" has no trailing slash either

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not is_s3(uri):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, key = uri[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket")
        return cls(bucket, key.strip("/"))

    def child(self, relative: str) -> S3Location:
        return S3Location(self.bucket, f"{self.key}/{relative}".strip("/"))

    @property
    def folder_prefix(self) -> str:
        return f"{self.key}/" if self.key else ""

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def client(s3: S3Resource | None) -> Any:
    """A boto3 S3 client; without a resource, boto3's standard configuration chain. One
    client per distinct setting in a process: building one (session, credential chain,
    endpoint) takes ~160 ms here, and a step reads and writes many objects. boto3 clients
    are thread-safe and refresh temporary credentials themselves."""
    from dagster_aws.s3 import S3Resource

    settings = tuple(sorted((s3 or S3Resource()).model_dump().items()))
    # Unset fields fall back to the AWS_* variables, so they are part of what a client is for.
    chain = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _client_for(settings, chain)


@functools.lru_cache(maxsize=8)
def _client_for(settings: tuple[tuple[str, Any], ...], _chain: tuple[tuple[str, str], ...]) -> Any:
    from dagster_aws.s3 import S3Resource

    return S3Resource(**dict(settings)).get_client()


def list_objects(s3_client: Any, folder: S3Location) -> Iterator[dict]:
    """Every object under a folder (recursively), as list_objects_v2 entries."""
    pages = s3_client.get_paginator("list_objects_v2").paginate(
        Bucket=folder.bucket, Prefix=folder.folder_prefix
    )
    for page in pages:
        yield from page.get("Contents", [])


def head(s3_client: Any, location: S3Location) -> dict | None:
    """An object's metadata, or None when it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return s3_client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise


def download_object(s3_client: Any, location: S3Location, target: Path) -> None:
    """Download to ``target`` through a temporary file, so a crash leaves no half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        s3_client.download_file(location.bucket, location.key, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def folder_version(objects: list[dict]) -> str:
    """A folder's version: a hash of its keys and their ETags (an ETag changes whenever an
    object's content does)."""
    digest = hashlib.blake2b(digest_size=12)
    for entry in sorted(objects, key=lambda e: e["Key"]):
        digest.update(f"{entry['Key']}\x00{entry['ETag']}\x00".encode())
    return digest.hexdigest()


def cached_folder(s3_client: Any, folder: S3Location, cache_root: Path) -> Path:
    """A local copy of an S3 folder, downloaded once per folder version."""
    objects = list(list_objects(s3_client, folder))
    if not objects:
        raise FileNotFoundError(f"{folder.uri} holds no objects")
    target = cache_root / folder.bucket / folder.key / folder_version(objects)
    if (target / _READY).exists():
        return target
    with file_lock(target.with_name(f"{target.name}.lock")):
        if not (target / _READY).exists():
            download_folder(s3_client, folder, objects, target)
    return target


def download_folder(s3_client: Any, folder: S3Location, objects: list[dict], target: Path) -> None:
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        for entry in objects:
            relative = entry["Key"][len(folder.folder_prefix) :]
            download_object(s3_client, S3Location(folder.bucket, entry["Key"]), staging / relative)
        (staging / _READY).write_text(folder.uri + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def upload_folder(s3_client: Any, source: Path, folder: S3Location, last: str) -> str:
    """Upload every file under ``source`` to ``folder`` and delete the objects the new
    folder no longer has; ``last`` (a marker such as a manifest) goes up after all of
    that, so a reader who waits for it never sees a mix. Returns the marker's ETag."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != _READY)
    key_of = {p: folder.child(p.relative_to(source).as_posix()) for p in files}
    wanted = {target.key for target in key_of.values()}
    stale = [e["Key"] for e in list_objects(s3_client, folder) if e["Key"] not in wanted]
    # A PUT (or a completed multipart upload) makes an object visible whole or not at all.
    for path in files:
        if path.name != last:
            s3_client.upload_file(str(path), key_of[path].bucket, key_of[path].key)
    for start in range(0, len(stale), 1000):  # delete_objects takes at most 1,000 keys
        s3_client.delete_objects(
            Bucket=folder.bucket,
            Delete={"Objects": [{"Key": k} for k in stale[start : start + 1000]]},
        )
    marker = folder.child(last)
    s3_client.upload_file(str(source / last), marker.bucket, marker.key)
    return head(s3_client, marker)["ETag"]

"""Reading web-corpus shards (Dolma gzip JSONL), on local disk or S3: discovery,
fingerprints and line streams."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from bft_resources.keys import safe_segment, unsafe_reason
from bft_resources.s3 import S3Location, is_s3, list_objects
from bft_resources.s3 import client as s3_client
from bft_resources.uris import parse_location

SHARD_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl")
_READ_CHUNK = 1 << 20


class ShardReadError(RuntimeError):
    """A shard could not be read to its end (truncated or corrupt compression)."""


@dataclass(frozen=True)
class Refused:
    """A shard file that gets no partition, and why (an unsafe or colliding key)."""

    uri: str
    key: str
    reason: str


@dataclass(frozen=True)
class Shard:
    key: str  # the dynamic partition key
    uri: str  # a local path or s3://bucket/key
    size_bytes: int
    etag: str | None = None  # S3 only


def shard_key(relative: str) -> str:
    """Partition key for a shard path relative to the corpus root: its path without the
    extension, folders joined by '.' (``cc_en_head/0001.json.gz`` -> ``cc_en_head.0001``)."""
    for suffix in SHARD_SUFFIXES:
        if relative.lower().endswith(suffix):
            relative = relative[: -len(suffix)]
            break
    return relative.replace("/", ".")


class CorpusSource(dg.ConfigurableResource):
    """A folder of Dolma-format shards, local or ``s3://bucket/prefix``;
    one shard, one partition."""

    uri: str = Field(
        description="Folder or s3:// prefix holding *.jsonl.gz / *.json.gz shards (searched recursively)."
    )
    s3: S3Resource | None = Field(
        default=None, description="Client settings for an s3:// corpus (default: boto3's chain)."
    )

    @property
    def _on_s3(self) -> bool:
        return parse_location(self.uri, "corpus").on_s3

    @property
    def _root(self) -> Path:
        return parse_location(self.uri, "corpus").path.resolve()

    def survey(self) -> tuple[list[Shard], list[Refused]]:
        """The shards that can be partitions, and the files refused with a reason: a key that
        is not a safe path segment, or one that two files map to (neither gets it, so a
        partition never reads the wrong file). One bad name does not hide the others."""
        found = self._list_s3() if self._on_s3 else self._list_local()
        by_key: dict[str, list[Shard]] = {}
        for shard in found:
            by_key.setdefault(shard.key, []).append(shard)
        shards, refused = [], []
        for key, same in sorted(by_key.items()):
            reason = unsafe_reason(key) or next(filter(None, map(self._outside_root, same)), None)
            if reason is None and len(same) > 1:
                reason = "files collide on it: " + ", ".join(s.uri for s in same)
            if reason is None:
                shards.append(same[0])
            else:
                refused += [
                    Refused(s.uri, key, f"partition key {key!r} refused: {reason}") for s in same
                ]
        return shards, refused

    def list_shards(self) -> list[Shard]:
        return self.survey()[0]

    def _files(self) -> list[tuple[Path, str]]:
        """Every file under the corpus folder, with its path relative to it."""
        root = self._root
        if not root.is_dir():
            raise FileNotFoundError(f"corpus folder {root} does not exist")
        return [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*")) if p.is_file()]

    def _list_local(self) -> list[Shard]:
        return [Shard(shard_key(relative), str(path), path.stat().st_size)
                for path, relative in self._files() if _is_shard(relative)]  # fmt: skip

    def skipped_files(self) -> list[Refused]:
        """Files under a local corpus folder that are not shards (by name), each with why."""
        if self._on_s3:
            return []
        return [Refused(str(path), "", f"not a shard: bft reads {', '.join(SHARD_SUFFIXES)}")
                for path, relative in self._files() if not _is_shard(relative)]  # fmt: skip

    def _outside_root(self, shard: Shard) -> str | None:
        """Why a local shard may not be read: a symlink (of the file or a folder on its way)
        that leads out of the corpus folder."""
        if self._on_s3:
            return None
        root = self._root
        if not Path(shard.uri).resolve().is_relative_to(root):
            return f"it leads outside the corpus folder {root} (to {Path(shard.uri).resolve()})"
        return None

    def _list_s3(self) -> list[Shard]:
        folder = S3Location.parse(self.uri)
        shards = []
        for entry in list_objects(s3_client(self.s3), folder):
            relative = entry["Key"][len(folder.folder_prefix) :]
            if _is_shard(relative):
                uri = S3Location(folder.bucket, entry["Key"]).uri
                shards.append(Shard(shard_key(relative), uri, entry["Size"], entry["ETag"]))
        return sorted(shards, key=lambda s: s.key)

    def shard(self, key: str) -> Shard:
        safe_segment(key)  # a key added by hand is refused before any listing or read
        for shard in self.list_shards():
            if shard.key == key:
                return shard
        raise KeyError(f"no shard with partition key {key!r} under {self.uri}")

    def fingerprint(self, shard: Shard) -> str:
        """The shard's data version: a content hash of the local file, or the object's ETag
        on S3 (which changes whenever its content does, and costs no read)."""
        if shard.etag is not None:
            return "etag-" + shard.etag.strip('"')
        digest = hashlib.blake2b(digest_size=16)
        with open(shard.uri, "rb") as handle:
            while chunk := handle.read(_READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def lines(self, shard: Shard) -> Iterator[bytes]:
        """Raw lines (without the newline), streamed. A broken compressed stream raises
        ShardReadError naming the file, the last whole line and the compressed offset."""
        with contextlib.ExitStack() as stack:
            raw = _CountingReader(stack.enter_context(self._open(shard)))
            compressed = shard.uri.lower().endswith(".gz")
            handle = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            line_no = 0
            try:
                for line in handle:
                    line_no += 1
                    yield line.rstrip(b"\r\n")
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
                raise ShardReadError(
                    f"{shard.uri}: compressed stream broke after line {line_no} "
                    f"(at compressed byte {raw.position} of {shard.size_bytes}): {exc}"
                ) from exc

    @contextlib.contextmanager
    def _open(self, shard: Shard) -> Iterator[BinaryIO]:
        if not is_s3(shard.uri):
            with open(shard.uri, "rb") as handle:
                yield handle
            return
        location = S3Location.parse(shard.uri)
        body = s3_client(self.s3).get_object(Bucket=location.bucket, Key=location.key)["Body"]
        try:
            yield body
        finally:
            body.close()


def _is_shard(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name.lower().endswith(SHARD_SUFFIXES) and not name.startswith(".")


class _CountingReader(io.RawIOBase):
    """Counts the compressed bytes read, for error messages (an S3 body cannot tell())."""

    def __init__(self, inner: BinaryIO):
        self._inner = inner
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

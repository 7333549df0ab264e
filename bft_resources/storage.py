"""Where tables and checkpoints live.

Layout, the same on every backend, so that a person can find her data:
``<root>/<asset>/<partition>.parquet`` (unpartitioned: ``<root>/<asset>.parquet``),
sidecars as ``<root>/<asset>/<partition>.<suffix>.parquet`` and checkpoints as folders
``<root>/<asset>/<partition>/``. Every write is atomic: a reader sees the old file or the
whole new one, never a half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from dagster_aws.s3 import S3Resource
from pydantic import Field

from bft_resources.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from bft_resources.checkpoints import verify_checkpoint
from bft_resources.files import file_lock
from bft_resources.keys import safe_relative, safe_segment
from bft_resources.s3 import (
    S3Location,
    download_folder,
    download_object,
    head,
    list_objects,
    upload_folder,
)
from bft_resources.s3 import client as s3_client
from bft_resources.uris import parse_location


class TableReadError(RuntimeError):
    """A stored table that cannot be read (truncated, corrupt, not Parquet)."""


def _no_table(where: str, asset: str, partition: str | None) -> str:
    of = f" for partition {partition!r}" if partition else ""
    return f"{where} does not exist: materialize {asset}{of} first"


def _no_checkpoint(where: str, asset: str, partition: str) -> str:
    return f"{where} holds no trained model: materialize {asset}[{partition}] first"


def table_name(asset: str, partition: str | None = None, suffix: str | None = None) -> str:
    """Relative path of a table: ``asset/partition[.suffix].parquet`` or ``asset[.suffix].parquet``.
    Every part must be a safe path segment (UnsafeKeyError otherwise)."""
    safe_relative(asset, "asset path")
    if suffix:
        safe_segment(suffix, "table suffix")
    stem = f"{asset}/{safe_segment(partition)}" if partition else asset
    if suffix:
        stem = f"{stem}.{suffix}"
    return f"{stem}.parquet"


class TableWriter:
    """Appends polars frames to one Parquet file as row groups, so a table of any size is
    written with memory bounded by one batch. The writer owns the file's handle and lets go
    of it however the write ends: a temporary file deleted while still open keeps its blocks,
    which a full disk needs back."""

    def __init__(self, path: Path, schema: pa.Schema | None = None, destination: str = ""):
        self._path = path
        self._schema = schema
        self._sink: pa.NativeFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._failed = False
        self._destination = destination or str(path)  # what the error names: the table's
        self.rows = 0

    @contextlib.contextmanager
    def _naming_the_table(self) -> Iterator[None]:
        """An OS error (a full disk, a lost mount) says which table it was writing."""
        try:
            yield
        except OSError as exc:
            self._failed = True
            raise OSError(exc.errno, f"writing {self._destination}: {exc.strerror or exc}") from exc

    def _open(self) -> pa.NativeFile:
        self._sink = pa.OSFile(str(self._path), "wb")
        return self._sink

    def write(self, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if self._schema is not None:
            table = table.cast(self._schema)
        with self._naming_the_table():
            if self._writer is None:
                self._schema = table.schema
                self._writer = pq.ParquetWriter(self._open(), self._schema, compression="zstd")
            self._writer.write_table(table)
        self.rows += frame.height

    def close(self) -> None:
        """Finish the file (after a failed write: only release it; the table is not whole)."""
        try:
            if self._failed:
                return
            with self._naming_the_table():
                if self._writer is None and self._schema is not None:
                    # An empty table is still a table: readers get the schema and zero rows.
                    pq.write_table(self._schema.empty_table(), self._open())
                elif self._writer is not None:
                    self._writer.close()
        finally:
            if self._sink is not None:
                self._sink.close()


class Storage(dg.ConfigurableResource, ABC):
    """Tables (Parquet through polars) and checkpoint folders under one root."""

    @abstractmethod
    def uri(self, relative: str) -> str:
        """Where a relative path lives, as a user would type it (a path or an s3:// URI)."""

    @abstractmethod
    @contextlib.contextmanager
    def table_writer(
        self,
        asset: str,
        partition: str | None = None,
        suffix: str | None = None,
        schema: pa.Schema | None = None,
    ) -> Iterator[TableWriter]:
        """Stream batches into a table; it becomes visible, whole, when the block exits."""

    @abstractmethod
    def local_table(self, asset: str, partition: str | None, suffix: str | None) -> Path:
        """A local file holding the table (S3: downloaded once per version);
        FileNotFoundError, saying what to materialize, when there is none."""

    def read(
        self, asset: str, partition: str | None = None, suffix: str | None = None
    ) -> pl.DataFrame:
        """Read a whole table; TableReadError names the file when it cannot be read."""
        path = self.local_table(asset, partition, suffix)
        try:
            return pl.read_parquet(path)
        except Exception as exc:  # polars/arrow say what broke but not which file
            raise TableReadError(
                f"{self.uri(table_name(asset, partition, suffix))}: unreadable table ({exc})"
            ) from exc

    def scan(
        self, asset: str, partition: str | None = None, suffix: str | None = None
    ) -> pl.LazyFrame:
        """A table, lazily: read only the columns and rows a query needs."""
        path = self.local_table(asset, partition, suffix)
        try:
            pq.read_metadata(path)  # a truncated file fails here, with its name, not mid-query
        except Exception as exc:
            raise TableReadError(
                f"{self.uri(table_name(asset, partition, suffix))}: unreadable table ({exc})"
            ) from exc
        return pl.scan_parquet(path)

    @abstractmethod
    def exists(self, asset: str, partition: str | None = None, suffix: str | None = None) -> bool:
        """Whether a table has been written."""

    @abstractmethod
    def write_text(self, relative: str, text: str) -> str:
        """Write a text file atomically (e.g. a JSONL export) and return its URI."""

    @abstractmethod
    def checkpoint_dir(self, asset: str, partition: str) -> Path:
        """The local folder to write a model checkpoint into; ``publish_checkpoint`` then
        makes it the checkpoint at ``<root>/<asset>/<partition>/``."""

    @abstractmethod
    def publish_checkpoint(self, asset: str, partition: str) -> str:
        """Make the checkpoint written into ``checkpoint_dir`` visible to readers (whole:
        its manifest last) and return its URI."""

    @abstractmethod
    def fetch_checkpoint(self, asset: str, partition: str) -> Path:
        """A local folder holding the published checkpoint; FileNotFoundError when there
        is none (no manifest)."""

    @abstractmethod
    def scratch_dir(self, asset: str, partition: str | None, key: str) -> Path:
        """A local working folder that survives a crash (e.g. finished generation batches)."""

    def write(
        self,
        asset: str,
        frame: pl.DataFrame,
        partition: str | None = None,
        suffix: str | None = None,
    ) -> str:
        """Write a whole table atomically and return its URI."""
        with self.table_writer(asset, partition, suffix) as writer:
            writer.write(frame)
        return self.uri(table_name(asset, partition, suffix))


class LocalStorage(Storage):
    """A folder on local disk."""

    root: str

    @property
    def _root(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def path(self, relative: str) -> Path:
        return self._root / safe_relative(relative, "storage path")

    def uri(self, relative: str) -> str:
        return str(self.path(relative))

    @contextlib.contextmanager
    def table_writer(
        self,
        asset: str,
        partition: str | None = None,
        suffix: str | None = None,
        schema: pa.Schema | None = None,
    ) -> Iterator[TableWriter]:
        final = self.path(table_name(asset, partition, suffix))
        with _atomic_file(final) as tmp:
            writer = TableWriter(tmp, schema, str(final))
            try:
                yield writer
            finally:
                writer.close()

    def local_table(self, asset: str, partition: str | None, suffix: str | None) -> Path:
        path = self.path(table_name(asset, partition, suffix))
        if not path.exists():
            raise FileNotFoundError(_no_table(str(path), asset, partition))
        return path

    def exists(self, asset: str, partition: str | None = None, suffix: str | None = None) -> bool:
        return self.path(table_name(asset, partition, suffix)).exists()

    def checkpoint_dir(self, asset: str, partition: str) -> Path:
        return self._root / safe_relative(asset, "asset path") / safe_segment(partition)

    def publish_checkpoint(self, asset: str, partition: str) -> str:
        # The trainer already stages the folder and renames it into place, manifest inside.
        return str(self.fetch_checkpoint(asset, partition))

    def fetch_checkpoint(self, asset: str, partition: str) -> Path:
        folder = self.checkpoint_dir(asset, partition)
        if not (folder / CHECKPOINT_MANIFEST).exists():
            raise FileNotFoundError(_no_checkpoint(str(folder), asset, partition))
        verify_checkpoint(folder)
        return folder

    def write_text(self, relative: str, text: str) -> str:
        with _atomic_file(self.path(relative)) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.uri(relative)

    def scratch_dir(self, asset: str, partition: str | None, key: str) -> Path:
        folder = self._root / ".work" / scratch_path(asset, partition, key)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def scratch_path(asset: str, partition: str | None, key: str) -> str:
    safe_relative(asset, "asset path")
    return f"{asset}/{safe_segment(partition) if partition else '_'}/{safe_segment(key, 'scratch key')}"


# A temporary file beside a table that nobody has written to for this long was left by a
# killed writer (a live writer streams row groups into it, which keeps its mtime fresh).
ORPHAN_AFTER_S = 15 * 60


def _remove_orphans(final: Path) -> None:
    cutoff = time.time() - ORPHAN_AFTER_S
    for orphan in final.parent.glob(f".{final.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if orphan.stat().st_mtime < cutoff:
                orphan.unlink()


@contextlib.contextmanager
def _atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class S3Storage(Storage):
    """A prefix in an S3 bucket (``s3://bucket/prefix``), with the local layout.

    Tables are written to a local spool file and uploaded in one PUT (multipart for large
    files), which S3 makes visible whole or not at all. Readers download a table once per
    ETag into ``cache_dir`` and scan it there, so lazy projections stay cheap. Checkpoints
    are trained into a local folder and uploaded with the manifest last, after the old
    manifest was removed: a reader sees a whole checkpoint or none.
    """

    root: str = Field(description="s3://bucket/prefix holding every table and checkpoint.")
    s3: S3Resource | None = Field(
        default=None, description="Endpoint, region and credentials (default: boto3's chain)."
    )
    cache_dir: str = Field(
        default="~/.cache/bft/s3",
        description="Local folder for downloaded tables and checkpoints, spool files and scratch.",
    )

    @property
    def _location(self) -> S3Location:
        return S3Location.parse(self.root)

    @property
    def _cache(self) -> Path:
        location = self._location
        return Path(self.cache_dir).expanduser().resolve() / location.bucket / location.key

    def _client(self) -> Any:
        return s3_client(self.s3)

    def uri(self, relative: str) -> str:
        return self._location.child(relative).uri

    @contextlib.contextmanager
    def table_writer(
        self,
        asset: str,
        partition: str | None = None,
        suffix: str | None = None,
        schema: pa.Schema | None = None,
    ) -> Iterator[TableWriter]:
        relative = table_name(asset, partition, suffix)
        spool = self._cache / ".spool" / f"{uuid.uuid4().hex}.parquet"
        spool.parent.mkdir(parents=True, exist_ok=True)
        try:
            writer = TableWriter(spool, schema, self._location.child(relative).uri)
            try:
                yield writer
            finally:
                writer.close()
            target = self._location.child(relative)
            self._client().upload_file(str(spool), target.bucket, target.key)
        finally:
            spool.unlink(missing_ok=True)

    def local_table(self, asset: str, partition: str | None, suffix: str | None) -> Path:
        relative = table_name(asset, partition, suffix)
        location = self._location.child(relative)
        client = self._client()
        meta = head(client, location)
        if meta is None:
            raise FileNotFoundError(_no_table(location.uri, asset, partition))
        etag = meta["ETag"].strip('"').replace("/", "_")
        local = self._cache / ".tables" / f"{relative}.{etag}"
        if not local.exists():
            download_object(client, location, local)
        return local

    def exists(self, asset: str, partition: str | None = None, suffix: str | None = None) -> bool:
        location = self._location.child(table_name(asset, partition, suffix))
        return head(self._client(), location) is not None

    def write_text(self, relative: str, text: str) -> str:
        location = self._location.child(safe_relative(relative, "storage path"))
        self._client().put_object(
            Bucket=location.bucket, Key=location.key, Body=text.encode("utf-8")
        )
        return location.uri

    def checkpoint_dir(self, asset: str, partition: str) -> Path:
        folder = (
            self._cache / ".staging" / safe_relative(asset, "asset path") / safe_segment(partition)
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        return folder

    def publish_checkpoint(self, asset: str, partition: str) -> str:
        staged = self.checkpoint_dir(asset, partition)
        if not (staged / CHECKPOINT_MANIFEST).exists():
            raise FileNotFoundError(_no_checkpoint(str(staged), asset, partition))
        folder = self._location.child(f"{asset}/{safe_segment(partition)}")
        manifest = folder.child(CHECKPOINT_MANIFEST)
        client = self._client()
        client.delete_object(Bucket=manifest.bucket, Key=manifest.key)
        manifest_etag = upload_folder(client, staged, folder, last=CHECKPOINT_MANIFEST)
        # What was just uploaded is what a reader in this process would download: keep it.
        cached = self._fetched(asset, partition, manifest_etag)
        if cached.exists():
            shutil.rmtree(cached)
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, cached)
        return folder.uri

    def _fetched(self, asset: str, partition: str, manifest_etag: str) -> Path:
        return self._cache / ".checkpoints" / asset / partition / manifest_etag.strip('"')

    def fetch_checkpoint(self, asset: str, partition: str) -> Path:
        folder = self._location.child(
            f"{safe_relative(asset, 'asset path')}/{safe_segment(partition)}"
        )
        client = self._client()
        meta = head(client, folder.child(CHECKPOINT_MANIFEST))
        if meta is None:
            raise FileNotFoundError(_no_checkpoint(folder.uri, asset, partition))
        local = self._fetched(asset, partition, meta["ETag"])
        if not (local / CHECKPOINT_MANIFEST).exists():
            with file_lock(local.with_name(f"{local.name}.lock")):
                if not (local / CHECKPOINT_MANIFEST).exists():
                    download_folder(client, folder, list(list_objects(client, folder)), local)
        verify_checkpoint(local)
        return local

    def scratch_dir(self, asset: str, partition: str | None, key: str) -> Path:
        folder = self._cache / ".work" / scratch_path(asset, partition, key)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def storage_for(root: str, s3: S3Resource | None) -> Storage:
    """The storage for a root (``uris.parse_location``): S3, or a local folder."""
    location = parse_location(root, "storage")
    return (
        S3Storage(root=location.uri, s3=s3) if location.on_s3 else LocalStorage(root=location.uri)
    )

"""Reading records from local files: a JSON list, JSONL or Parquet (JSON gzip-compressed or
not), a file or a folder of them: the seed set (oasst message trees or flat pairs) and
external instruction datasets (Alpaca, ShareGPT, OpenOrca).

Every file under a folder is read or reported as skipped, with its name and why (not a
record file by its name, or a symlink that leads out of the folder)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from bft_resources.uris import parse_location

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


class UnreadableFile(Exception):
    """A file that cannot be read at all; it is one record, dropped with its reason."""


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next(
        (s for s in sorted(RECORD_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None
    )


class RecordFiles(dg.ConfigurableResource):
    """Where a set of records lives: a file or a folder of files."""

    uri: str = Field(description="A JSON list, JSONL(.gz) or Parquet file, or a folder of them.")
    what: str = Field(
        default="seed", description="What the records are, for messages (seed, dataset)."
    )

    @property
    def _path(self) -> Path:
        return parse_location(self.uri, self.what).path

    def _survey(self) -> tuple[list[Path], list[tuple[str, str]]]:
        """(files to read, (file, why) for every file not read)."""
        path = self._path
        if not path.is_dir():
            if not path.exists():
                raise FileNotFoundError(f"{self.what} file {path} does not exist")
            return [path], []
        root, files, skipped = path.resolve(), [], []
        for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
            if not candidate.resolve().is_relative_to(root):
                skipped.append((str(candidate), f"a symlink that leads outside {root}"))
            elif _suffix(candidate) is None or candidate.name.startswith("."):
                skipped.append(
                    (str(candidate), f"not a record file: bft reads {', '.join(RECORD_SUFFIXES)}")
                )
            else:
                files.append(candidate)
        if not files:
            raise FileNotFoundError(
                f"no {self.what} files ({', '.join(RECORD_SUFFIXES)}) under {path}"
            )
        return files, skipped

    def files(self) -> list[Path]:
        return self._survey()[0]

    def skipped(self) -> list[tuple[str, str]]:
        """Files of the folder that are not read, and why."""
        return self._survey()[1]

    def records(self) -> Iterator[tuple[str, Any]]:
        """(where, record) for every record of every file, in file order; a line that is not
        JSON yields its exception as the record, so the caller counts it as a drop."""
        for path in self.files():
            if _suffix(path) == ".parquet":
                try:
                    frame = pl.read_parquet(path)
                except Exception as exc:  # one bad file is a counted drop, not the whole seed
                    yield path.name, UnreadableFile(f"{path}: unreadable Parquet ({exc})")
                    continue
                for i, row in enumerate(frame.iter_rows(named=True), start=1):
                    yield f"{path.name}:{i}", row
                continue
            opener = gzip.open if _suffix(path).endswith(".gz") else open
            try:
                with opener(path, "rb") as handle:
                    if _is_json_list(handle):
                        yield from _list_items(path, handle)
                        continue
                    for i, line in enumerate(handle, start=1):
                        if not line.strip():
                            continue
                        try:
                            yield f"{path.name}:{i}", json.loads(line)
                        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                            yield f"{path.name}:{i}", exc
            except (OSError, EOFError) as exc:  # a broken gzip stream: what was read stays
                yield path.name, UnreadableFile(f"{path}: unreadable ({exc})")


def _is_json_list(handle) -> bool:
    """Whether a JSON file holds one list (a byte-order mark and white space aside); the
    handle is left at its start."""
    head = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    handle.seek(0)
    return head.startswith(b"[")


def _list_items(path: Path, handle) -> Iterator[tuple[str, Any]]:
    try:
        items = json.loads(handle.read().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        yield path.name, exc
        return
    for i, item in enumerate(items, start=1):
        yield f"{path.name}[{i}]", item

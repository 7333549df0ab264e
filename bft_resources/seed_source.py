"""Reading seed records from local files: oasst message-tree JSONL, flat JSONL or Parquet."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

SEED_SUFFIXES = frozenset({".jsonl", ".json", ".parquet"})


class UnreadableFile(Exception):
    """A seed file that cannot be read at all; it is one record, dropped with its reason."""


class SeedSource(dg.ConfigurableResource):
    """Where the seed set lives: a file or a folder of files."""

    uri: str = Field(
        description="An oasst *.trees.jsonl file, a flat pairs JSONL/Parquet file, or a folder of them."
    )

    def files(self) -> list[Path]:
        path = Path(self.uri).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in SEED_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"no .jsonl or .parquet seed files under {path}")
            return files
        if not path.exists():
            raise FileNotFoundError(f"seed file {path} does not exist (the instance's seed.uri)")
        return [path]

    def records(self) -> Iterator[tuple[str, Any]]:
        """(where, record) for every record of every file, in file order; a line that is not
        JSON yields its exception as the record, so the caller counts it as a drop."""
        for path in self.files():
            if path.suffix == ".parquet":
                try:
                    frame = pl.read_parquet(path)
                except Exception as exc:  # one bad file is a counted drop, not the whole seed
                    yield path.name, UnreadableFile(f"{path}: unreadable Parquet ({exc})")
                    continue
                for i, row in enumerate(frame.iter_rows(named=True), start=1):
                    yield f"{path.name}:{i}", row
                continue
            with open(path, "rb") as handle:
                for i, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path.name}:{i}", json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        yield f"{path.name}:{i}", exc

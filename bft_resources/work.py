"""Resumable batch work: each finished batch is a Parquet part in a scratch folder keyed by
asset, partition and the settings that produced it, so a crash or a kill loses at most the
batch in flight and a retry generates only what is missing.

Two runs of one partition (a pool of 2) take turns on the folder: an exclusive lock beside
it is held while a run works in it and while it is cleared, so neither reads a part the
other is deleting. Leftovers of a killed run (a half-written ``.part-*.tmp``) are ignored
and removed with the folder; a part that cannot be read is discarded, and its rows are
generated again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bft_resources.files import file_lock

_log = logging.getLogger(__name__)


@dataclass
class WorkStats:
    rows: int = 0  # rows processed in this run (not reused)
    reused_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def rate(self) -> str:
        """The throughput a person can read: tokens generated per second, or, where a pass
        only reads (log-probabilities), prompt tokens per second."""
        if not self.seconds:
            return "no rate yet"
        if self.completion_tokens:
            return f"{self.completion_tokens / self.seconds:.1f} generated tokens/s"
        return f"{self.prompt_tokens / self.seconds:.1f} prompt tokens/s"


class ResumableWork:
    def __init__(self, folder: Path, key_column: str, log: Callable[[str], None] = _log.warning):
        self.folder = folder
        self.key_column = key_column
        self.warn = log
        folder.mkdir(parents=True, exist_ok=True)

    def _turn(self) -> contextlib.AbstractContextManager[None]:
        """This process's exclusive turn on the folder; another run of the same partition
        waits here, asleep in flock, not spinning."""
        return file_lock(self.folder.with_name(f"{self.folder.name}.lock"))

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done(self) -> pl.DataFrame | None:
        """Every readable finished part; an unreadable one (a disk error, a kill mid-copy)
        is discarded with a warning that names it, and its rows are done again."""
        frames = []
        for part in self._parts():
            try:
                frames.append(pl.read_parquet(part))
            except Exception as exc:
                self.warn(f"discarding unreadable scratch part {part}: {exc}")
                part.unlink(missing_ok=True)
        return pl.concat(frames, how="vertical_relaxed") if frames else None

    def save(self, frame: pl.DataFrame) -> None:
        final = self.folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
        tmp = final.with_name(f".{final.name}.tmp")
        frame.write_parquet(tmp)
        os.replace(tmp, final)

    def clear(self) -> None:
        """Remove the folder and whatever a killed run left in it."""
        with self._turn():
            shutil.rmtree(self.folder, ignore_errors=True)

    def run(
        self,
        rows: pl.DataFrame,
        process: Callable[[pl.DataFrame], pl.DataFrame],
        batch_rows: int,
        log: Callable[[str], None] = print,
        label: str = "rows",
    ) -> tuple[pl.DataFrame, WorkStats]:
        """Process ``rows`` in batches, skipping keys a finished part already holds.

        ``process`` returns one output row per input row, with the key column and, where it
        generated text, ``prompt_tokens``/``completion_tokens`` columns."""
        with self._turn():
            self.folder.mkdir(parents=True, exist_ok=True)  # a run before ours may have cleared it
            return self._run(rows, process, batch_rows, log, label)

    def _run(
        self,
        rows: pl.DataFrame,
        process: Callable[[pl.DataFrame], pl.DataFrame],
        batch_rows: int,
        log: Callable[[str], None],
        label: str,
    ) -> tuple[pl.DataFrame, WorkStats]:
        stats = WorkStats()
        done = self.done()
        finished = set() if done is None else set(done[self.key_column].to_list())
        todo = rows.filter(~pl.col(self.key_column).is_in(list(finished)))
        stats.reused_rows = rows.height - todo.height
        if stats.reused_rows:
            log(f"resuming: {stats.reused_rows} of {rows.height} {label} already done")
        if todo.height:
            log(f"{todo.height} {label} to do, {batch_rows} a batch")
        started = time.perf_counter()
        for offset in range(0, todo.height, batch_rows):
            batch = todo.slice(offset, batch_rows)
            out = process(batch)
            if out.height != batch.height:
                raise RuntimeError(f"a batch of {batch.height} {label} gave {out.height} results")
            self.save(out)
            stats.rows += out.height
            for column in ("prompt_tokens", "completion_tokens"):
                if column in out.columns:
                    setattr(stats, column, getattr(stats, column) + int(out[column].sum()))
            stats.seconds = time.perf_counter() - started
            left = todo.height - stats.rows
            eta = stats.seconds / stats.rows * left
            log(f"{stats.reused_rows + stats.rows} of {rows.height} {label}; {stats.rate()}; "
                f"ETA {eta:.0f} s")  # fmt: skip
        stats.seconds = time.perf_counter() - started
        result = self.done()
        if result is None:  # nothing to do: still the output's columns, with no rows
            return process(rows.head(0)), stats
        keys = rows.select(self.key_column).with_row_index("_order")
        # Parts from a batch re-run after a crash may repeat a key: keep one.
        result = result.unique(self.key_column, keep="last")
        ordered = keys.join(result, on=self.key_column, how="inner").sort("_order").drop("_order")
        return ordered, stats

"""The evaluation set: AlpacaEval's format (a JSON list of {instruction, output, generator,
dataset}) or JSONL with the same fields; ``output`` (the reference answer) is optional.

Malformed input fails naming the file, the line and the field; a UTF-8 byte-order mark is
read as one; an instruction that repeats an earlier one is dropped and counted (judging it
twice would weigh it twice)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from bft_resources.uris import parse_location

TEXT_FIELDS = ("instruction", "output", "generator", "dataset")


class EvalSetError(ValueError):
    """An evaluation set that cannot be read as one, naming where."""


@dataclass(frozen=True)
class EvalSet:
    rows: pl.DataFrame  # index, instruction, reference, reference_generator, dataset
    duplicates_dropped: int


def _records(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line, record) for a JSON list or JSONL text; malformed JSON names file and line."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        # A JSON list gives no line per record: its position stands in ("item N").
        return list(enumerate(rows, start=1))
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise EvalSetError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return records


def _checked(path: Path, where: str, record: Any) -> dict[str, str | None]:
    if not isinstance(record, dict):
        raise EvalSetError(f"{path}:{where}: a JSON {type(record).__name__}, not an object")
    out = {}
    for name in TEXT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise EvalSetError(
                f"{path}:{where}: field {name!r} is a JSON {type(value).__name__}, not a string"
            )
        out[name] = value
    if not (out["instruction"] or "").strip():
        raise EvalSetError(f"{path}:{where}: field 'instruction' is missing or empty")
    return out


class EvalSetSource(dg.ConfigurableResource):
    uri: str = Field(description="AlpacaEval JSON list or JSONL file.")
    limit: int | None = Field(
        default=None, ge=1, description="Evaluate the first N instructions only."
    )

    def load(self) -> EvalSet:
        path = parse_location(self.uri, "eval").path
        if not path.exists():
            raise FileNotFoundError(
                f"evaluation set {path} does not exist (the instance's eval.uri)"
            )
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not content
        except UnicodeDecodeError as exc:
            raise EvalSetError(f"{path}: not UTF-8 text ({exc})") from exc
        is_list = text.lstrip().startswith("[")
        rows = [
            _checked(path, f"item {n}" if is_list else str(n), r) for n, r in _records(path, text)
        ]
        seen: set[str] = set()
        unique = [r for r in rows if not (r["instruction"] in seen or seen.add(r["instruction"]))]
        frame = pl.DataFrame(
            {"instruction": [r["instruction"] for r in unique], "reference": [r["output"] for r in unique],
             "reference_generator": [r["generator"] for r in unique],
             "dataset": [r["dataset"] or "unknown" for r in unique]},
            schema=dict.fromkeys(("instruction", "reference", "reference_generator", "dataset"), pl.String),
        ).with_row_index("index")  # fmt: skip
        return EvalSet(
            frame.head(self.limit) if self.limit is not None else frame, len(rows) - len(unique)
        )

    def read(self) -> pl.DataFrame:
        return self.load().rows

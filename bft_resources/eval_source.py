"""The evaluation set: AlpacaEval's format (a JSON list of {instruction, output, generator,
dataset}) or JSONL with the same fields; ``output`` (the reference answer) is optional."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field


class EvalSetSource(dg.ConfigurableResource):
    uri: str = Field(description="AlpacaEval JSON list or JSONL file.")
    limit: int | None = Field(default=None, description="Evaluate the first N instructions only.")

    def read(self) -> pl.DataFrame:
        path = Path(self.uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"evaluation set {path} does not exist (the instance's eval.uri)"
            )
        text = path.read_text(encoding="utf-8")
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
        bad = [
            i
            for i, r in enumerate(rows)
            if not isinstance(r, dict) or not str(r.get("instruction") or "").strip()
        ]
        if bad:
            raise ValueError(f"{path}: rows {bad[:10]} have no instruction")
        frame = pl.DataFrame(
            {
                "instruction": [r["instruction"] for r in rows],
                "reference": [r.get("output") for r in rows],
                "reference_generator": [r.get("generator") for r in rows],
                "dataset": [r.get("dataset") or "unknown" for r in rows],
            },
            schema={
                "instruction": pl.String,
                "reference": pl.String,
                "reference_generator": pl.String,
                "dataset": pl.String,
            },
        ).with_row_index("index")
        return frame.head(self.limit) if self.limit is not None else frame

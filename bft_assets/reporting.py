"""Materialization metadata a person reads in the Dagster UI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dagster as dg
import polars as pl

_PERCENTILES = (0.05, 0.5, 0.95)


def percentiles(values: pl.Series) -> dict[str, float]:
    """p5 / p50 / p95 / max of a numeric column (empty: no entries)."""
    values = values.drop_nulls()
    if values.is_empty():
        return {}
    out = {
        f"p{int(q * 100)}": float(values.quantile(q, interpolation="nearest")) for q in _PERCENTILES
    }
    out["max"] = float(values.max())
    return out


def percentile_metadata(prefix: str, values: pl.Series) -> dict[str, object]:
    """One small table (p5, p50, p95, max) to read, and the median alone, which the UI plots
    across materializations."""
    found = percentiles(values)
    if not found:
        return {}
    table = markdown_table([{k: round(v, 1) for k, v in found.items()}])
    return {prefix: table, f"{prefix}_p50": found["p50"]}


def markdown_table(rows: Sequence[Mapping[str, object]], width: int = 160) -> dg.MetadataValue:
    """Rows as a Markdown table, each cell cut to ``width`` characters on one line."""
    if not rows:
        return dg.MetadataValue.md("_no rows_")
    columns = list(rows[0])

    def cell(value: object) -> str:
        text = " ".join(str(value).split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def sample_rows(
    frame: pl.DataFrame, columns: Sequence[str], n: int = 5, width: int = 160
) -> dg.MetadataValue:
    """The first ``n`` rows of ``columns`` as Markdown (first rows: stable across re-runs)."""
    return markdown_table(frame.select(columns).head(n).to_dicts(), width)


def files_table(files: Sequence[tuple[str, str]]) -> dg.MetadataValue:
    """Files a stage did not read, each with why (every file of an input folder is read or
    named here)."""
    return markdown_table([{"file": f, "why": why} for f, why in files], width=200)


def counts_table(
    counts: Mapping[str, int], label: str = "reason", total: int | None = None
) -> dg.MetadataValue:
    """Non-zero counts as one Markdown table, largest first, with each count's share of
    ``total`` (default: of the counts' sum)."""
    whole = total if total is not None else sum(counts.values())
    rows = [
        {label: k, "rows": v, "share": f"{v / whole:.1%}" if whole else "-"}
        for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
        if v
    ]
    return markdown_table(rows)


def table_metadata(
    frame: pl.DataFrame | pl.LazyFrame,
    descriptions: Mapping[str, str] | None = None,
    rows: int | None = None,
) -> dict[str, object]:
    """Dagster's standard table metadata: the column schema (names, types, what each holds)
    and the row count, which the UI shows on the asset page and plots over time. A lazy
    frame gives its schema without reading the table; pass its ``rows`` then."""
    descriptions = descriptions or {}
    schema = frame.collect_schema() if isinstance(frame, pl.LazyFrame) else frame.schema
    columns = [
        dg.TableColumn(name=name, type=str(dtype), description=descriptions.get(name))
        for name, dtype in schema.items()
    ]
    return {
        "dagster/column_schema": dg.TableSchema(columns=columns),
        "dagster/row_count": frame.height if rows is None else rows,
    }

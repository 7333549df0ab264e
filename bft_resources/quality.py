"""Great Expectations rules, run as Dagster asset checks.

A rule names a GX expectation by its class name and its arguments as plain data, so asset
modules declare their rules without importing GX (a ~3-6 s import, paid once, lazily, on
the first validation). GX has no polars datasource: the columns a rule needs are handed
over as a pandas frame.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import dagster as dg
import polars as pl

_REPORTED_RESULT_KEYS = (
    "observed_value",
    "element_count",
    "unexpected_count",
    "unexpected_percent",
    "missing_count",
    "partial_unexpected_list",
)


@dataclass(frozen=True)
class Rule:
    """One asset check backed by one GX expectation."""

    check_name: str
    expectation: (
        str  # a class in great_expectations.expectations, e.g. "ExpectColumnValuesToNotBeNull"
    )
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
    description: str = ""
    blocking: bool = False

    @property
    def columns(self) -> list[str]:
        names = [self.kwargs[k] for k in ("column", "column_A", "column_B") if k in self.kwargs]
        names += list(self.kwargs.get("column_list", []))
        return names

    def spec(self, asset: str | dg.AssetKey) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(
            self.check_name,
            asset=asset,
            description=self.description or _describe(self),
            blocking=self.blocking,
        )


def _describe(rule: Rule) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in rule.kwargs.items())
    return f"Great Expectations {rule.expectation}({args})"


@cache
def _batch_definition() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("bft")
    return source.add_dataframe_asset("table").add_batch_definition_whole_dataframe("whole")


def _expectation(rule: Rule) -> Any:
    import great_expectations as gx

    try:
        cls = getattr(gx.expectations, rule.expectation)
    except AttributeError:
        raise ValueError(
            f"{rule.check_name}: no GX expectation named {rule.expectation!r}"
        ) from None
    return cls(**rule.kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value[:10]]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def run_rules(frame: pl.DataFrame, rules: Sequence[Rule]) -> list[dg.AssetCheckResult]:
    """Validate ``frame`` against each rule; one AssetCheckResult per rule, observed values in
    its metadata. An empty table fails every rule: no data is not good data."""
    columns = sorted({c for rule in rules for c in rule.columns if c in frame.columns})
    batch = _batch_definition().get_batch(
        batch_parameters={"dataframe": frame.select(columns).to_pandas()}
    )
    results = []
    for rule in rules:
        missing = [c for c in rule.columns if c not in frame.columns]
        if missing:
            passed, metadata = False, {"error": f"missing columns {missing}"}
        else:
            outcome = batch.validate(_expectation(rule))
            reported = {
                k: _jsonable(outcome.result[k])
                for k in _REPORTED_RESULT_KEYS
                if k in outcome.result
            }
            passed = bool(outcome.success) and frame.height > 0
            metadata = {"expectation": rule.expectation, "rows": frame.height, **reported}
        results.append(
            dg.AssetCheckResult(
                check_name=rule.check_name,
                passed=passed,
                severity=rule.severity,
                metadata={
                    k: dg.MetadataValue.json(v) if isinstance(v, list | dict) else v
                    for k, v in metadata.items()
                    if v is not None
                },
            )
        )
    return results

"""Bounds on declared numbers that a Dagster component can resolve.

Dagster resolves a plain pydantic model nested in a component's YAML only when every field's
annotation is a plain type; pydantic's own ``Field(ge=...)`` turns the annotation into
``Annotated[int, Ge(1)]``, which the resolver refuses. So a bound is declared once, as the
field's JSON-schema keyword (``minimum``, ``exclusiveMinimum``, ...: what the YAML's schema
and editors read), and ``check_bounds`` enforces it when the model is built."""

from __future__ import annotations

import operator
from typing import Any

from pydantic import BaseModel, Field

_KEYWORDS = {
    "minimum": (operator.ge, ">="),
    "exclusiveMinimum": (operator.gt, ">"),
    "maximum": (operator.le, "<="),
    "exclusiveMaximum": (operator.lt, "<"),
}


def bounded(
    default: Any,
    *,
    description: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    examples: list[Any] | None = None,
) -> Any:
    """A ``Field`` whose value (when not None) must lie within the given bounds."""
    keywords = {"minimum": ge, "exclusiveMinimum": gt, "maximum": le, "exclusiveMaximum": lt}
    return Field(
        default=default,
        description=description,
        examples=examples,
        json_schema_extra={k: v for k, v in keywords.items() if v is not None},
    )


def check_bounds(model: BaseModel) -> None:
    """Raise ValueError naming every field of ``model`` outside its declared bounds."""
    wrong = []
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        value = getattr(model, name)
        if value is None or isinstance(value, bool):
            continue
        for keyword, (holds, sign) in _KEYWORDS.items():
            if keyword in extra and not holds(value, extra[keyword]):
                wrong.append(f"{name} must be {sign} {extra[keyword]} (got {value})")
    if wrong:
        raise ValueError("; ".join(wrong))

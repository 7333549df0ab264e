"""The JSON schema `dg check defs` validates a bft declaration against, made strict enough to
point at the attribute that is wrong.

Dagster derives a component's schema from its attributes and lets every attribute that is
not a string also be a string, since any value may be a template (``{{ env.X }}``) rendered
when the declaration loads. So ``min_words: many`` or ``recipes: [{name: filtrage_é}]``
passes the check ("All component YAML validated successfully."), then fails while the
definitions load, naming the attribute's parent or no line at all. Here such a string must
look like a template, and any other value is held to the attribute's own schema through
``if``/``then``/``else`` rather than ``anyOf``, so the checker descends into the value and
names the attribute's own file, line and path. What the YAML accepts is unchanged.
"""

from __future__ import annotations

import types
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator
from pydantic_core import InitErrorDetails

# A string that Dagster renders as a template when the declaration loads.
TEMPLATE = r"\{\{|\{%"
_ANY_STRING = {"type": "string"}
_NULL = {"type": "null"}


def _strict_field(field: dict[str, Any]) -> dict[str, Any]:
    """One attribute's schema: a string only as a template, anything else as declared.

    Dagster adds the string last among the attribute's own types (pydantic puts ``null``
    after it); a string that comes first, or alone, is the attribute's own (``str | None``,
    ``str | ModelRef``) and stays as it is."""
    members = field.get("anyOf")
    if not isinstance(members, list):
        return field
    own = [m for m in members if m != _NULL]
    if len(own) < 2 or own[-1] != _ANY_STRING or _ANY_STRING in own[:-1]:
        return field
    declared = own[:-1]
    checked: Any = declared[0] if len(declared) == 1 else {"anyOf": declared}
    if _NULL in members:  # null apart, so that a value is checked against one schema, in depth
        checked = {"if": _NULL, "then": True, "else": checked}
    rest = {k: v for k, v in field.items() if k != "anyOf"}
    return {**rest, "if": {"type": "string", "pattern": TEMPLATE}, "then": True, "else": checked}


def strict(schema: dict[str, Any], models: frozenset[str]) -> dict[str, Any]:
    """``schema`` (a model's JSON schema, its ``$defs`` included) with every attribute of the
    top-level model and of the derived models named in ``models`` made strict (see the
    module's docstring); other models (Dagster's own) stay as they are."""

    def model(node: dict[str, Any]) -> dict[str, Any]:
        return {
            **node,
            "properties": {k: _strict_field(v) for k, v in node.get("properties", {}).items()},
        }

    out = model(schema)
    if "$defs" in out:
        out = {
            **out,
            "$defs": {name: model(d) if name in models else d for name, d in out["$defs"].items()},
        }
    return out


def _resolvables(package: str) -> frozenset[str]:
    """The names Dagster gives the models it derives from ``package``'s Resolvable classes."""
    import dagster as dg

    found, todo = set(), [dg.Resolvable]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] == package:
                found.add(f"{sub.__name__}Model")
    return frozenset(found)


@cache
def strict_model(derived: type[BaseModel], package: str) -> type[BaseModel]:
    """The model Dagster derived for a component of ``package``, made strict for the models
    derived from that package: its JSON schema (what `dg check defs` and editors read) is
    ``strict``, and parsing a declaration checks it against that schema first, each wrong
    value an error at its own attribute, so that Dagster names the attribute's own line. dg
    checks only one declaration of each component type against the schema; parsing checks
    every one, wherever it loads (`dg check defs`, `dagster dev`, a code server)."""
    own = _resolvables(package)

    def model_json_schema(cls: type[BaseModel], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return strict(derived.model_json_schema.__func__(cls, *args, **kwargs), own)

    def as_declared(cls: type[BaseModel], data: Any) -> Any:
        if isinstance(data, dict):
            wrong = sorted(
                _validator(cls).iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]
            )
            if wrong:
                raise ValidationError.from_exception_data(
                    derived.__name__, [_error(e) for e in wrong]
                )
        return data

    def body(namespace: dict[str, Any]) -> None:
        namespace["model_json_schema"] = classmethod(model_json_schema)
        namespace["_as_declared"] = model_validator(mode="before")(classmethod(as_declared))

    return types.new_class(derived.__name__, (derived,), {}, body)  # its own name in messages


@cache
def _validator(model: type[BaseModel]) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(model.model_json_schema())


def _error(wrong: Any) -> InitErrorDetails:
    """A JSON-schema error as a pydantic one at the same place (Dagster maps it to its line)."""
    # a built-in error type: Dagster rebuilds the error from its type's name to add the line
    return InitErrorDetails(type="value_error", loc=tuple(wrong.absolute_path), input=wrong.instance,
                            ctx={"error": ValueError(wrong.message)})  # fmt: skip

"""mkdocs hook: the attribute reference, generated at build time from the component itself.

``docs/reference/attributes.md`` holds the marker ``<!-- bft:attributes -->``; this hook
replaces it with every attribute of ``bft_assets.BackAndForthTranslation``, nested ones
included, read from the JSON schema ``dg`` validates a ``defs.yaml`` against
(``BackAndForthTranslation.model()``): name, type, default, description and examples. The
page cannot drift from the code: it is the code's schema, rendered.

Two things Dagster's derived schema does not carry are read from the Python declarations
it was derived from: the description of a nested field that has a default (Dagster's
``derive_model_type`` drops it) and a default that is not a plain value (Dagster writes a
marker instead). Dagster also widens every non-string field to ``X | str`` (so that a
``{{ template }}`` can stand in for it); that added ``string`` is left out of the types
(bft's strict schema writes it as ``if`` a template ``else`` the declared type:
``bft_assets/declaration_schema.py``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any

import yaml

MARKER = "<!-- bft:attributes -->"
UNSET = "__DAGSTER_UNSET_DEFAULT__"
COMPONENT = "bft_assets.BackAndForthTranslation"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(reference()))


# -- the Python declarations behind the schema ------------------------------------------


@dataclasses.dataclass
class PyField:
    description: str
    default: Any  # UNSET when required
    declares_str: bool


def _unwrap(annotation: Any) -> list[Any]:
    """The classes an annotation can hold (through Annotated, unions, lists, dicts)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple, typing.Literal):
        if origin is typing.Literal:
            return []
        return [c for arg in typing.get_args(annotation) for c in _unwrap(arg)]
    return [annotation] if isinstance(annotation, type) else []


def _has_str(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _has_str(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_has_str(a) for a in typing.get_args(annotation))
    return annotation is str


def _resolver_description(metadata: Any) -> str:
    for item in metadata:
        text = getattr(item, "description", None)
        if isinstance(text, str) and text and type(item).__name__ == "Resolver":
            return text
    return ""


def _dataclass_fields(cls: type) -> dict[str, PyField]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        meta = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = UNSET
        out[f.name] = PyField(_resolver_description(meta), default, _has_str(hint))
    return out


def _model_fields(cls: type) -> dict[str, PyField]:
    out = {}
    for name, info in cls.model_fields.items():
        default = UNSET if info.is_required() else info.get_default(call_default_factory=True)
        description = info.description or _resolver_description(info.metadata)
        out[info.alias or name] = PyField(description, default, _has_str(info.annotation))
    return out


def python_types(component: type) -> dict[str, dict[str, PyField]]:
    """Every declared class reachable from the component, by name (and by the name of the
    model Dagster derives from it, ``<Name>Model``), with its fields."""
    found: dict[str, dict[str, PyField]] = {}
    todo = [component]
    seen: set[type] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if dataclasses.is_dataclass(cls):
            fields = _dataclass_fields(cls)
            annotations = typing.get_type_hints(cls, include_extras=True).values()
        elif hasattr(cls, "model_fields"):
            fields = _model_fields(cls)
            annotations = [info.annotation for info in cls.model_fields.values()]
        else:
            continue
        found[cls.__name__] = found[f"{cls.__name__}Model"] = fields
        for annotation in annotations:
            todo.extend(c for c in _unwrap(annotation) if c not in seen)
    return found


# -- the schema, read into rows ---------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    type: str
    required: bool
    default: str
    description: str
    examples: list[Any]


@dataclasses.dataclass
class Section:
    name: str  # the schema's type name ("" for the component itself)
    title: str
    description: str
    rows: list[Row]
    used_by: list[str] = dataclasses.field(default_factory=list)


def _ref_name(node: dict) -> str:
    return node["$ref"].rsplit("/", 1)[-1]


def _anchor(name: str) -> str:
    return "type-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _type_text(node: dict, drop_str: bool, refs: list[str]) -> str:
    """The type a node declares, as a reader writes it; ``refs`` collects the types it links."""
    if "$ref" in node:
        name = _ref_name(node)
        refs.append(name)
        return f"[{name.removesuffix('Model')}](#{_anchor(name)})"
    if "if" in node and "else" in node:
        # bft's strict form: a template (if), else the declared type
        own = {k: v for k, v in node.items() if k not in ("if", "then", "else")}
        if node["if"] == {"type": "null"}:
            return f"{_type_text(node['else'], False, refs)} \\| null"
        declared = node["else"] if "anyOf" in node["else"] else {**own, **node["else"]}
        return _type_text(declared, False, refs)
    for key in ("anyOf", "oneOf"):
        if key in node:
            members = list(node[key])
            plain = [m for m in members if m != {"type": "null"}]
            if drop_str and len(plain) > 1 and plain[-1] == {"type": "string"}:
                members.remove({"type": "string"})
            text = " \\| ".join(_type_text(m, False, refs) for m in members)
            by = node.get("discriminator", {}).get("propertyName")
            return f"{text} (by `{by}`)" if by else text
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" if v is not None else "null" for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        return f"list of {_type_text(node.get('items', {}), False, refs)}"
    if kind == "object":
        values = node.get("additionalProperties")
        if isinstance(values, dict) and values:
            return f"mapping of string to {_type_text(values, False, refs)}"
        return "mapping"
    if kind is None:
        return "any"
    bounds = [f"{sign} {node[key]}" for key, sign in
              (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
              if key in node]  # fmt: skip
    return {"integer": "integer", "number": "number", "boolean": "boolean", "string": "string",
            "null": "null"}.get(kind, kind) + (f" ({', '.join(bounds)})" if bounds else "")  # fmt: skip


def _value_text(value: Any) -> str:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", exclude_defaults=True)
        if not value:
            return "its fields' defaults"
    elif isinstance(value, list) and value and hasattr(value[0], "model_dump"):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _rows(schema: dict, py: dict[str, PyField], refs: dict[str, list[str]]) -> list[Row]:
    """One row per property; ``refs`` gets, per property, the types it links to."""
    rows = []
    required = set(schema.get("required", []))
    for name, node in schema.get("properties", {}).items():
        field = py.get(name)
        drop_str = not (field and field.declares_str)
        default = node.get("default", UNSET)
        if default == UNSET and field is not None:
            default = field.default
        description = node.get("description") or (field.description if field else "")
        if not description and "const" in node:  # a discriminator: its value picks the type
            description = f"`{name}: {node['const']}` selects this type."
        refs[name] = []
        rows.append(Row(
            name=name, type=_type_text(node, drop_str, refs[name]), required=name in required,
            default="" if name in required or default == UNSET else _value_text(default),
            description=" ".join(description.split()), examples=node.get("examples", []),
        ))  # fmt: skip
    return rows


def reference() -> list[Section]:
    """The component's attributes, then every type they use, in the order a reader meets
    them (each type once, with the attributes that use it)."""
    from bft_assets.component import BackAndForthTranslation

    schema = BackAndForthTranslation.model().model_json_schema()
    defs = schema.get("$defs", {})
    py = python_types(BackAndForthTranslation)
    sections: list[Section] = []
    users: dict[str, list[str]] = {}
    queue: list[tuple[str, str, dict, dict[str, PyField]]] = [
        ("", COMPONENT, schema, py[BackAndForthTranslation.__name__])
    ]
    while queue:
        name, title, node, fields = queue.pop(0)
        refs: dict[str, list[str]] = {}
        sections.append(Section(name, title, node.get("description", "") if name else "",
                                _rows(node, fields, refs)))  # fmt: skip
        if name and name not in py:  # Dagster's own types (the translation's): not expanded
            continue
        for attribute, linked in refs.items():
            for ref in dict.fromkeys(linked):
                users.setdefault(ref, []).append(f"{title + '.' if name else ''}{attribute}")
                if ref not in {s.name for s in sections} | {q[0] for q in queue}:
                    queue.append((ref, ref.removesuffix("Model"), defs[ref], py.get(ref, {})))
    for section in sections:
        section.used_by = users.get(section.name, [])
    return sections


# -- markdown ---------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Prose in a table cell: pipes, angle brackets and asterisks shown as written."""
    text = text.replace("\n", " ")
    if "\\|" not in text:
        text = text.replace("|", "\\|")
    parts = text.split("`")  # odd parts are code spans: shown as they are
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts)


def _examples(examples: list[Any]) -> str:
    if not examples:
        return ""
    shown = ", ".join(_value_text(e) for e in examples[:3])
    return f" Examples: {shown}."


def render(sections: list[Section]) -> str:
    """The sections as Markdown tables; a type that is not expanded (Dagster's own) is named
    without a link."""
    shown = {_anchor(s.name) for s in sections if s.name}
    text = _render(sections)
    return re.sub(r"\[([^\]]+)\]\(#(type-[a-z0-9-]+)\)",
                  lambda m: m.group(0) if m.group(2) in shown else m.group(1), text)  # fmt: skip


def _render(sections: list[Section]) -> str:
    lines: list[str] = []
    for section in sections:
        if section.name:
            lines += [f"### {section.title} {{#{_anchor(section.name)}}}", ""]
            if section.used_by:
                lines += ["Used by: " + ", ".join(f"`{u}`" for u in section.used_by) + ".", ""]
        if section.description:
            lines += [" ".join(section.description.split()), ""]
        lines += ["| attribute | type | default | description |", "|---|---|---|---|"]
        for row in section.rows:
            default = "**required**" if row.required else (row.default or "none")
            described = _cell(row.description or "(no description)") + _cell(
                _examples(row.examples)
            )
            lines.append(f"| `{row.name}` | {row.type} | {default} | {described} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # print the generated reference
    print(render(reference()))

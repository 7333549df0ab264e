"""mkdocs hook: the table of asset checks, generated at build time from the check specs an
instance declares (``<!-- bft:checks -->`` in ``docs/reference/checks.md``)."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- bft:checks -->"
EXAMPLE = {  # an instance whose definitions hold every check (it trains its own seed models)
    "key_prefix": "web",
    "storage": "/srv/bft",
    "seed": {"uri": "bft:demo"},
    "corpus": {"uri": "/srv/corpus"},
    "models": {"base": "smollm2-135m-instruct", "rewriter": "smollm2-135m-instruct"},
    "eval": {"uri": "bft:demo"},
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def render() -> str:
    import dagster as dg

    from bft_assets.component import BackAndForthTranslation
    from bft_assets.graph import build_instance_defs

    inst = BackAndForthTranslation.resolve_from_dict(EXAMPLE).instance()
    lines = ["| asset | check | blocking | what it checks |", "|---|---|---|---|"]
    for asset in build_instance_defs(inst).assets:
        if not isinstance(asset, dg.AssetsDefinition):
            continue
        for spec in asset.check_specs:
            name = spec.asset_key.path[-1]
            blocking = "yes" if spec.blocking else "no"
            what = " ".join((spec.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{name}` | `{spec.name}` | {blocking} | {what} |")
    return "\n".join(lines) + "\n"

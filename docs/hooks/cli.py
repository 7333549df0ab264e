"""mkdocs hook: the `bft` command's reference, generated at build time from its own
argparse help (``<!-- bft:cli -->`` in ``docs/reference/cli.md``), so it cannot drift."""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

MARKER = "<!-- bft:cli -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def help_text(*args: str) -> str:
    from bft_assets.cli import main

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; a page has none
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*args, "--help"])
    return out.getvalue().rstrip()


def commands() -> list[str]:
    found = re.search(r"\{([a-z,-]+)\}", help_text())
    assert found, "bft --help lists no subcommands"
    return found.group(1).split(",")


def render() -> str:
    lines = ["```text", help_text(), "```", ""]
    for name in commands():
        lines += [f"## `bft {name}`", "", "```text", help_text(name), "```", ""]
    return "\n".join(lines)

"""The demo's inputs, made on any machine without a download.

Seed: 24 instruction/response pairs written for this project (``demo/seed_pairs.jsonl``).
Corpus: real English explanatory text, the documentation strings of Python's standard
library, written out as Dolma-format gzip JSONL shards (one document per docstring).
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

DEMO_SOURCE = "python-stdlib-docstrings"
# Modules whose docstrings read like explanations rather than signatures.
_MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "fractions", "functools", "gzip", "hashlib", "heapq",
    "inspect", "itertools", "json", "logging", "pathlib", "pickle", "queue", "random", "re",
    "shutil", "sqlite3", "statistics", "string", "subprocess", "tempfile", "textwrap",
    "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
_WORDS = re.compile(r"[A-Za-z]+")
_ADDED = "2026-01-01T00:00:00.000Z"


# The recipes `bft demo` trains and evaluates (the instance declares all five).
DEMO_RECIPES = ("seed_only", "filtering", "filtering_rewriting")


def demo_seed_path() -> Path:
    return Path(str(resources.files("bft_assets") / "demo" / "seed_pairs.jsonl"))


def demo_eval_path() -> Path:
    """Eight instructions written for this project; the demo's references come from the
    untuned base model, so its question is: did fine-tuning beat the base model?"""
    return Path(str(resources.files("bft_assets") / "demo" / "eval_set.jsonl"))


def _docstrings() -> Iterator[tuple[str, str]]:
    for name in _MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            yield name, inspect.cleandoc(module.__doc__)
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(value)
            if doc:
                yield f"{name}.{attr}", doc


def demo_documents(min_words: int, max_words: int) -> list[dict[str, object]]:
    """Distinct stdlib docstrings of ``min_words``..``max_words`` words, in a stable order."""
    seen: set[str] = set()
    docs = []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for qualname, text in _docstrings():
        n_words = len(_WORDS.findall(text))
        if not min_words <= n_words <= max_words or text in seen:
            continue
        seen.add(text)
        docs.append({
            "id": f"pydoc:{qualname}", "text": text, "source": DEMO_SOURCE, "added": _ADDED,
            "created": _ADDED, "metadata": {"object": qualname, "python": version, "license": "PSF-2.0"},
        })  # fmt: skip
    return docs


def write_demo_corpus(
    folder: Path,
    shards: int = 2,
    docs_per_shard: int = 12,
    min_words: int = 40,
    max_words: int = 120,
) -> list[Path]:
    """Write ``shards`` gzip JSONL shards of ``docs_per_shard`` documents each."""
    docs = demo_documents(min_words, max_words)
    needed = shards * docs_per_shard
    if len(docs) < needed:
        raise ValueError(
            f"only {len(docs)} docstrings of {min_words}-{max_words} words, {needed} needed"
        )
    # Evenly spaced over all modules, then dealt round-robin, so every shard mixes topics.
    picked = [docs[i * len(docs) // needed] for i in range(needed)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(shards):
        path = folder / f"stdlib-docs-{i:04d}.jsonl.gz"
        lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in picked[i::shards])
        # mtime=0: the same documents give the same bytes, hence the same data version.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            out.write(lines.encode("utf-8"))
        paths.append(path)
    return paths

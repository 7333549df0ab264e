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
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg

    from bft_assets.instance import Instance

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
# The demo's documents: short explanations (~65 tokens), so each stage's longest row, which
# sets how long a CPU batch decodes, stays short.
DEMO_WORDS = (30, 55)
_ADDED = "2026-01-01T00:00:00.000Z"


DEMO_INSTANCE = "demo"


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


def run_demo(shards: int, docs_per_shard: int, instance: dg.DagsterInstance) -> Instance:
    """Materialize every asset of the demo instance for its partitions, one job run a step,
    and every recipe it declares; print each step's seconds and the total."""
    from bft_assets.corpus import discover_shards
    from bft_assets.definitions import declared_instances, defs
    from bft_assets.graph import (
        OBSERVE_CORPUS_JOB,
        OBSERVE_RECIPES_JOB,
        RECIPE_JOB,
        SEED_JOB,
        SEED_MODEL_JOB,
        SHARD_JOB,
    )

    inst = declared_instances()[DEMO_INSTANCE]
    corpus_dir = Path(inst.decl.corpus.uri)
    if not any(corpus_dir.glob("*.jsonl.gz")):
        write_demo_corpus(corpus_dir, shards, docs_per_shard, *DEMO_WORDS)
    discover_shards(inst.corpus(), instance, inst.shards.name)
    keys = instance.get_dynamic_partitions(inst.shards.name)
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    started = time.perf_counter()

    def step(label: str, job: str, partition_key: str | None = None) -> None:
        began = time.perf_counter()
        result = defs.resolve_job_def(inst.name(job)).execute_in_process(
            instance=instance, partition_key=partition_key, run_config=quiet, raise_on_error=False
        )
        if not result.success:
            sys.exit(f"demo step {label} failed: see run {result.run_id} in the UI (make ui)")
        print(
            f"  {label}: {time.perf_counter() - began:.1f} s (total {time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    print(f"demo: {len(keys)} shards under {corpus_dir}", flush=True)
    step("observe corpus_documents", OBSERVE_CORPUS_JOB)
    step("observe recipes", OBSERVE_RECIPES_JOB)
    step("seed_examples", SEED_JOB)
    for direction in ("backward", "forward"):
        step(f"seed_model {direction}", SEED_MODEL_JOB, direction)
    for key in keys:
        step(f"shard {key}", SHARD_JOB, key)
    for recipe in inst.decl.recipes:
        step(f"finetuned_checkpoint + eval_scores {recipe.name}", RECIPE_JOB, recipe.name)
    return inst


def print_recipe_table(inst: Instance) -> None:
    import polars as pl

    from bft_assets.evaluation.asset import recipe_summaries

    table = recipe_summaries(inst, inst.storage)
    if table.is_empty():
        return
    print(
        "\nrecipes (win rate against the references, percent; the demo's references are the untuned base model's):"
    )
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=200,
        float_precision=2,
        tbl_hide_dataframe_shape=True,
    ):
        print(table)

"""Ingest throughput and memory: candidate_responses on generated Dolma shards against bare
`zcat | wc -l` on the same file, at two shard sizes (memory must not grow with the shard).

    python benchmarks/ingest.py [--sizes-mb 50 200] [--model smollm2-135m-instruct]

Each size runs the filter in a fresh process (peak RSS is per process). Prints a table and
the ratio of candidate_responses' time to zcat's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_shard(path: Path, compressed_mb: int) -> int:
    """Dolma-format documents made of stdlib docstrings, shuffled into new texts, until the
    file holds ``compressed_mb`` MB; returns the number of documents."""
    from bft_assets.demo import demo_documents

    sentences = [
        s.strip() + "."
        for d in demo_documents(10, 400)
        for s in str(d["text"]).split(".")
        if len(s) > 30
    ]
    rng = random.Random(0)
    target = compressed_mb * 1024 * 1024
    count = 0
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out,
    ):
        while raw.tell() < target:
            lines = []
            for _ in range(2000):
                text = " ".join(rng.choices(sentences, k=rng.randint(3, 12)))
                lines.append(json.dumps({"id": f"doc-{count}", "text": text, "source": "bench",
                                         "added": "2026-01-01", "created": "2026-01-01", "metadata": {}}))  # fmt: skip
                count += 1
            out.write(("\n".join(lines) + "\n").encode())
    return count


def run_filter(shard: Path, model: str) -> None:
    """In this process: the candidate_responses filter loop over ``shard`` (what the asset runs)."""
    from bft_assets.budget import document_budget
    from bft_assets.candidates import CandidateFilter, FilterSettings
    from bft_assets.corpus import _BATCH_LINES, _batches, message_tokens, token_counter
    from bft_assets.specs import GenerationSpec
    from bft_resources.corpus import CorpusSource
    from bft_resources.models import ModelRef

    base = ModelRef(model=model)
    corpus = CorpusSource(uri=str(shard.parent))
    (item,) = [s for s in corpus.list_shards() if s.uri == str(shard)]
    budget = document_budget(message_tokens(base), base.context_length(), GenerationSpec())
    rules = CandidateFilter(FilterSettings(), token_counter(base), budget.tokens)
    started = time.perf_counter()
    kept = 0
    for batch in _batches(corpus.lines(item), _BATCH_LINES):
        docs, _ = rules.process(batch)
        kept += len(docs)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"seconds": seconds, "lines": rules.lines_read, "kept": kept, "peak_mb": peak_mb}
        )
    )


def run_overhead(folder: Path, model: str) -> None:
    """In this process: import the definitions (every launched run pays this), then
    materialize candidate_responses for a 4-document shard a few times; the asset's own work
    is milliseconds, so the wall time is Dagster's per-run cost plus bft's setup."""
    started = time.perf_counter()
    import dagster as dg

    from bft_assets.corpus import candidate_responses, corpus_documents, discover_shards
    from bft_assets.definitions import defs  # noqa: F401 - what a run's process loads
    from bft_assets.demo import write_demo_corpus
    from bft_resources.corpus import CorpusSource
    from bft_resources.models import ModelRef
    from bft_resources.storage import LocalStorage

    import_s = time.perf_counter() - started
    write_demo_corpus(folder / "corpus", shards=1, docs_per_shard=4)
    resources = {"storage": LocalStorage(root=str(folder / "storage")),
                 "corpus": CorpusSource(uri=str(folder / "corpus")),
                 "base_model": ModelRef(model=model)}  # fmt: skip
    runs = []
    with dg.instance_for_test() as instance:
        (shard,) = discover_shards(resources["corpus"], instance)
        for _ in range(4):
            started = time.perf_counter()
            result = dg.materialize([corpus_documents, candidate_responses], instance=instance,
                                    resources=resources, partition_key=shard,
                                    selection=[candidate_responses])  # fmt: skip
            assert result.success
            runs.append(time.perf_counter() - started)
    print(json.dumps({"import_s": import_s, "first_s": runs[0], "warm_s": sorted(runs[1:])[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--_filter", help=argparse.SUPPRESS)
    parser.add_argument("--_overhead", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._filter:
        run_filter(Path(args._filter), args.model)
        return
    if args._overhead:
        run_overhead(Path(args._overhead), args.model)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            shard = Path(tmp) / f"{size}mb" / f"bench-{size}mb.jsonl.gz"
            shard.parent.mkdir()
            docs = write_shard(shard, size)
            mb = shard.stat().st_size / 1024 / 1024
            started = time.perf_counter()
            subprocess.run(f"zcat {shard} | wc -l", shell=True, check=True, capture_output=True)
            zcat_s = time.perf_counter() - started
            out = subprocess.run([sys.executable, __file__, "--_filter", str(shard), "--model", args.model],
                                 check=True, capture_output=True, text=True)  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((mb, docs, zcat_s, result))
    print(
        f"{'shard MB':>9} {'docs':>9} {'zcat|wc s':>10} {'bft s':>8} {'docs/s':>9} {'MB/s':>7} {'ratio':>6} {'peak MB':>8}"
    )
    for mb, docs, zcat_s, r in rows:
        print(f"{mb:>9.0f} {docs:>9d} {zcat_s:>10.2f} {r['seconds']:>8.2f} {r['lines'] / r['seconds']:>9.0f} "
              f"{mb / r['seconds']:>7.1f} {r['seconds'] / zcat_s:>6.1f} {r['peak_mb']:>8.0f}")  # fmt: skip
    print("ratio: candidate_responses time / `zcat | wc -l` time on the same shard (goal: <= 3)")
    print("peak MB: the filter process's peak RSS (goal: flat as the shard grows)")

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, __file__, "--_overhead", tmp, "--model", args.model],
                             check=True, capture_output=True, text=True)  # fmt: skip
    o = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{'per partition run':<44} {'seconds':>8}")
    print(f"{'import bft_assets.definitions (new process)':<44} {o['import_s']:>8.2f}")
    print(f"{'first materialization (tokenizer load)':<44} {o['first_s']:>8.2f}")
    print(f"{'warm materialization, 4-document shard':<44} {o['warm_s']:>8.2f}")
    print(
        "goal: <= 2 s of orchestration per partition run (the warm row; a launched run adds "
        "the import and its process start)"
    )


if __name__ == "__main__":
    main()

"""`bft`: the commands around the Dagster graph (demo inputs, shard discovery, the demo run)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_INSTANCE = "demo"


def _declared(prefix: str):
    from bft_assets.definitions import declared_instances

    instances = declared_instances()
    if prefix not in instances:
        sys.exit(f"no bft instance {prefix!r} in this code location; declared: {sorted(instances)}")
    return instances[prefix]


def _instance():
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("DAGSTER_HOME is not set: point it at the folder the UI uses (make demo sets it)")
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def cmd_demo_data(args: argparse.Namespace) -> None:
    from bft_assets.demo import write_demo_corpus

    corpus = Path(_declared(args.instance).corpus.uri).expanduser()
    paths = write_demo_corpus(corpus, args.shards, args.docs_per_shard)
    print("\n".join(str(p) for p in paths))


def cmd_discover_shards(args: argparse.Namespace) -> None:
    from bft_assets.corpus import discover_shards
    from bft_resources.corpus import CorpusSource

    inst = _declared(args.instance)
    new = discover_shards(CorpusSource(uri=inst.corpus.uri), _instance(), inst.shards.name)
    print(f"added {len(new)} shard partitions: {', '.join(new) or '-'}")


def run_demo(shards: int, docs_per_shard: int) -> dict[str, float]:
    """Materialize every asset of the graph for the demo partitions; seconds per step."""
    from bft_assets.corpus import discover_shards
    from bft_assets.definitions import defs
    from bft_assets.demo import DEMO_RECIPES, write_demo_corpus
    from bft_assets.graph import OBSERVE_CORPUS_JOB, RECIPE_JOB, SEED_JOB, SEED_MODEL_JOB, SHARD_JOB
    from bft_resources.corpus import CorpusSource

    inst = _declared(DEMO_INSTANCE)
    timings: dict[str, float] = {}
    corpus_dir = Path(inst.corpus.uri).expanduser()
    if not any(corpus_dir.glob("*.jsonl.gz")):
        write_demo_corpus(corpus_dir, shards, docs_per_shard)
    instance = _instance()
    discover_shards(CorpusSource(uri=str(corpus_dir)), instance, inst.shards.name)
    keys = instance.get_dynamic_partitions(inst.shards.name)

    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

    def step(label: str, job: str, partition_key: str | None = None) -> None:
        started = time.perf_counter()
        result = defs.resolve_job_def(inst.name(job)).execute_in_process(
            instance=instance, partition_key=partition_key, run_config=quiet, raise_on_error=False
        )
        timings[label] = time.perf_counter() - started
        if not result.success:
            sys.exit(f"demo step {label} failed: see run {result.run_id} in the UI (make ui)")
        print(f"  {label}: {timings[label]:.1f} s", flush=True)

    print(f"demo: {len(keys)} shards under {corpus_dir}", flush=True)
    step("observe corpus_documents", OBSERVE_CORPUS_JOB)
    step("seed_examples", SEED_JOB)
    for direction in ("backward", "forward"):
        step(f"seed_model {direction}", SEED_MODEL_JOB, direction)
    for key in keys:
        step(f"shard {key}", SHARD_JOB, key)
    for recipe in DEMO_RECIPES:
        step(f"finetuned_checkpoint + eval_scores {recipe}", RECIPE_JOB, recipe)
    return timings


def cmd_demo(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    run_demo(args.shards, args.docs_per_shard)
    inst = _declared(DEMO_INSTANCE)
    storage = Path(inst.storage_root).expanduser()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"outputs (Parquet): {storage}")
    for path in sorted(storage.rglob("*.parquet")):
        print(f"  {path.relative_to(storage)}")
    print(
        f"runs and metadata: DAGSTER_HOME={os.environ['DAGSTER_HOME']}; open the UI with `make ui`"
    )
    print_recipe_table(inst)


def print_recipe_table(inst) -> None:
    import polars as pl

    from bft_assets.evaluation import recipe_summaries
    from bft_resources.storage import storage_for

    table = recipe_summaries(inst, storage_for(inst.storage_root, None))
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


def cmd_export(args: argparse.Namespace) -> None:
    from bft_assets.export import export_recipe
    from bft_resources.storage import storage_for

    inst = _declared(args.instance)
    # S3 settings outside a run come from boto3's chain.
    storage = storage_for(inst.storage_root, inst.s3_resource())
    written = export_recipe(inst, storage, args.recipe, Path(args.destination))
    for what, where in written.items():
        print(f"{what:>9}: {where}")


def cmd_alpaca_eval_lc(args: argparse.Namespace) -> None:
    import json

    from bft_assets.lc import annotations_lc

    print(json.dumps(annotations_lc(Path(args.annotations))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bft", description=__doc__)
    sub = parser.add_subparsers(required=True)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--instance", default=DEMO_INSTANCE, help="the instance's key_prefix")
    demo_sizes = argparse.ArgumentParser(add_help=False)
    demo_sizes.add_argument("--shards", type=int, default=2)
    demo_sizes.add_argument("--docs-per-shard", type=int, default=6)
    sub.add_parser(
        "demo-data",
        parents=[demo_sizes, which],
        help="write the demo corpus to an instance's corpus folder",
    ).set_defaults(fn=cmd_demo_data)
    sub.add_parser(
        "discover-shards",
        parents=[which],
        help="add a partition per new shard of an instance's corpus",
    ).set_defaults(fn=cmd_discover_shards)
    sub.add_parser(
        "demo", parents=[demo_sizes], help="materialize the whole graph for the demo partitions"
    ).set_defaults(fn=cmd_demo)
    export = sub.add_parser(
        "export",
        parents=[which],
        help="write a recipe's training set (datasets, JSONL, Parquet, card) and model",
    )
    export.add_argument("recipe")
    lc = sub.add_parser(
        "alpaca-eval-lc",
        help="win rate, length-controlled win rate and standard error of an AlpacaEval annotations.json",
    )
    lc.add_argument("annotations")
    lc.set_defaults(fn=cmd_alpaca_eval_lc)
    export.add_argument("destination")
    export.set_defaults(fn=cmd_export)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()

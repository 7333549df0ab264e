"""`bft`: the commands around the Dagster graph (demo inputs, shard discovery, the demo run)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bft_assets.partitions import RECIPES
from bft_assets.settings import SETTINGS, resolved


def _instance():
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("DAGSTER_HOME is not set: point it at the folder the UI uses (make demo sets it)")
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def cmd_demo_data(args: argparse.Namespace) -> None:
    from bft_assets.demo import write_demo_corpus

    paths = write_demo_corpus(Path(resolved("BFT_CORPUS_URI")), args.shards, args.docs_per_shard)
    print("\n".join(str(p) for p in paths))


def cmd_discover_shards(_: argparse.Namespace) -> None:
    from bft_assets.corpus import discover_shards
    from bft_resources.corpus import CorpusSource

    new = discover_shards(CorpusSource(uri=resolved("BFT_CORPUS_URI")), _instance())
    print(f"added {len(new)} shard partitions: {', '.join(new) or '-'}")


def run_demo(shards: int, docs_per_shard: int) -> dict[str, float]:
    """Materialize every asset of the graph for the demo partitions; seconds per step."""
    from bft_assets.corpus import discover_shards
    from bft_assets.definitions import (
        OBSERVE_CORPUS_JOB,
        RECIPE_JOB,
        SEED_JOB,
        SEED_MODEL_JOB,
        SHARD_JOB,
        defs,
    )
    from bft_assets.demo import (
        DEMO_EVAL_CONFIG,
        DEMO_RECIPES,
        DEMO_SHARD_RUN_CONFIG,
        DEMO_TRAINING_CONFIG,
        write_demo_corpus,
    )
    from bft_resources.corpus import CorpusSource

    timings: dict[str, float] = {}
    corpus_dir = Path(resolved("BFT_CORPUS_URI"))
    if not any(corpus_dir.glob("*.jsonl.gz")):
        write_demo_corpus(corpus_dir, shards, docs_per_shard)
    instance = _instance()
    discover_shards(CorpusSource(uri=str(corpus_dir)), instance)
    keys = instance.get_dynamic_partitions("corpus_shards")

    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

    def step(
        label: str, job: str, partition_key: str | None = None, ops: dict | None = None
    ) -> None:
        started = time.perf_counter()
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance,
            partition_key=partition_key,
            run_config={**quiet, "ops": ops or {}},
            raise_on_error=False,
        )
        timings[label] = time.perf_counter() - started
        if not result.success:
            sys.exit(f"demo step {label} failed: see run {result.run_id} in the UI (make ui)")
        print(f"  {label}: {timings[label]:.1f} s", flush=True)

    print(f"demo: {len(keys)} shards under {corpus_dir}", flush=True)
    step("observe corpus_documents", OBSERVE_CORPUS_JOB)
    step("seed_examples", SEED_JOB)
    for direction in ("backward", "forward"):
        step(
            f"seed_model {direction}",
            SEED_MODEL_JOB,
            direction,
            {"seed_model": {"config": DEMO_TRAINING_CONFIG}},
        )
    for key in keys:
        step(f"shard {key}", SHARD_JOB, key, DEMO_SHARD_RUN_CONFIG)
    for recipe in DEMO_RECIPES:
        step(
            f"finetuned_checkpoint + eval_scores {recipe}",
            RECIPE_JOB,
            recipe,
            {
                "finetuned_checkpoint": {"config": DEMO_TRAINING_CONFIG},
                "eval_scores": {"config": DEMO_EVAL_CONFIG},
            },
        )
    return timings


def cmd_demo(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    run_demo(args.shards, args.docs_per_shard)
    storage = resolved("BFT_STORAGE")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"outputs (Parquet): {storage}")
    for path in sorted(Path(storage).rglob("*.parquet")):
        print(f"  {path.relative_to(storage)}")
    print(
        f"runs and metadata: DAGSTER_HOME={os.environ['DAGSTER_HOME']}; open the UI with `make ui`"
    )
    print_recipe_table(storage)


def print_recipe_table(storage_root: str) -> None:
    import polars as pl

    from bft_assets.evaluation import recipe_summaries
    from bft_resources.storage import LocalStorage

    table = recipe_summaries(LocalStorage(root=storage_root))
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

    # Outside a run EnvVars are not resolved: pass values; S3 settings come from boto3's chain.
    storage = storage_for(resolved("BFT_STORAGE"), resolved("BFT_STORAGE"), None)
    written = export_recipe(storage, args.recipe, Path(args.destination))
    for what, where in written.items():
        print(f"{what:>9}: {where}")


def cmd_settings(_: argparse.Namespace) -> None:
    for name, (_default, what) in SETTINGS.items():
        print(f"{name}={resolved(name)}\n    {what}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bft", description=__doc__)
    sub = parser.add_subparsers(required=True)
    demo_sizes = argparse.ArgumentParser(add_help=False)
    demo_sizes.add_argument("--shards", type=int, default=2)
    demo_sizes.add_argument("--docs-per-shard", type=int, default=6)
    sub.add_parser(
        "demo-data", parents=[demo_sizes], help="write the demo corpus to BFT_CORPUS_URI"
    ).set_defaults(fn=cmd_demo_data)
    sub.add_parser(
        "discover-shards", help="add a partition per new shard under BFT_CORPUS_URI"
    ).set_defaults(fn=cmd_discover_shards)
    sub.add_parser(
        "demo", parents=[demo_sizes], help="materialize the whole graph for the demo partitions"
    ).set_defaults(fn=cmd_demo)
    sub.add_parser("settings", help="print the configuration in force").set_defaults(
        fn=cmd_settings
    )
    export = sub.add_parser(
        "export", help="write a recipe's training set (datasets, JSONL, Parquet, card) and model"
    )
    export.add_argument("recipe", choices=RECIPES)
    export.add_argument("destination")
    export.set_defaults(fn=cmd_export)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()

"""finetuned_checkpoint[recipe]: the base model fine-tuned on seed pairs plus one declared
recipe's generated pairs, each source tagged as docs/method.md (step 4) says; what a recipe
selects is ``bft_assets.recipes``."""

import dagster as dg
import polars as pl

from bft_assets.external import read_pairs
from bft_assets.instance import (
    FINETUNED_CHECKPOINT,
    RECIPES,
    REWRITTEN_DATASET,
    SEED_EXAMPLES,
    Instance,
)
from bft_assets.prompts import SEED_TAG, WEB_TAG
from bft_assets.recipes import (
    ALL,
    Recipe,
    assemble_training_set,
    chat_jsonl,
    generated_pairs,
    peers,
    sample,
)
from bft_assets.reporting import counts_table, sample_rows
from bft_assets.stage import Check, StageRun, stage_asset
from bft_assets.tuning import (
    fine_tune,
    loss_check,
    probe_check,
    run_parts,
    training_checks,
    training_metadata,
    training_version,
)
from bft_resources.quality import Rule, run_rules
from bft_resources.records import RecordFiles
from bft_resources.trainer import TrainingExample

_TAGGED = f"({SEED_TAG}|{WEB_TAG})$".replace(".", r"\.")
RULES = (
    Rule("finetuned_checkpoint_tagged_prompts", "ExpectColumnValuesToMatchRegex", {"column": "prompt", "regex": _TAGGED},
         blocking=True, description="Every training prompt ends with its source tag (seed or web)."),
    Rule("finetuned_checkpoint_responses_nonempty", "ExpectColumnValueLengthsToBeBetween",
         {"column": "response", "min_value": 1}, blocking=True, description="No training row without a response."),
)  # fmt: skip
LOSS, LOADS = training_checks(FINETUNED_CHECKPOINT)
SIZE = Check("finetuned_checkpoint_recipe_size", "The recipe trains on exactly its declared number of generated pairs.")  # fmt: skip
SHARED = Check("finetuned_checkpoint_shares_instructions",
               "Recipes sharing instructions (shared_instructions) trained on the same ones, as far as they are trained.")  # fmt: skip

COLUMNS = {
    "source": "seed or generated",
    "prompt": "Instruction with its source tag on the last line",
    "response": "Target response",
}


def recipe_pairs(run: StageRun, recipe: Recipe) -> tuple[pl.DataFrame, dict]:
    """The recipe's sample of generated (or external) pairs, and what reading them found."""
    if recipe.dataset is not None:
        files = RecordFiles(uri=recipe.dataset.uri, what="dataset")
        pool, drops, read = read_pairs(files.records(), recipe.dataset.format)
        found = dict(drops["reason"].value_counts().rows()) if drops.height else {}
        return sample(pool.drop("where"), recipe), {"dataset_records_read": read, "dataset_pairs": pool.height,
                                                    "dataset_drops": counts_table(found, total=read)}  # fmt: skip
    rewritten, shards, missing = run.read_shards(REWRITTEN_DATASET)
    if not shards:
        raise FileNotFoundError(
            f"no shard of {run.inst.table(REWRITTEN_DATASET)} is materialized ({missing})"
        )
    if missing:
        run.context.log.warning(f"shards without {REWRITTEN_DATASET}, left out: {missing}")
    others = [
        generated_pairs(rewritten, r)
        for r in peers(run.inst.decl.recipes, recipe)
        if r is not recipe
    ]
    return sample(generated_pairs(rewritten, recipe), recipe, others), {
        "shards": len(shards),
        "shards_missing": missing,
    }


def shared_check(run: StageRun, recipe: Recipe, ids: pl.Series) -> dg.AssetCheckResult:
    """Whether the recipes of this one's group that are trained chose the same instructions."""
    group = [r.name for r in peers(run.inst.decl.recipes, recipe) if r is not recipe]
    trained = [r for r in group if run.storage.exists(run.table, r, "train")]
    differ = [r for r in trained if set(run.storage.read(run.table, r, "train").filter(
        pl.col("source") == "generated")["id"]) != set(ids)]  # fmt: skip
    return dg.AssetCheckResult(check_name=SHARED.check_name, passed=not differ,
                               metadata={"group": recipe.shared_instructions or "none", "compared_with": trained,
                                         "different": differ})  # fmt: skip


def build_finetuned_checkpoint(inst: Instance) -> dg.AssetsDefinition:
    base = inst.model("base")
    # Each recipe's own declaration reaches it as the data version of recipes[<recipe>], so a
    # recipe edited or added stales only itself; this version is what all recipes share.
    version = f"{training_version(inst, base)};tags={SEED_TAG}|{WEB_TAG}"
    every_shard = dg.AssetDep(
        inst.key(REWRITTEN_DATASET), partition_mapping=dg.AllPartitionMapping()
    )

    @stage_asset(inst, FINETUNED_CHECKPOINT, group="training", kinds={"huggingface", "pytorch", "polars"},
                 checks=(*RULES, LOSS, LOADS, SIZE, SHARED), code_version=version, partitions=inst.recipe_partitions,
                 deps=[inst.key(SEED_EXAMPLES), every_shard, inst.key(RECIPES)], gpus=inst.decl.trainer.num_gpus)  # fmt: skip
    def finetuned_checkpoint(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The base model fine-tuned on seed pairs plus one declared recipe's generated pairs,
        with the training set saved beside it as Parquet and chat JSONL."""
        run = StageRun(inst, context)
        recipe, settings = inst.recipe(run.partition), inst.training_for(inst.recipe(run.partition))
        generated, found = recipe_pairs(run, recipe)  # a pool short of the declared size fails here
        training_set = assemble_training_set(
            run.storage.read(inst.table(SEED_EXAMPLES)), generated, recipe
        )
        set_uri = run.write(training_set, suffix="train")
        jsonl_uri = run.storage.write_text(
            f"{run.table}/{recipe.name}.train.jsonl", chat_jsonl(training_set)
        )
        examples = [
            TrainingExample(*row)
            for row in training_set.select("prompt", "response", "source").iter_rows()
        ]
        manifest = {"recipe": recipe.name, "recipe_spec": recipe.model_dump(mode="json"),
                    "generated_size": recipe.generated_size, "shards_missing": found.get("shards_missing", [])}  # fmt: skip
        result, index, local = fine_tune(run, base, examples, settings, recipe.name,
                                         run_parts(run, recipe.name, settings), manifest)  # fmt: skip
        sources = dict(training_set["source"].value_counts().rows())
        n_generated, wanted = sources.get("generated", 0), recipe.generated_size
        return run.report(
            training_set, index[-1]["uri"], COLUMNS,
            metadata={"recipe": recipe.name, "responses": recipe.responses, "min_score": recipe.min_score or 0,
                      "seed_rows": sources.get("seed", 0), "generated_rows": n_generated, **found,
                      "training_set": dg.MetadataValue.path(set_uri), "training_set_jsonl": dg.MetadataValue.path(jsonl_uri),
                      "sample": sample_rows(training_set.filter(pl.col("source") == "generated"), ["prompt", "response"]),
                      **training_metadata(result, index, base)},
            checks=[*run_rules(training_set, RULES), loss_check(LOSS.check_name, result),
                    probe_check(LOADS.check_name, inst, local[settings.max_steps]),
                    dg.AssetCheckResult(check_name=SIZE.check_name,
                                        passed=wanted == ALL or recipe.responses == "none" or n_generated == wanted,
                                        metadata={"generated_rows": n_generated, "generated_size": str(wanted)}),
                    shared_check(run, recipe, training_set.filter(pl.col("source") == "generated")["id"])],
        )  # fmt: skip

    return finetuned_checkpoint

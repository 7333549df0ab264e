"""finetuned_checkpoint[recipe]: the base model fine-tuned on seed pairs plus one declared
recipe's generated pairs, each source tagged as METHOD.md (step 4) says; and how a recipe
selects its generated pairs from rewritten_dataset."""

import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl

from bft_assets.instance import (
    FINETUNED_CHECKPOINT,
    REWRITTEN_DATASET,
    SEED_EXAMPLES,
    BftInstance,
    digest,
)
from bft_assets.prompts import SEED_TAG, WEB_TAG, llama2_inst
from bft_assets.reporting import markdown_table, sample_rows, table_metadata
from bft_assets.rewriting import OK
from bft_assets.specs import RecipeSpec
from bft_assets.tuning import loss_check, probe_check, training_metadata, training_version
from bft_resources.quality import Rule, run_rules
from bft_resources.storage import Storage
from bft_resources.trainer import MANIFEST, TrainingExample, TrainingResult

TAG_SEPARATOR = "\n"

CHECK_FT_LOSS = "finetuned_checkpoint_loss_decreased"
CHECK_FT_LOADS = "finetuned_checkpoint_checkpoint_generates"
CHECK_FT_TAGS = "finetuned_checkpoint_tagged_prompts"
CHECK_FT_RESPONSES = "finetuned_checkpoint_responses_nonempty"
CHECK_FT_SIZE = "finetuned_checkpoint_recipe_size"
_TAGGED = f"({SEED_TAG}|{WEB_TAG})$".replace(".", r"\.")
TRAINING_SET_RULES = (
    Rule(CHECK_FT_TAGS, "ExpectColumnValuesToMatchRegex", {"column": "prompt", "regex": _TAGGED}, blocking=True,
         description="Every training prompt ends with its source tag (seed or web)."),
    Rule(CHECK_FT_RESPONSES, "ExpectColumnValueLengthsToBeBetween", {"column": "response", "min_value": 1},
         blocking=True, description="No training row without a response."),
)  # fmt: skip


def tag(instruction: str, tag_text: str) -> str:
    return f"{instruction}{TAG_SEPARATOR}{tag_text}"


def stable_order(frame: pl.DataFrame, key: str, seed: int) -> pl.DataFrame:
    """A deterministic shuffle: sort by a hash of the key and the sampling seed."""

    def rank(value: str) -> str:
        return hashlib.sha256(f"{seed}:{value}".encode()).hexdigest()

    return (
        frame.with_columns(_rank=pl.col(key).map_elements(rank, return_dtype=pl.String))
        .sort("_rank")
        .drop("_rank")
    )


def has_text(column: str) -> pl.Expr:
    """Rows whose text in ``column`` is more than whitespace."""
    return pl.col(column).str.strip_chars().str.len_chars() > 0


_ANSWERS = {"web": "response", "rewrite": "rewrite", "distilled": "distilled"}


def generated_pairs(rewritten: pl.DataFrame, recipe: RecipeSpec) -> pl.DataFrame:
    """The generated (instruction, response) pairs a recipe selects: usable pairs scored at
    least its ``min_score`` (when it has one), answered by the responses it names."""
    chosen = rewritten.filter(pl.col("instruction_flag").is_null())
    if recipe.min_score is not None:
        chosen = chosen.filter(pl.col("score").fill_null(0) >= recipe.min_score)
    if recipe.responses == "none":
        chosen = chosen.head(0)
    elif recipe.responses == "rewrite":
        chosen = chosen.filter(pl.col("rewrite_status") == OK)
    elif recipe.responses == "distilled":
        chosen = chosen.filter(has_text("distilled"))
    answer = _ANSWERS.get(recipe.responses, "response")
    return chosen.select(
        pl.col("doc_id").alias("id"), "instruction", pl.col(answer).alias("response")
    )


def assemble_training_set(
    seed: pl.DataFrame, rewritten: pl.DataFrame, recipe: RecipeSpec
) -> pl.DataFrame:
    """Seed pairs plus the recipe's generated pairs (a deterministic sample of
    ``generated_size`` when set), tagged by source."""
    generated = stable_order(generated_pairs(rewritten, recipe), "id", recipe.sample_seed)
    if recipe.generated_size is not None:
        generated = generated.head(recipe.generated_size)
    seed_rows = seed.select("id", "instruction", "response").with_columns(
        source=pl.lit("seed"),
        prompt=pl.col("instruction").map_elements(
            lambda i: tag(i, SEED_TAG), return_dtype=pl.String
        ),
    )
    web_rows = generated.with_columns(
        source=pl.lit("generated"),
        prompt=pl.col("instruction").map_elements(
            lambda i: tag(i, WEB_TAG), return_dtype=pl.String
        ),
    )
    columns = ["id", "source", "instruction", "prompt", "response"]
    return pl.concat([seed_rows.select(columns), web_rows.select(columns)]).with_columns(
        recipe=pl.lit(recipe.name)
    )


def chat_jsonl(training_set: pl.DataFrame) -> str:
    """The training set as chat-format JSONL (`messages`), for TRL, axolotl and friends."""
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    "source": s}, ensure_ascii=False) + "\n"
        for p, r, s in zip(training_set["prompt"], training_set["response"], training_set["source"], strict=True)
    )  # fmt: skip


def rewritten_shards(
    inst: BftInstance, context: dg.AssetExecutionContext, storage: Storage
) -> tuple[pl.DataFrame, list[str], list[str]]:
    """All materialized shards of rewritten_dataset, with the shard names read and missing;
    FileNotFoundError when none is."""
    shards = context.instance.get_dynamic_partitions(inst.shards.name)
    frame, present, missing = read_rewritten(inst, storage, shards)
    if not present:
        raise FileNotFoundError(
            f"no shard of {inst.table(REWRITTEN_DATASET)} is materialized (shards: {shards})"
        )
    return frame, present, missing


def read_rewritten(
    inst: BftInstance, storage: Storage, shards: list[str]
) -> tuple[pl.DataFrame, list[str], list[str]]:
    """The materialized ones of ``shards`` of rewritten_dataset as one frame (empty when
    none is), with the shard names read and missing."""
    table = inst.table(REWRITTEN_DATASET)
    present = [s for s in shards if storage.exists(table, s)]
    missing = sorted(set(shards) - set(present))
    frames = [storage.read(table, s) for s in present]
    return (
        (pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()),
        present,
        missing,
    )


# ---- the step protocol: one checkpoint per declared step, never overwritten -----------------

CHECKPOINTS_SUFFIX = "checkpoints"


def checkpoint_partition(recipe: str, step: int, run_id: str) -> str:
    """Where one step's checkpoint of one run lives: a new run writes new folders, so a
    checkpoint an evaluation refers to is never replaced under it."""
    return f"{recipe}.step{step}.{run_id[:8]}"


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def read_checkpoint_index(storage: Storage, table: str, recipe: str) -> pl.DataFrame:
    """The latest run's checkpoints of a recipe: step, storage partition, manifest hash."""
    if not storage.exists(table, recipe, CHECKPOINTS_SUFFIX):
        raise FileNotFoundError(f"no checkpoint of {table}[{recipe}]: materialize it first")
    return storage.read(table, recipe, CHECKPOINTS_SUFFIX).sort("step")


def publish_checkpoints(
    storage: Storage, table: str, recipe: str, parts: dict[int, str], result: TrainingResult, run_id: str
) -> tuple[list[dict], dict[int, Path]]:  # fmt: skip
    """Publish each step's checkpoint and record the run's index (what eval_scores reads);
    returns the index and each step's verified local folder."""
    index, local = [], {}
    for step, part in sorted(parts.items()):
        uri = storage.publish_checkpoint(table, part)
        local[step] = storage.fetch_checkpoint(table, part)
        index.append({"step": step, "partition": part, "uri": uri, "run_id": run_id,
                      "manifest_sha256": manifest_sha256(local[step]),
                      "probe_loss": result.probe_losses.get(step, float("nan"))})  # fmt: skip
    storage.write(table, pl.DataFrame(index), partition=recipe, suffix=CHECKPOINTS_SUFFIX)
    return index, local


TRAINING_SET_COLUMNS = {
    "source": "seed or generated",
    "prompt": "Instruction with its source tag on the last line",
    "response": "Target response",
}


def build_finetuned_checkpoint(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(FINETUNED_CHECKPOINT)
    table = inst.table(FINETUNED_CHECKPOINT)
    recipes = {r.name: r for r in inst.recipes}
    settings = {name: inst.training_for(name) for name in recipes}

    @dg.asset(
        **inst.asset_args(FINETUNED_CHECKPOINT, {"huggingface", "pytorch", "polars"},
                          {"base_model", "trainer", "engine", "storage"}),
        partitions_def=inst.recipe_partitions,
        deps=[inst.key(SEED_EXAMPLES), dg.AssetDep(inst.key(REWRITTEN_DATASET), partition_mapping=dg.AllPartitionMapping())],
        group_name="training",
        **inst.gpu_args(inst.trainer.num_gpus),
        code_version=f"{training_version(inst, settings)};tags={SEED_TAG}|{WEB_TAG};recipes={digest(inst.recipes)}",
        check_specs=[rule.spec(key) for rule in TRAINING_SET_RULES]
        + [
            dg.AssetCheckSpec(CHECK_FT_LOSS, asset=key, blocking=True,
                              description="Training loss is finite and lower at the end than at the start."),
            dg.AssetCheckSpec(CHECK_FT_LOADS, asset=key, blocking=True,
                              description="The saved checkpoint loads back and answers a fixed prompt."),
            dg.AssetCheckSpec(CHECK_FT_SIZE, asset=key,
                              description="With generated_size set, the recipe has exactly that many generated pairs."),
        ],
    )  # fmt: skip
    def finetuned_checkpoint(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The base model fine-tuned on seed pairs plus one declared recipe's generated pairs,
        with the training set saved beside it as Parquet and chat JSONL."""
        r = inst.bound(context)
        storage, trainer, base_model = r.storage, r.trainer, r.base_model
        recipe = recipes[context.partition_key]
        rewritten, shards, missing = rewritten_shards(inst, context, storage)
        if missing:
            context.log.warning(f"shards without {REWRITTEN_DATASET}, left out: {missing}")
        training_set = assemble_training_set(
            storage.read(inst.table(SEED_EXAMPLES)), rewritten, recipe
        )
        set_uri = storage.write(table, training_set, partition=recipe.name, suffix="train")
        jsonl_uri = storage.write_text(
            f"{table}/{recipe.name}.train.jsonl", chat_jsonl(training_set)
        )
        examples = [
            TrainingExample(p, x, s)
            for p, x, s in training_set.select("prompt", "response", "source").iter_rows()
        ]
        hp = trainer.hyperparameters(**settings[recipe.name].model_dump())
        parts = {step: checkpoint_partition(recipe.name, step, context.run_id) for step in hp.steps}
        folders = {step: str(storage.checkpoint_dir(table, part)) for step, part in parts.items()}
        result = trainer.fine_tune(
            str(base_model.local_path()), examples, folders[hp.max_steps], hp,
            base_reference=base_model.reference, fallback=llama2_inst, log=context.log.info, context=context,
            extra_manifest={"recipe": recipe.name, "recipe_spec": recipe.model_dump(mode="json"),
                            "generated_size": recipe.generated_size, "shards_missing": missing,
                            "run_id": context.run_id},
            checkpoint_dirs=folders,
        )  # fmt: skip
        index, local = publish_checkpoints(
            storage, table, recipe.name, parts, result, context.run_id
        )
        uri, checkpoint = index[-1]["uri"], str(local[hp.max_steps])
        sources = dict(training_set["source"].value_counts().rows())
        generated = sources.get("generated", 0)
        wanted = recipe.generated_size
        return dg.MaterializeResult(
            metadata={
                "recipe": recipe.name,
                "responses": recipe.responses,
                "min_score": recipe.min_score if recipe.min_score is not None else 0,
                "rows": training_set.height,
                **table_metadata(training_set, TRAINING_SET_COLUMNS),
                "seed_rows": sources.get("seed", 0),
                "generated_rows": generated,
                "shards": len(shards),
                "training_set": dg.MetadataValue.path(set_uri),
                "training_set_jsonl": dg.MetadataValue.path(jsonl_uri),
                "sample": sample_rows(
                    training_set.filter(pl.col("source") == "generated"), ["prompt", "response"]
                ),
                **training_metadata(result, uri),
                "checkpoints": markdown_table(
                    [{k: r[k] for k in ("step", "partition", "probe_loss")} for r in index]
                ),
                "base_model": base_model.reference,
            },
            check_results=[
                *run_rules(training_set, TRAINING_SET_RULES),
                loss_check(CHECK_FT_LOSS, result),
                probe_check(CHECK_FT_LOADS, r.engine, checkpoint),
                dg.AssetCheckResult(
                    check_name=CHECK_FT_SIZE,
                    passed=wanted is None or recipe.responses == "none" or generated == wanted,
                    metadata={
                        "generated_rows": generated,
                        "generated_size": wanted if wanted is not None else -1,
                    },
                ),
            ],
        )

    return finetuned_checkpoint

"""finetuned_checkpoint[recipe]: the base model fine-tuned on seed pairs plus one recipe's
generated pairs, each source tagged as METHOD.md (step 4) says; and the recipes themselves:
which generated pairs each selects from rewritten_dataset (BFT Table 1)."""

import hashlib
import json

import dagster as dg
import polars as pl
from pydantic import Field

from bft_assets.partitions import CORPUS_SHARDS, RECIPES, recipes
from bft_assets.policies import gpu_step, training_gpus
from bft_assets.prompts import SEED_TAG, WEB_TAG, llama2_inst
from bft_assets.reporting import sample_rows, table_metadata
from bft_assets.rewriting import OK, REWRITTEN_DATASET, rewritten_dataset
from bft_assets.seed import SEED_EXAMPLES, seed_examples
from bft_assets.settings import resolved
from bft_assets.tuning import (
    TRAINING_VERSION,
    TrainingConfig,
    loss_check,
    probe_check,
    training_metadata,
)
from bft_resources.engine import InferenceEngine
from bft_resources.models import ModelResource
from bft_resources.quality import Rule, run_rules
from bft_resources.storage import Storage
from bft_resources.trainer import Trainer, TrainingExample

FINETUNED_CHECKPOINT = "finetuned_checkpoint"
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


def _stable_order(frame: pl.DataFrame, key: str, seed: int) -> pl.DataFrame:
    """A deterministic shuffle: sort by a hash of the key and the sampling seed."""

    def rank(value: str) -> str:
        return hashlib.sha256(f"{seed}:{value}".encode()).hexdigest()

    return (
        frame.with_columns(_rank=pl.col(key).map_elements(rank, return_dtype=pl.String))
        .sort("_rank")
        .drop("_rank")
    )


def generated_pairs(rewritten: pl.DataFrame, recipe: str) -> pl.DataFrame:
    """The generated (instruction, response) pairs a recipe selects (BFT Table 1)."""
    usable = rewritten.filter(pl.col("instruction_flag").is_null())
    passed = usable.filter(pl.col("passed"))
    rewritten_ok = pl.col("rewrite_status") == OK
    if recipe == "seed_only":
        chosen = usable.head(0).with_columns(answer=pl.col("response"))
    elif recipe == "filtering":
        chosen = passed.with_columns(answer=pl.col("response"))
    elif recipe == "rewriting":
        chosen = usable.filter(rewritten_ok).with_columns(answer=pl.col("rewrite"))
    elif recipe == "filtering_rewriting":
        chosen = passed.filter(rewritten_ok).with_columns(answer=pl.col("rewrite"))
    elif recipe == "filtering_distilling":
        chosen = passed.filter(
            pl.col("distilled").str.strip_chars().str.len_chars() > 0
        ).with_columns(answer=pl.col("distilled"))
    else:
        raise ValueError(f"unknown recipe {recipe!r}; one of {RECIPES}")
    return chosen.select(
        pl.col("doc_id").alias("id"), "instruction", pl.col("answer").alias("response")
    )


def assemble_training_set(
    seed: pl.DataFrame,
    rewritten: pl.DataFrame,
    recipe: str,
    generated_size: int | None,
    sample_seed: int,
) -> pl.DataFrame:
    """Seed pairs plus the recipe's generated pairs (a deterministic sample of
    ``generated_size`` when set), tagged by source."""
    generated = _stable_order(generated_pairs(rewritten, recipe), "id", sample_seed)
    if generated_size is not None:
        generated = generated.head(generated_size)
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
        recipe=pl.lit(recipe)
    )


def chat_jsonl(training_set: pl.DataFrame) -> str:
    """The training set as chat-format JSONL (`messages`), for TRL, axolotl and friends."""
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    "source": s}, ensure_ascii=False) + "\n"
        for p, r, s in zip(training_set["prompt"], training_set["response"], training_set["source"], strict=True)
    )  # fmt: skip


class FinetuneConfig(TrainingConfig):
    generated_size: int | None = Field(
        default=None, description="Generated pairs per recipe (paper: 3.2K..51.2K); all when unset."
    )
    sample_seed: int = Field(
        default=0, description="Seed of the deterministic sample of generated pairs."
    )


def _rewritten_shards(
    context: dg.AssetExecutionContext, storage: Storage
) -> tuple[pl.DataFrame, list[str], list[str]]:
    """All materialized shards of rewritten_dataset, with the shard names read and missing."""
    shards = context.instance.get_dynamic_partitions(CORPUS_SHARDS)
    present = [s for s in shards if storage.exists(REWRITTEN_DATASET, s)]
    missing = sorted(set(shards) - set(present))
    if not present:
        raise FileNotFoundError(
            f"no shard of {REWRITTEN_DATASET} is materialized (shards: {shards})"
        )
    frames = [storage.read(REWRITTEN_DATASET, s) for s in present]
    return pl.concat(frames, how="diagonal_relaxed"), present, missing


TRAINING_SET_COLUMNS = {
    "source": "seed or generated",
    "prompt": "Instruction with its source tag on the last line",
    "response": "Target response",
}


@dg.asset(
    partitions_def=recipes,
    deps=[seed_examples, dg.AssetDep(rewritten_dataset, partition_mapping=dg.AllPartitionMapping())],
    group_name="training",
    kinds={"transformers", "polars"},
    **gpu_step(training_gpus()),
    code_version=f"{TRAINING_VERSION};tags={SEED_TAG}|{WEB_TAG};base={resolved('BFT_BASE_MODEL')}",
    check_specs=[rule.spec(FINETUNED_CHECKPOINT) for rule in TRAINING_SET_RULES]
    + [
        dg.AssetCheckSpec(CHECK_FT_LOSS, asset=FINETUNED_CHECKPOINT, blocking=True,
                          description="Training loss is finite and lower at the end than at the start."),
        dg.AssetCheckSpec(CHECK_FT_LOADS, asset=FINETUNED_CHECKPOINT, blocking=True,
                          description="The saved checkpoint loads back and answers a fixed prompt."),
        dg.AssetCheckSpec(CHECK_FT_SIZE, asset=FINETUNED_CHECKPOINT,
                          description="With generated_size set, the recipe has exactly that many generated pairs."),
    ],
)  # fmt: skip
def finetuned_checkpoint(
    context: dg.AssetExecutionContext,
    config: FinetuneConfig,
    base_model: ModelResource,
    trainer: Trainer,
    engine: InferenceEngine,
    storage: Storage,
) -> dg.MaterializeResult:
    """The base model fine-tuned on seed pairs plus one recipe's generated pairs (seed_only,
    filtering, rewriting, filtering_rewriting, filtering_distilling), with the training set
    saved beside it as Parquet and chat JSONL."""
    recipe = context.partition_key
    rewritten, shards, missing = _rewritten_shards(context, storage)
    if missing:
        context.log.warning(f"shards without {REWRITTEN_DATASET}, left out: {missing}")
    training_set = assemble_training_set(
        storage.read(SEED_EXAMPLES), rewritten, recipe, config.generated_size, config.sample_seed
    )
    set_uri = storage.write(FINETUNED_CHECKPOINT, training_set, partition=recipe, suffix="train")
    jsonl_uri = storage.write_text(
        f"{FINETUNED_CHECKPOINT}/{recipe}.train.jsonl", chat_jsonl(training_set)
    )
    examples = [
        TrainingExample(p, r, s)
        for p, r, s in training_set.select("prompt", "response", "source").iter_rows()
    ]
    result = trainer.fine_tune(
        str(base_model.local_path()), examples, str(storage.checkpoint_dir(FINETUNED_CHECKPOINT, recipe)),
        trainer.hyperparameters(**config.values()),
        base_reference=base_model.reference, fallback=llama2_inst, log=context.log.info, context=context,
        extra_manifest={"recipe": recipe, "generated_size": config.generated_size, "shards_missing": missing},
    )  # fmt: skip
    uri = storage.publish_checkpoint(FINETUNED_CHECKPOINT, recipe)
    checkpoint = str(storage.fetch_checkpoint(FINETUNED_CHECKPOINT, recipe))
    sources = dict(training_set["source"].value_counts().rows())
    generated = sources.get("generated", 0)
    wanted = config.generated_size
    return dg.MaterializeResult(
        metadata={
            "recipe": recipe,
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
            "base_model": base_model.reference,
        },
        check_results=[
            *run_rules(training_set, TRAINING_SET_RULES),
            loss_check(CHECK_FT_LOSS, result),
            probe_check(CHECK_FT_LOADS, engine, checkpoint),
            dg.AssetCheckResult(
                check_name=CHECK_FT_SIZE,
                passed=wanted is None or recipe == "seed_only" or generated == wanted,
                metadata={
                    "generated_rows": generated,
                    "generated_size": wanted if wanted is not None else -1,
                },
            ),
        ],
    )

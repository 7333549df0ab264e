"""backtranslated_pool: the backward model writes the instruction each document answers
(docs/method.md step 1, nucleus sampling T=1.0, top_p=0.9)."""

import dagster as dg
import polars as pl

from bft_assets.checks import accounting_check, rate_ceiling_check
from bft_assets.instance import BACKTRANSLATED_POOL, CANDIDATE_RESPONSES, Instance
from bft_assets.prompts import BACKTRANSLATE
from bft_assets.replies import clean_instruction, instruction_flag
from bft_assets.reporting import counts_table, percentile_metadata
from bft_assets.stage import (
    MODEL_KINDS,
    ROW_ID,
    Check,
    Pass,
    StageRun,
    generate,
    generation_version,
    safe,
    sampling_of,
    stage_asset,
)
from bft_resources.quality import Rule

MAX_INSTRUCTION_CHARS = 2000
RULES = (
    Rule("backtranslated_pool_instruction_nonempty", "ExpectColumnValueLengthsToBeBetween",
         {"column": "instruction", "min_value": 1, "mostly": 0.9},
         description="At least 90% of generated instructions are non-empty."),
    Rule("backtranslated_pool_instruction_length_bound", "ExpectColumnValueLengthsToBeBetween",
         {"column": "instruction", "max_value": MAX_INSTRUCTION_CHARS}, severity=dg.AssetCheckSeverity.WARN,
         description=f"No generated instruction is longer than {MAX_INSTRUCTION_CHARS} characters."),
)  # fmt: skip
ACCOUNTED = Check("backtranslated_pool_rows_accounted", "One pool row per candidate response taken in.", blocking=True)  # fmt: skip
FLAGGED = Check("backtranslated_pool_flagged_rate", "Share of degenerate instructions stays under 50% (WARN).")  # fmt: skip


def backtranslation_pass(inst: Instance) -> Pass:
    settings = inst.decl.generation.backtranslation
    sampling = sampling_of(settings)

    def backtranslate(model, batch: pl.DataFrame) -> pl.DataFrame:
        clean = safe(model)
        messages = [BACKTRANSLATE.render(response=clean(x)) for x in batch["response"]]
        return generate(model, batch, messages, sampling, "raw_instruction")

    return Pass("backtranslate", backtranslate, settings.batch_rows, str(sampling), "documents")


def pool(rows: pl.DataFrame, generated: pl.DataFrame, model: str | None) -> pl.DataFrame:
    """Each document with its cleaned instruction and, when degenerate, the reason."""
    joined = rows.join(generated, on=ROW_ID, how="left").with_columns(
        instruction=pl.col("raw_instruction").map_elements(clean_instruction, return_dtype=pl.String),
        model=pl.lit(model),
    )  # fmt: skip
    return joined.with_columns(
        instruction_flag=pl.struct("instruction", "response").map_elements(
            lambda x: instruction_flag(x["instruction"], x["response"]), return_dtype=pl.String
        )
    ).drop(ROW_ID, "prompt_tokens", "completion_tokens")


COLUMNS = {
    "doc_id": "candidate_responses id",
    "response": "The web document",
    "instruction": "Instruction the backward model wrote (cleaned)",
    "raw_instruction": "The model's text as generated",
    "instruction_flag": "Why the instruction is degenerate, or null",
    "model": "Backward model that wrote it",
}


def build_backtranslated_pool(inst: Instance) -> dg.AssetsDefinition:
    backtranslation = backtranslation_pass(inst)
    version = generation_version(
        BACKTRANSLATE.version, inst.decl.generation.backtranslation, inst.stage_model_reference("backward")
    )  # fmt: skip

    @stage_asset(inst, BACKTRANSLATED_POOL, group="generation", kinds=MODEL_KINDS, checks=(*RULES, ACCOUNTED, FLAGGED),
                 code_version=version, partitions=inst.shards, gpus=inst.engine().gpus,
                 deps=[inst.key(CANDIDATE_RESPONSES), *inst.stage_deps("backward")])  # fmt: skip
    def backtranslated_pool(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Candidate responses paired with the instruction the backward model p(x|y) writes
        for each (step 1). Degenerate instructions are kept and flagged with a reason."""
        run = StageRun(inst, context)
        rows = (
            run.read(CANDIDATE_RESPONSES)
            .select(pl.col("id").alias("doc_id"), pl.col("text").alias("response"), "n_tokens")
            .with_columns(pl.col("doc_id").alias(ROW_ID))
        )
        model = inst.stage_model("backward")
        (generated,) = run.passes(inst.engine(), model, [(backtranslation, rows)])
        table = pool(rows, generated, run.served)
        flags = dict(table["instruction_flag"].drop_nulls().value_counts().rows())
        answered = table.filter(pl.col("raw_instruction").is_not_null()).height
        return run.finish(
            table, COLUMNS, rules=RULES, sample=["doc_id", "instruction", "response", "instruction_flag"],
            metadata={"flagged": sum(flags.values()), "flags": counts_table(flags, "flag"),
                      **percentile_metadata("instruction_chars", table["instruction"].str.len_chars()),
                      "prompt_version": BACKTRANSLATE.version},
            checks=[accounting_check(ACCOUNTED.check_name, rows.height, answered, {}),
                    rate_ceiling_check(FLAGGED.check_name, sum(flags.values()), table.height, 0.5)],
        )  # fmt: skip

    return backtranslated_pool

"""backtranslated_pool: the backward model writes the instruction each document answers
(METHOD.md step 1, nucleus sampling T=1.0, top_p=0.9)."""

import re
from collections import Counter

import dagster as dg
import polars as pl

from bft_assets.checks import accounting_check, rate_ceiling_check
from bft_assets.generation import (
    generate_column,
    generation_stage,
    generations_frame,
    length_metadata,
    safe,
    sampling_of,
    stage_model,
    work_for,
    work_metadata,
)
from bft_assets.instance import BACKTRANSLATED_POOL, CANDIDATE_RESPONSES, BftInstance
from bft_assets.prompts import BACKTRANSLATE, llama2_inst
from bft_assets.reporting import counts_table, sample_rows, table_metadata
from bft_resources.quality import Rule, run_rules

EMPTY = "empty"
SAME_AS_FIRST_LINE = "same_as_first_line"
LONGER_THAN_RESPONSE = "longer_than_response"
REPEATED_NGRAMS = "repeated_ngrams"
INSTRUCTION_FLAGS = (EMPTY, SAME_AS_FIRST_LINE, LONGER_THAN_RESPONSE, REPEATED_NGRAMS)

CHECK_NONEMPTY = "backtranslated_pool_instruction_nonempty"
CHECK_SHORTER = "backtranslated_pool_instruction_length_bound"
CHECK_ACCOUNTED = "backtranslated_pool_rows_accounted"
CHECK_FLAGGED = "backtranslated_pool_flagged_rate"
MAX_INSTRUCTION_CHARS = 2000
BACKTRANSLATION_RULES = (
    Rule(CHECK_NONEMPTY, "ExpectColumnValueLengthsToBeBetween",
         {"column": "instruction", "min_value": 1, "mostly": 0.9},
         description="At least 90% of generated instructions are non-empty."),
    Rule(CHECK_SHORTER, "ExpectColumnValueLengthsToBeBetween",
         {"column": "instruction", "max_value": MAX_INSTRUCTION_CHARS},
         severity=dg.AssetCheckSeverity.WARN,
         description=f"No generated instruction is longer than {MAX_INSTRUCTION_CHARS} characters."),
)  # fmt: skip

_WORDS = re.compile(r"\w+")
_QUOTES = "\"'“”‘’`"


def clean_instruction(text: str) -> str:
    """The generated text as an instruction: trimmed, without wrapping or dangling quotes."""
    text = text.strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if text[:1] in _QUOTES and text.count(text[0]) == 1:
        text = text[1:].strip()
    return text


def instruction_flag(instruction: str, response: str) -> str | None:
    """Why a generated instruction is degenerate, or None when it looks usable."""
    if not instruction.strip():
        return EMPTY
    first_line = next((line.strip() for line in response.splitlines() if line.strip()), "")
    if instruction.strip().lower() == first_line.lower():
        return SAME_AS_FIRST_LINE
    if len(instruction) > len(response):
        return LONGER_THAN_RESPONSE
    words = _WORDS.findall(instruction.lower())
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and trigrams.most_common(1)[0][1] >= 3:
        return REPEATED_NGRAMS
    return None


POOL_COLUMNS = {
    "doc_id": "candidate_responses id",
    "response": "The web document",
    "instruction": "Instruction the backward model wrote (cleaned)",
    "raw_instruction": "The model's text as generated",
    "instruction_flag": "Why the instruction is degenerate, or null",
    "model": "Backward model that wrote it",
}


def build_backtranslated_pool(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(BACKTRANSLATED_POOL)
    table = inst.table(BACKTRANSLATED_POOL)
    settings = inst.generation.backtranslation
    sampling = sampling_of(settings)
    model_reference = inst.stage_model_reference("backward")

    @dg.asset(
        **generation_stage(inst, BACKTRANSLATED_POOL, BACKTRANSLATE.version, settings, model_reference,
                           {"backward_model", "seed_model_storage"}),
        deps=[inst.key(CANDIDATE_RESPONSES), *inst.stage_deps("backward")],
        check_specs=[rule.spec(key) for rule in BACKTRANSLATION_RULES]
        + [
            dg.AssetCheckSpec(CHECK_ACCOUNTED, asset=key, blocking=True,
                              description="One pool row per candidate response taken in."),
            dg.AssetCheckSpec(CHECK_FLAGGED, asset=key,
                              description="Share of degenerate instructions stays under 50% (WARN)."),
        ],
    )  # fmt: skip
    def backtranslated_pool(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Candidate responses paired with the instruction the backward model p(x|y) writes
        for each (step 1). Degenerate instructions are kept and flagged with a reason."""
        r = inst.bound(context)
        storage = r.storage
        shard = inst.partition(context)
        candidates = storage.read(inst.table(CANDIDATE_RESPONSES), shard).select(
            "id", "text", "n_tokens"
        )
        rows = candidates.rename({"id": "doc_id", "text": "response"}).with_columns(
            row_id=pl.col("doc_id")
        )
        model_ref = stage_model(inst, "backward", r.backward_model, r.seed_model_storage or storage)
        work = work_for(storage, context, table, f"{sampling};{model_ref.reference}")
        with r.engine.load(model_ref, fallback=llama2_inst) as model:
            clean = safe(model)

            def backtranslate(batch: pl.DataFrame) -> pl.DataFrame:
                messages = [BACKTRANSLATE.render(response=clean(x)) for x in batch["response"]]
                return generations_frame(
                    batch, generate_column(model, messages, sampling), "raw_instruction"
                )

            generated, stats = work.run(
                rows, backtranslate, settings.batch_rows, context.log.info, "documents"
            )
            served = model.reference  # an endpoint's: the model the server says answered

        pool = rows.join(generated, on="row_id", how="left").with_columns(
            instruction=pl.col("raw_instruction").map_elements(
                clean_instruction, return_dtype=pl.String
            ),
            model=pl.lit(served),
        )
        pool = pool.with_columns(
            instruction_flag=pl.struct("instruction", "response").map_elements(
                lambda x: instruction_flag(x["instruction"], x["response"]), return_dtype=pl.String
            )
        )
        uri = storage.write(table, pool, partition=shard)
        work.clear()
        flags = dict(pool["instruction_flag"].drop_nulls().value_counts().rows())
        flagged = sum(flags.values())
        return dg.MaterializeResult(
            metadata={
                "rows": pool.height,
                **table_metadata(pool, POOL_COLUMNS),
                **work_metadata(stats, rows.height, pool.height),
                "flagged": flagged,
                **{f"flagged_{f}": flags.get(f, 0) for f in INSTRUCTION_FLAGS},
                "flags": counts_table(flags, "flag"),
                **length_metadata(pool, "instruction"),
                "sample": sample_rows(
                    pool, ["doc_id", "instruction", "response", "instruction_flag"]
                ),
                "path": dg.MetadataValue.path(uri),
                "model": served,
                "prompt_version": BACKTRANSLATE.version,
            },
            check_results=[
                *run_rules(pool, BACKTRANSLATION_RULES),
                accounting_check(
                    CHECK_ACCOUNTED,
                    rows.height,
                    pool.filter(pl.col("raw_instruction").is_not_null()).height,
                    {},
                ),
                rate_ceiling_check(CHECK_FLAGGED, flagged, pool.height, 0.5),
            ],
        )

    return backtranslated_pool

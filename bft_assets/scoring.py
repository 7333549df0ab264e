"""scored_pool: the forward model rates each (instruction, response) pair 1 to 5 (docs/method.md
step 2, Humpback's self-curation prompt). Scores are stored once; a recipe keeps the pairs
at its own threshold (the paper: 5) where it selects.

Two modes: ``generate`` (the paper) samples the reasoning and reads ``Score: N`` from the
reply; ``logprobs`` (beyond the paper) opens the reply with ``Score:`` and reads the next
token's distribution over 1..5, which always yields a score and costs one forward pass.
"""

import dagster as dg
import polars as pl

from bft_assets.checks import accounting_check, rate_floor_check
from bft_assets.instance import BACKTRANSLATED_POOL, SCORED_POOL, Instance
from bft_assets.prompts import SCORE, drop_self_ratings
from bft_assets.replies import NO_SCORE, parse_score, score_from_logprobs
from bft_assets.reporting import markdown_table
from bft_assets.stage import (
    MODEL_KINDS,
    ROW_ID,
    Check,
    Pass,
    StageRun,
    generation_version,
    generations_frame,
    safe,
    sampling_of,
    stage_asset,
)
from bft_resources.engine import Chat, LoadedModel
from bft_resources.quality import Rule

SCORES = ("1", "2", "3", "4", "5")
SCORE_PREFIX = "Score:"
NOT_SCORED_FLAGGED = "instruction_flagged"

RULES = (
    Rule("scored_pool_scores_in_range", "ExpectColumnValuesToBeBetween", {"column": "score", "min_value": 1, "max_value": 5},
         blocking=True, description="Every valid score is an integer from 1 to 5."),
)  # fmt: skip
VALID = Check("scored_pool_valid_rate", "Valid-score rate above min_valid_rate (WARN).")
VALID_FLOOR = Check("scored_pool_valid_rate_hard_floor", "Valid-score rate above hard_min_valid_rate (ERROR).", blocking=True)  # fmt: skip
ACCOUNTED = Check("scored_pool_rows_accounted", "Every pool row is scored or carries the reason it is not.", blocking=True)  # fmt: skip


def score_chats(model: LoadedModel, batch: pl.DataFrame, prefix: str) -> list[Chat]:
    """The scoring prompt for each pair, without lines in which a text grades itself."""
    clean = safe(model)
    pairs = zip(batch["instruction"], batch["response"], strict=True)
    return [Chat(SCORE.render(generated_instruction=clean(drop_self_ratings(i)),
                              output=clean(drop_self_ratings(r))), assistant_prefix=prefix)
            for i, r in pairs]  # fmt: skip


def scoring_pass(inst: Instance) -> Pass:
    settings = inst.decl.generation.scoring
    sampling = sampling_of(settings)

    def by_generation(model: LoadedModel, batch: pl.DataFrame) -> pl.DataFrame:
        out = generations_frame(
            batch, model.generate(score_chats(model, batch, ""), sampling), "score_reply"
        )
        parsed = [parse_score(text) for text in out["score_reply"]]
        return out.with_columns(score=pl.Series([p[0] for p in parsed], dtype=pl.Int64),
                                score_reason=pl.Series([p[1] for p in parsed], dtype=pl.String),
                                expected_score=pl.lit(None, dtype=pl.Float64))  # fmt: skip

    def by_logprobs(model: LoadedModel, batch: pl.DataFrame) -> pl.DataFrame:
        chats = score_chats(model, batch, SCORE_PREFIX + " ")
        logprobs = model.option_logprobs(chats, SCORES)
        scored = [score_from_logprobs(lp) for lp in logprobs]
        return pl.DataFrame({
            ROW_ID: batch[ROW_ID],
            "score_reply": [str({k: round(v, 4) for k, v in lp.items()}) for lp in logprobs],
            "score": pl.Series([s[0] for s in scored], dtype=pl.Int64),
            "score_reason": pl.Series([None if s[0] else NO_SCORE for s in scored], dtype=pl.String),
            "expected_score": pl.Series([s[1] for s in scored], dtype=pl.Float64),
            # One forward pass over each prompt: its tokens are the work done.
            "prompt_tokens": pl.Series(model.prompt_tokens(chats), dtype=pl.Int64),
            "completion_tokens": pl.Series([0] * batch.height, dtype=pl.Int64),
        })  # fmt: skip

    call = by_generation if settings.mode == "generate" else by_logprobs
    return Pass("score", call, settings.batch_rows, f"{settings.mode};{sampling}", "pairs")


def histogram(scores: pl.Series) -> dict[str, int]:
    counts = dict(scores.drop_nulls().value_counts().rows())
    return {s: int(counts.get(int(s), 0)) for s in SCORES}


COLUMNS = {
    "score": "1-5 quality score, null when no valid score was read",
    "score_reason": "Why there is no score (no_score, out_of_range, instruction_flagged)",
    "score_reply": "The judge reply (generate) or P(1..5) (logprobs)",
    "expected_score": "Mean score under P(1..5) (logprobs mode)",
}


def build_scored_pool(inst: Instance) -> dg.AssetsDefinition:
    settings = inst.decl.generation.scoring
    scoring = scoring_pass(inst)
    version = generation_version(SCORE.version, settings, inst.stage_model_reference("forward"))

    @stage_asset(inst, SCORED_POOL, group="generation", kinds=MODEL_KINDS, checks=(*RULES, VALID, VALID_FLOOR, ACCOUNTED),
                 code_version=version, partitions=inst.shards, gpus=inst.engine().gpus,
                 deps=[inst.key(BACKTRANSLATED_POOL), *inst.stage_deps("forward")])  # fmt: skip
    def scored_pool(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Backtranslated pairs with the forward model's 1-5 quality score (step 2). A reply
        with no valid score keeps its row, a null score and the reason. Scores are stored
        once: each recipe applies its own threshold where it selects."""
        run = StageRun(inst, context)
        pool = run.read(BACKTRANSLATED_POOL).with_columns(pl.col("doc_id").alias(ROW_ID))
        to_score = pool.filter(pl.col("instruction_flag").is_null())
        (scored,) = run.passes(inst.engine(), inst.stage_model("forward"), [(scoring, to_score)])
        table = pool.join(scored.drop("prompt_tokens", "completion_tokens"), on=ROW_ID, how="left").with_columns(
            score_reason=pl.when(pl.col("instruction_flag").is_not_null()).then(pl.lit(NOT_SCORED_FLAGGED))
            .otherwise(pl.col("score_reason")),
            score_mode=pl.lit(settings.mode), scorer=pl.lit(run.served),
        ).drop(ROW_ID)  # fmt: skip
        valid = int(table["score"].is_not_null().sum())
        explained = table.filter(
            pl.col("score").is_null() & pl.col("score_reason").is_not_null()
        ).height
        counts = histogram(table["score"])
        return run.finish(
            table, COLUMNS, rules=RULES, sample=["instruction", "response", "score", "score_reason"],
            metadata={"scored": to_score.height, "valid_scores": valid,
                      "valid_rate": valid / to_score.height if to_score.height else 0.0,
                      "score_histogram": markdown_table([{"score": s, "pairs": n} for s, n in counts.items()]),
                      **{f"score_{s}": n for s, n in counts.items()},
                      "mean_expected_score": float(table["expected_score"].mean() or 0.0),
                      "mode": settings.mode, "prompt_version": SCORE.version},
            checks=[rate_floor_check(VALID.check_name, valid, to_score.height, settings.min_valid_rate),
                    rate_floor_check(VALID_FLOOR.check_name, valid, to_score.height, settings.hard_min_valid_rate,
                                     severity=dg.AssetCheckSeverity.ERROR),
                    accounting_check(ACCOUNTED.check_name, pool.height, valid, {"no_valid_score": explained})],
        )  # fmt: skip

    return scored_pool

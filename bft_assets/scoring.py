"""scored_pool: the forward model rates each (instruction, response) pair 1 to 5 (METHOD.md
step 2, Humpback's self-curation prompt). Scores are stored once; a recipe keeps the pairs
at its own threshold (the paper: 5) where it selects.

Two modes: ``generate`` (the paper) samples the reasoning and reads ``Score: N`` from the
reply; ``logprobs`` (beyond the paper) opens the reply with ``Score:`` and reads the next
token's distribution over 1..5, which always yields a score and costs one forward pass.
"""

import math
import re
from collections.abc import Mapping

import dagster as dg
import polars as pl

from bft_assets.checks import accounting_check, rate_floor_check
from bft_assets.generation import (
    generation_stage,
    generations_frame,
    safe,
    sampling_of,
    stage_model,
    work_for,
    work_metadata,
)
from bft_assets.instance import BACKTRANSLATED_POOL, SCORED_POOL, BftInstance
from bft_assets.prompts import SCORE, drop_self_ratings, llama2_inst
from bft_assets.reporting import markdown_table, sample_rows, table_metadata
from bft_resources.engine import Chat
from bft_resources.quality import Rule, run_rules

SCORES = ("1", "2", "3", "4", "5")
SCORE_PREFIX = "Score:"

NO_SCORE = "no_score"
OUT_OF_RANGE = "out_of_range"
NOT_SCORED_FLAGGED = "instruction_flagged"

CHECK_RANGE = "scored_pool_scores_in_range"
CHECK_VALID_WARN = "scored_pool_valid_rate"
CHECK_VALID_ERROR = "scored_pool_valid_rate_hard_floor"
CHECK_ACCOUNTED = "scored_pool_rows_accounted"
SCORE_RULES = (
    Rule(CHECK_RANGE, "ExpectColumnValuesToBeBetween", {"column": "score", "min_value": 1, "max_value": 5},
         blocking=True, description="Every valid score is an integer from 1 to 5."),
)  # fmt: skip

# "Score: 5", "score:5/5", "**Score:** 4", "Score - 4", "Rating: 3": the label, then the value.
_LABELLED = re.compile(
    r"(?:score|rating)\s*\**\s*[:=\-]?\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?", re.I
)
# A bare number closing the last line: "... so I give it 4." or "4/5".
_TRAILING = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*[.!)\]*]*\s*$")


def parse_score(reply: str) -> tuple[int | None, str | None]:
    """(score, None) from a reply's last labelled score, else a number ending its last line;
    (None, reason) when there is no valid score."""
    labelled = _LABELLED.findall(reply)
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    trailing = _TRAILING.search(lines[-1]) if lines else None
    raw = labelled[-1] if labelled else (trailing.group(1) if trailing else None)
    if raw is None:
        return None, NO_SCORE
    value = float(raw)
    if value != int(value) or not 1 <= value <= 5:
        return None, OUT_OF_RANGE
    return int(value), None


def score_from_logprobs(logprobs: Mapping[str, float]) -> tuple[int | None, float | None]:
    """(argmax score, expected score) from the next-token log-probabilities of '1'..'5'."""
    probs = {int(k): math.exp(v) for k, v in logprobs.items() if v != -math.inf}
    total = sum(probs.values())
    if not total:
        return None, None
    expected = sum(k * p for k, p in probs.items()) / total
    return max(probs, key=probs.__getitem__), expected


def _score_chats(batch: pl.DataFrame, clean, prefix: str) -> list[Chat]:
    return [
        Chat(
            SCORE.render(
                generated_instruction=clean(drop_self_ratings(i)),
                output=clean(drop_self_ratings(r)),
            ),
            assistant_prefix=prefix,
        )
        for i, r in zip(batch["instruction"], batch["response"], strict=True)
    ]


def _histogram(scores: pl.Series) -> dict[str, int]:
    counts = dict(scores.drop_nulls().value_counts().rows())
    return {s: int(counts.get(int(s), 0)) for s in SCORES}


SCORED_COLUMNS = {
    "score": "1-5 quality score, null when no valid score was read",
    "score_reason": "Why there is no score (no_score, out_of_range, instruction_flagged)",
    "score_reply": "The judge reply (generate) or P(1..5) (logprobs)",
    "expected_score": "Mean score under P(1..5) (logprobs mode)",
}


def build_scored_pool(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(SCORED_POOL)
    table = inst.table(SCORED_POOL)
    settings = inst.generation.scoring
    sampling = sampling_of(settings)
    model_reference = inst.stage_model_reference("forward")

    @dg.asset(
        **generation_stage(inst, SCORED_POOL, SCORE.version, settings, model_reference,
                           {"forward_model", "seed_model_storage"}),
        deps=[inst.key(BACKTRANSLATED_POOL), *inst.stage_deps("forward")],
        check_specs=[rule.spec(key) for rule in SCORE_RULES]
        + [
            dg.AssetCheckSpec(CHECK_VALID_WARN, asset=key, description="Valid-score rate above min_valid_rate (WARN)."),
            dg.AssetCheckSpec(CHECK_VALID_ERROR, asset=key, blocking=True,
                              description="Valid-score rate above hard_min_valid_rate (ERROR)."),
            dg.AssetCheckSpec(CHECK_ACCOUNTED, asset=key, blocking=True,
                              description="Every pool row is scored or carries the reason it is not."),
        ],
    )  # fmt: skip
    def scored_pool(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Backtranslated pairs with the forward model's 1-5 quality score (step 2). A reply
        with no valid score keeps its row, a null score and the reason. Scores are stored
        once: each recipe applies its own threshold where it selects."""
        r = inst.bound(context)
        storage = r.storage
        shard = inst.partition(context)
        pool = storage.read(inst.table(BACKTRANSLATED_POOL), shard).with_columns(
            row_id=pl.col("doc_id")
        )
        to_score = pool.filter(pl.col("instruction_flag").is_null())
        model_ref = stage_model(inst, "forward", r.forward_model, r.seed_model_storage or storage)
        work = work_for(
            storage, context, table, f"{settings.mode};{sampling};{model_ref.reference}"
        )
        with r.engine.load(model_ref, fallback=llama2_inst) as model:
            clean = safe(model)

            def score_by_generation(batch: pl.DataFrame) -> pl.DataFrame:
                replies = model.generate(_score_chats(batch, clean, ""), sampling)
                out = generations_frame(batch, replies, "score_reply")
                parsed = [parse_score(text) for text in out["score_reply"]]
                return out.with_columns(
                    score=pl.Series([p[0] for p in parsed], dtype=pl.Int64),
                    score_reason=pl.Series([p[1] for p in parsed], dtype=pl.String),
                    expected_score=pl.lit(None, dtype=pl.Float64),
                )

            def score_by_logprobs(batch: pl.DataFrame) -> pl.DataFrame:
                logprobs = model.option_logprobs(
                    _score_chats(batch, clean, SCORE_PREFIX + " "), SCORES
                )
                scored = [score_from_logprobs(lp) for lp in logprobs]
                return pl.DataFrame({
                    "row_id": batch["row_id"],
                    "score_reply": [str({k: round(v, 4) for k, v in lp.items()}) for lp in logprobs],
                    "score": pl.Series([s[0] for s in scored], dtype=pl.Int64),
                    "score_reason": pl.Series([None if s[0] else NO_SCORE for s in scored], dtype=pl.String),
                    "expected_score": pl.Series([s[1] for s in scored], dtype=pl.Float64),
                    "prompt_tokens": pl.Series([0] * batch.height, dtype=pl.Int64),
                    "completion_tokens": pl.Series([0] * batch.height, dtype=pl.Int64),
                })  # fmt: skip

            process = score_by_generation if settings.mode == "generate" else score_by_logprobs
            scored, stats = work.run(
                to_score, process, settings.batch_rows, context.log.info, "pairs"
            )
            served = model.reference  # an endpoint's: the model the server says answered

        table_out = (
            pool.join(scored.drop("prompt_tokens", "completion_tokens"), on="row_id", how="left")
            .with_columns(
                score_reason=pl.when(pl.col("instruction_flag").is_not_null())
                .then(pl.lit(NOT_SCORED_FLAGGED))
                .otherwise(pl.col("score_reason")),
                score_mode=pl.lit(settings.mode),
                scorer=pl.lit(served),
            )
            .drop("row_id")
        )
        uri = storage.write(table, table_out, partition=shard)
        work.clear()
        valid = int(table_out["score"].is_not_null().sum())
        unaccounted = table_out.filter(
            pl.col("score").is_null() & pl.col("score_reason").is_null()
        ).height
        histogram = _histogram(table_out["score"])
        return dg.MaterializeResult(
            metadata={
                "rows": table_out.height,
                **table_metadata(table_out, SCORED_COLUMNS),
                **work_metadata(stats, pool.height, table_out.height),
                "scored": to_score.height,
                "valid_scores": valid,
                "valid_rate": valid / to_score.height if to_score.height else 0.0,
                **{f"score_{s}": n for s, n in histogram.items()},
                "score_histogram": markdown_table([{"score": s, "pairs": n} for s, n in histogram.items()]),
                "mean_expected_score": float(table_out["expected_score"].mean() or 0.0),
                "mode": settings.mode,
                "sample": sample_rows(table_out, ["instruction", "response", "score", "score_reason"]),
                "path": dg.MetadataValue.path(uri),
                "model": served,
                "prompt_version": SCORE.version,
            },
            check_results=[
                *run_rules(table_out, SCORE_RULES),
                rate_floor_check(CHECK_VALID_WARN, valid, to_score.height, settings.min_valid_rate),
                rate_floor_check(CHECK_VALID_ERROR, valid, to_score.height, settings.hard_min_valid_rate,
                                 severity=dg.AssetCheckSeverity.ERROR),
                accounting_check(CHECK_ACCOUNTED, pool.height, valid,
                                 {"no_valid_score": table_out.height - valid - unaccounted}),
            ],
        )  # fmt: skip

    return scored_pool

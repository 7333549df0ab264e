"""rewritten_dataset: the aligned chat model rewrites responses (docs/method.md step 3) and, for
the filtering_distilling baseline, answers the instructions directly.

One table per shard holds every scored pair with its score, its rewrite and its distilled
answer where some declared recipe needs them, so each recipe is a selection from it later.
"""

from dataclasses import replace

import dagster as dg
import polars as pl

from bft_assets.budget import rewrite_caps
from bft_assets.checks import accounting_check, rate_floor_check
from bft_assets.instance import REWRITTEN_DATASET, SCORED_POOL, Instance
from bft_assets.prompts import DISTILL, REWRITE
from bft_assets.recipes import REWRITE_OK, needed
from bft_assets.replies import NOT_SELECTED, PROMPT_MARKERS, RES_CLOSE, RES_OPEN, extract_rewrite
from bft_assets.reporting import counts_table, percentile_metadata, sample_rows
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
from bft_resources.engine import Chat
from bft_resources.quality import Rule

RULES = (
    Rule("rewritten_dataset_no_prompt_markers", "ExpectColumnValuesToNotMatchRegex", {"column": "rewrite", "regex": PROMPT_MARKERS},
         blocking=True, description="No rewrite still contains prompt or chat-template markers."),
)  # fmt: skip
EXTRACTION = Check("rewritten_dataset_extraction_rate", "Share of selected pairs whose rewrite was extracted (WARN).")  # fmt: skip
ACCOUNTED = Check("rewritten_dataset_rows_accounted", "Every scored pair is in the table, with a rewrite status.", blocking=True)  # fmt: skip


def rewrite_passes(inst: Instance) -> tuple[Pass, Pass]:
    settings = inst.decl.generation.rewriting
    prefix = RES_OPEN if settings.force_format else ""
    rewrite_sampling = sampling_of(settings, stop=(RES_CLOSE,) if settings.force_format else ())
    distill_sampling = sampling_of(settings)

    def rewrite(model, batch: pl.DataFrame) -> pl.DataFrame:
        clean = safe(model)
        messages = [REWRITE.render(response=clean(x), instruction=clean(i))
                    for x, i in zip(batch["response"], batch["instruction"], strict=True)]  # fmt: skip
        prompts = (
            model.prompt_tokens([Chat(m, assistant_prefix=prefix) for m in messages])
            if model.context_window
            else []
        )
        caps = rewrite_caps(prompts or [0] * batch.height, batch["n_tokens"].to_list(), model.context_window,
                            inst.decl.generation)  # fmt: skip
        replies = generate(model, batch, messages, [replace(rewrite_sampling, max_tokens=c) for c in caps],
                           "rewrite_reply", prefix)  # fmt: skip
        return replies.with_columns(rewrite_cap=pl.Series(caps, dtype=pl.Int64))

    def distill(model, batch: pl.DataFrame) -> pl.DataFrame:
        messages = [DISTILL.render(instruction=safe(model)(i)) for i in batch["instruction"]]
        return generate(model, batch, messages, distill_sampling, "distilled")

    work = f"{settings.force_format};{rewrite_sampling}"
    return (Pass("rewrite", rewrite, settings.batch_rows, work, "rewrites"),
            Pass("distill", distill, settings.batch_rows, work, "answers"))  # fmt: skip


def joined(pairs: pl.DataFrame, rewrites: pl.DataFrame, distilled: pl.DataFrame, forced: bool, model: str | None) -> pl.DataFrame:  # fmt: skip
    """Every scored pair with its extracted rewrite, its status and its distilled answer."""
    extracted = [extract_rewrite(r, forced, f) for r, f in rewrites.select("rewrite_reply", "rewrite_reply_finish").iter_rows()]  # fmt: skip
    rewrites = rewrites.with_columns(
        rewrite=pl.Series([e[0] for e in extracted], dtype=pl.String),
        rewrite_status=pl.Series([e[1] for e in extracted], dtype=pl.String),
    ).rename({"prompt_tokens": "rewrite_prompt_tokens", "completion_tokens": "rewrite_tokens"})
    answers = distilled.select(ROW_ID, pl.col("distilled").str.strip_chars())
    return (pairs.join(rewrites, on=ROW_ID, how="left").join(answers, on=ROW_ID, how="left")
            .with_columns(rewrite_status=pl.col("rewrite_status").fill_null(NOT_SELECTED), rewriter=pl.lit(model))
            .drop(ROW_ID))  # fmt: skip


COLUMNS = {
    "rewrite": "Text between [RES] and [/RES] of the rewriter's reply",
    "rewrite_status": "ok, not_selected, no_markers, unclosed_marker, truncated, empty, contains_markers",
    "rewrite_reply": "The rewriter's whole reply",
    "distilled": "The chat model's direct answer to the instruction (filtering_distilling)",
}


def build_rewritten_dataset(inst: Instance) -> dg.AssetsDefinition:
    settings = inst.decl.generation.rewriting
    rewrite, distill = rewrite_passes(inst)
    # What the recipes ask for decides which pairs are rewritten and distilled.
    needs = {"rewrite": inst.needs("rewrite"), "distill": inst.needs("distilled")}
    version = generation_version(f"{REWRITE.version},{DISTILL.version}", settings, needs,
                                 inst.model("rewriter").reference)  # fmt: skip

    @stage_asset(inst, REWRITTEN_DATASET, group="generation", kinds=MODEL_KINDS, checks=(*RULES, EXTRACTION, ACCOUNTED),
                 code_version=version, partitions=inst.shards, gpus=inst.engine().gpus, deps=[inst.key(SCORED_POOL)])  # fmt: skip
    def rewritten_dataset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Every scored pair with the aligned chat model's rewrite of its response (step 3)
        and its direct (distilled) answer, each made for the pairs some declared recipe
        trains on: the table each recipe selects its training data from."""
        run = StageRun(inst, context)
        pairs = run.read(SCORED_POOL).with_columns(pl.col("doc_id").alias(ROW_ID))
        selected, to_distill = (
            pairs.filter(needed(needs["rewrite"])),
            pairs.filter(needed(needs["distill"])),
        )
        rewrites, distilled = run.passes(
            inst.engine(), inst.model("rewriter"), [(rewrite, selected), (distill, to_distill)]
        )
        table = joined(pairs, rewrites, distilled, settings.force_format, run.served)
        statuses = dict(table["rewrite_status"].value_counts().rows())
        ok = statuses.get(REWRITE_OK, 0)
        extraction = (rate_floor_check(EXTRACTION.check_name, ok, selected.height, settings.min_extraction_rate)
                      if needs["rewrite"].wanted else
                      dg.AssetCheckResult(check_name=EXTRACTION.check_name, passed=selected.height == 0,
                                          metadata={"selected": selected.height, "reason": "no recipe trains on rewrites"}))  # fmt: skip
        return run.finish(
            table, COLUMNS, rules=RULES,
            metadata={"selected_for_rewrite": selected.height, "selected_for_distilling": to_distill.height,
                      "rewrites_extracted": ok, "extraction_rate": ok / selected.height if selected.height else 0.0,
                      "rewrite_statuses": counts_table(statuses, "status"), "distilled": distilled.height,
                      **percentile_metadata("rewrite_chars", table["rewrite"].drop_nulls().str.len_chars()),
                      "sample": sample_rows(table.filter(pl.col("rewrite_status") != NOT_SELECTED),
                                            ["instruction", "response", "score", "rewrite"], width=120),
                      "prompt_version": REWRITE.version},
            checks=[extraction, accounting_check(ACCOUNTED.check_name, pairs.height, table.height, {})],
        )  # fmt: skip

    return rewritten_dataset

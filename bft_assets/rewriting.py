"""rewritten_dataset: the aligned chat model rewrites responses (METHOD.md step 3) and, for
the filtering_distilling baseline, answers the instructions directly.

One table per shard holds every scored pair with its score, its rewrite and its distilled
answer where some declared recipe needs them, so each recipe is a selection from it later.
"""

import re
from dataclasses import replace

import dagster as dg
import polars as pl

from bft_assets.budget import rewrite_tokens
from bft_assets.checks import accounting_check, rate_floor_check
from bft_assets.generation import (
    generate_column,
    generation_stage,
    generations_frame,
    length_metadata,
    safe,
    sampling_of,
    work_for,
    work_metadata,
)
from bft_assets.instance import REWRITTEN_DATASET, SCORED_POOL, BftInstance
from bft_assets.prompts import DISTILL, REWRITE, llama2_inst
from bft_assets.reporting import counts_table, sample_rows, table_metadata
from bft_resources.quality import Rule, run_rules

RES_OPEN, RES_CLOSE = "[RES]", "[/RES]"

OK = "ok"
NOT_SELECTED = "not_selected"
NO_MARKERS = "no_markers"
UNCLOSED = "unclosed_marker"
TRUNCATED = "truncated"
EMPTY = "empty"
CONTAINS_MARKERS = "contains_markers"
REWRITE_STATUSES = (OK, NOT_SELECTED, NO_MARKERS, UNCLOSED, TRUNCATED, EMPTY, CONTAINS_MARKERS)

_BETWEEN = re.compile(re.escape(RES_OPEN) + r"(.*?)" + re.escape(RES_CLOSE), re.S)
PROMPT_MARKERS = r"\[/?(?:INST|RES)\]|<<SYS>>|<\|im_(?:start|end)\|>"
_LEFTOVER = re.compile(PROMPT_MARKERS, re.I)

CHECK_EXTRACTION = "rewritten_dataset_extraction_rate"
CHECK_NO_MARKERS = "rewritten_dataset_no_prompt_markers"
CHECK_ACCOUNTED = "rewritten_dataset_rows_accounted"
REWRITE_RULES = (
    Rule(CHECK_NO_MARKERS, "ExpectColumnValuesToNotMatchRegex", {"column": "rewrite", "regex": PROMPT_MARKERS},
         blocking=True, description="No rewrite still contains prompt or chat-template markers."),
)  # fmt: skip


def extract_rewrite(
    reply: str, forced: bool, finish_reason: str = "stop"
) -> tuple[str | None, str]:
    """(rewrite, status): the text between [RES] and [/RES]. With ``forced`` the reply was
    opened with [RES] and stopped at [/RES], so the reply itself is the rewrite."""
    if forced:
        if finish_reason == "length":
            return None, TRUNCATED
        text = reply
    else:
        found = _BETWEEN.search(reply)
        if found is None:
            return None, UNCLOSED if RES_OPEN in reply else NO_MARKERS
        text = found.group(1)
    text = text.strip()
    if not text:
        return None, EMPTY
    if _LEFTOVER.search(text):
        return None, CONTAINS_MARKERS
    return text, OK


def selection(wanted: tuple[bool, int | None]) -> pl.Expr:
    """The usable pairs a stage must process for the declared recipes: none, those scored at
    least the lowest threshold a recipe accepts, or all (a recipe without a threshold)."""
    needed, floor = wanted
    usable = pl.col("instruction_flag").is_null()
    if not needed:
        return pl.lit(False)
    return usable if floor is None else usable & (pl.col("score").fill_null(0) >= floor)


REWRITTEN_COLUMNS = {
    "rewrite": "Text between [RES] and [/RES] of the rewriter's reply",
    "rewrite_status": "ok, not_selected, no_markers, unclosed_marker, truncated, empty, contains_markers",
    "rewrite_reply": "The rewriter's whole reply",
    "distilled": "The chat model's direct answer to the instruction (filtering_distilling)",
}


def build_rewritten_dataset(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(REWRITTEN_DATASET)
    table = inst.table(REWRITTEN_DATASET)
    settings = inst.generation.rewriting
    prefix = RES_OPEN if settings.force_format else ""
    rewrite_sampling = sampling_of(settings, stop=(RES_CLOSE,) if settings.force_format else ())
    distill_sampling = sampling_of(settings)
    # What the recipes ask for decides which pairs are rewritten and distilled.
    needs = {"rewrite": inst.rewrite_floor, "distill": inst.distill_floor}

    @dg.asset(
        **generation_stage(inst, REWRITTEN_DATASET, f"{REWRITE.version},{DISTILL.version}",
                           [settings, needs], inst.models.rewriter.reference, {"rewriter_model"}),
        deps=[inst.key(SCORED_POOL)],
        check_specs=[rule.spec(key) for rule in REWRITE_RULES]
        + [
            dg.AssetCheckSpec(CHECK_EXTRACTION, asset=key,
                              description="Share of selected pairs whose rewrite was extracted (WARN)."),
            dg.AssetCheckSpec(CHECK_ACCOUNTED, asset=key, blocking=True,
                              description="Every scored pair is in the table, with a rewrite status."),
        ],
    )  # fmt: skip
    def rewritten_dataset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Every scored pair with the aligned chat model's rewrite of its response (step 3)
        and its direct (distilled) answer, each made for the pairs some declared recipe
        trains on: the table each recipe selects its training data from."""
        r = inst.bound(context)
        storage, rewriter_model = r.storage, r.rewriter_model
        shard = inst.partition(context)
        pairs = storage.read(inst.table(SCORED_POOL), shard).with_columns(row_id=pl.col("doc_id"))
        selected = pairs.filter(selection(needs["rewrite"]))
        to_distill = pairs.filter(selection(needs["distill"]))
        work_settings = f"{settings.force_format};{rewrite_sampling};{rewriter_model.reference}"
        rewrite_work = work_for(storage, context, f"{table}.rewrite", work_settings)
        distill_work = work_for(storage, context, f"{table}.distill", work_settings)
        with r.engine.load(rewriter_model, fallback=llama2_inst) as model:
            clean = safe(model)

            def rewrite(batch: pl.DataFrame) -> pl.DataFrame:
                # The cap follows the longest draft of the batch (budget.rewrite_tokens): the
                # candidate budget left it room in the context window.
                longest = int(batch["n_tokens"].max() or 0)
                cap = rewrite_tokens(longest, inst.generation)
                messages = [
                    REWRITE.render(response=clean(x), instruction=clean(i))
                    for x, i in zip(batch["response"], batch["instruction"], strict=True)
                ]
                return generations_frame(
                    batch,
                    generate_column(
                        model, messages, replace(rewrite_sampling, max_tokens=cap), prefix
                    ),
                    "rewrite_reply",
                )

            def distill(batch: pl.DataFrame) -> pl.DataFrame:
                messages = [DISTILL.render(instruction=clean(i)) for i in batch["instruction"]]
                return generations_frame(
                    batch, generate_column(model, messages, distill_sampling), "distilled"
                )

            rewrites, rewrite_stats = rewrite_work.run(
                selected, rewrite, settings.batch_rows, context.log.info, "rewrites"
            )
            distilled, distill_stats = distill_work.run(
                to_distill, distill, settings.batch_rows, context.log.info, "answers"
            )
            served = model.reference  # an endpoint's: the model the server says answered

        extracted = [
            extract_rewrite(reply, settings.force_format, finish)
            for reply, finish in zip(
                rewrites["rewrite_reply"], rewrites["rewrite_reply_finish"], strict=True
            )
        ]
        rewrites = rewrites.with_columns(
            rewrite=pl.Series([e[0] for e in extracted], dtype=pl.String),
            rewrite_status=pl.Series([e[1] for e in extracted], dtype=pl.String),
        ).rename({"prompt_tokens": "rewrite_prompt_tokens", "completion_tokens": "rewrite_tokens"})
        distilled = distilled.with_columns(pl.col("distilled").str.strip_chars()).select(
            "row_id", "distilled"
        )
        table_out = (
            pairs.join(rewrites, on="row_id", how="left")
            .join(distilled, on="row_id", how="left")
            .with_columns(
                rewrite_status=pl.col("rewrite_status").fill_null(NOT_SELECTED),
                rewriter=pl.lit(served),
            )
            .drop("row_id")
        )
        uri = storage.write(table, table_out, partition=shard)
        rewrite_work.clear()
        distill_work.clear()
        statuses = dict(table_out["rewrite_status"].value_counts().rows())
        ok = statuses.get(OK, 0)
        work = work_metadata(rewrite_stats, pairs.height, table_out.height)
        distill_meta = work_metadata(distill_stats, to_distill.height, distilled.height)
        return dg.MaterializeResult(
            metadata={
                "rows": table_out.height,
                **table_metadata(table_out, REWRITTEN_COLUMNS),
                **work,
                "selected_for_rewrite": selected.height,
                "selected_for_distilling": to_distill.height,
                "rewrites_extracted": ok,
                "extraction_rate": ok / selected.height if selected.height else 0.0,
                **{f"rewrite_{s}": statuses.get(s, 0) for s in REWRITE_STATUSES},
                "rewrite_statuses": counts_table(statuses, "status"),
                "distilled": distilled.height,
                "distill_tokens_out": distill_meta["tokens_out"],
                "distill_wall_seconds": distill_meta["wall_seconds"],
                **length_metadata(table_out.filter(pl.col("rewrite").is_not_null()), "rewrite"),
                "sample": sample_rows(
                    table_out.filter(pl.col("rewrite_status") != NOT_SELECTED),
                    ["instruction", "response", "score", "rewrite"],
                    width=120,
                ),
                "path": dg.MetadataValue.path(uri),
                "model": served,
                "prompt_version": REWRITE.version,
            },
            check_results=[
                *run_rules(table_out, REWRITE_RULES),
                rate_floor_check(CHECK_EXTRACTION, ok, selected.height, settings.min_extraction_rate)
                if needs["rewrite"][0]
                else dg.AssetCheckResult(check_name=CHECK_EXTRACTION, passed=selected.height == 0,
                                         metadata={"selected": selected.height, "reason": "no recipe trains on rewrites"}),
                accounting_check(CHECK_ACCOUNTED, pairs.height, table_out.height, {}),
            ],
        )  # fmt: skip

    return rewritten_dataset

"""What eval_scores reports: the judged pairs' counts, the tables a person reads (per step,
per source, the recipes side by side), AlpacaEval's model-outputs file, and the checks."""

import json
import math

import dagster as dg
import polars as pl

from bft_assets.checks import rate_floor_check
from bft_assets.evaluation.annotators import ALPACA_EVAL_2, Annotator
from bft_assets.evaluation.lc import lc_scores
from bft_assets.evaluation.win_rates import recipe_table, variant_scores
from bft_assets.instance import EVAL_SCORES, Instance
from bft_assets.reporting import markdown_table
from bft_assets.specs import EvalSpec
from bft_assets.stage import Check
from bft_resources.quality import Rule
from bft_resources.storage import Storage

RULES = (
    Rule("eval_scores_preferences_in_range", "ExpectColumnValuesToBeBetween",
         {"column": "preference", "min_value": 0.0, "max_value": 1.0}, blocking=True,
         description="Every preference is a probability in [0, 1]."),
)  # fmt: skip
ALL_JUDGED = Check("eval_scores_all_judged", "Every instruction was judged in both orders; the shortfall is an ERROR.", blocking=True)  # fmt: skip
AGREEMENT = Check("eval_scores_order_agreement", "The judge agrees with itself across the two orders often enough (WARN).")  # fmt: skip
WIN_RATES = Check(
    "eval_scores_win_rates_valid", "Win rates lie in [0, 100] and carry a finite standard error."
)


def alpaca_eval_outputs(results: pl.DataFrame, generator: str) -> str:
    """Answers in AlpacaEval's model_outputs format (the instruction as the eval set has it,
    without the suffix the model was asked with), for ``alpaca_eval evaluate --model_outputs``."""
    rows = [{"instruction": i, "output": o, "generator": generator, "dataset": d}
            for i, o, d in results.select("instruction", "answer", "dataset").iter_rows()]  # fmt: skip
    return json.dumps(rows, ensure_ascii=False, indent=1)


def recipe_summaries(inst: Instance, storage: Storage) -> pl.DataFrame:
    """The instance's evaluated recipes side by side (``win_rates.recipe_table``)."""
    table = inst.table(EVAL_SCORES)
    rows = [
        storage.read(table, r.name, "summary")
        for r in inst.decl.recipes
        if storage.exists(table, r.name, "summary")
    ]
    return recipe_table(
        pl.concat(rows, how="diagonal_relaxed") if rows else pl.DataFrame(), inst.decl.eval.tags
    )


def judged_metadata(results: pl.DataFrame, reused: int) -> dict:
    unjudged = results.filter(
        pl.col("preference").is_null() | (pl.col("read_by") == "unread")
    ).height
    read_by = [{"read_by": k, "pairs": n} for k, n in results["read_by"].value_counts().rows()]
    return {"instructions": results["instruction"].n_unique(), "judged_pairs": results.height - unjudged,
            "judgements_reused": reused, "read_by": markdown_table(read_by)}  # fmt: skip


def by_source(results: pl.DataFrame, suffix: str) -> dg.MetadataValue:
    rows = (results.filter(pl.col("variant") == suffix).group_by("dataset")
            .agg(pl.len().alias("instructions"), (pl.col("preference").mean() * 100).round(1).alias("win_rate"))
            .sort("dataset"))  # fmt: skip
    return markdown_table(rows.to_dicts())


def step_table(by_step: dict[int, dict], tags: list[str]) -> dg.MetadataValue:
    return markdown_table([
        {"step": step, "suffix": suffix, "win_rate": round(scores[f"{suffix}_win_rate"], 2),
         "standard_error": round(scores[f"{suffix}_standard_error"], 2),
         "lc_win_rate": round(scores[f"{suffix}_lc_win_rate"], 2)}
        for step, scores in sorted(by_step.items()) for suffix in tags
    ])  # fmt: skip


def rounded(table: pl.DataFrame) -> list[dict]:
    return [
        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
        for r in table.to_dicts()
    ]


def eval_checks(results: pl.DataFrame, scores: dict, spec: EvalSpec) -> list[dg.AssetCheckResult]:
    unjudged = results.filter(
        pl.col("preference").is_null() | (pl.col("read_by") == "unread")
    ).height
    agree = results["agree"].drop_nulls()
    rates_ok = all(0.0 <= scores[f"{v}_win_rate"] <= 100.0 and math.isfinite(scores[f"{v}_standard_error"])
                   for v in spec.tags)  # fmt: skip
    return [
        dg.AssetCheckResult(check_name=ALL_JUDGED.check_name, passed=unjudged == 0 and results.height > 0,
                            metadata={"unjudged": unjudged, "pairs": results.height}),
        rate_floor_check(AGREEMENT.check_name, int(agree.sum()), agree.len(), spec.min_agreement),
        dg.AssetCheckResult(check_name=WIN_RATES.check_name, passed=rates_ok,
                            metadata={f"{v}_win_rate": scores[f"{v}_win_rate"] for v in spec.tags}),
    ]  # fmt: skip


def scores_by_step(results: pl.DataFrame, tags: list[str], reader: Annotator) -> dict[int, dict]:
    """Each step's scores per suffix; the length-controlled win rate on AlpacaEval 2 only
    (its GLM and instruction difficulties are fitted to GPT-4 Turbo's verdicts)."""
    lc = lc_scores if reader.name == ALPACA_EVAL_2 else None
    return {step: {k: v for suffix in tags for k, v in variant_scores(results.filter(pl.col("step") == step), suffix,
                                                                      lc).items()}
            for step in results["step"].unique().sort()}  # fmt: skip

"""What a recipe is, in one place: its declaration, which generated pairs it selects, what it
asks of the upstream stages, how its training set is assembled, and its own version.

A recipe trains the base model on the seed pairs plus a selection of generated pairs
(docs/method.md, step 4): ``filtering`` (the web responses of pairs scored 5), ``rewriting``
(every pair's rewrite: "no intermediate filtering"), ``filtering_rewriting`` (rewrites of
pairs scored 5), ``filtering_distilling`` (the chat model's own answers to those
instructions) and ``seed_only``. Each source is tagged as the paper tags it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

import dagster as dg
import polars as pl
from pydantic import Field, field_validator

from bft_assets.prompts import SEED_TAG, WEB_TAG
from bft_assets.specs import machinery
from bft_resources.trainer import TrainingSettings

Responses = Literal["none", "web", "rewrite", "distilled"]
PAPER_THRESHOLD = 5
TAG_SEPARATOR = "\n"
# rewritten_dataset's rewrite_status of a rewrite that was extracted whole.
REWRITE_OK = "ok"
# Which column of rewritten_dataset answers the instruction, per kind of response.
ANSWER_COLUMN = {"web": "response", "rewrite": "rewrite", "distilled": "distilled"}


class Recipe(dg.Resolvable, dg.Model):
    """What one recipe trains on: seed pairs plus a selection of generated pairs."""

    name: str = Field(description="The recipe's partition key.", examples=["filtering_rewriting"])
    responses: Responses = Field(
        description="none (seed only), web (the document), rewrite (the rewriter's), distilled (the chat model's own answer)."
    )
    min_score: int | None = Field(
        default=None,
        description="Keep generated pairs scored at least this (paper: 5); null: no filter.",
    )
    generated_size: int | None = Field(
        default=None,
        ge=1,
        description="Generated pairs trained on (a deterministic sample); null: all.",
    )
    sample_seed: int = Field(default=0, description="Seed of that sample.")
    training: Annotated[TrainingSettings | None, machinery(TrainingSettings | None)] = Field(
        default=None, description="Overrides the instance's training settings for this recipe."
    )

    @field_validator("min_score")
    @classmethod
    def _a_score(cls, score: int | None) -> int | None:
        if score is not None and not 1 <= score <= 5:
            raise ValueError(f"min_score {score}: scores run from 1 to 5")
        return score

    @field_validator("name")
    @classmethod
    def _a_partition_name(cls, name: str) -> str:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"recipe name {name!r}: letters, digits and _ only")
        return name


# The recipes of BFT Tables 1 and 2 (filtering_distilling: Table 2), plus the seed-only baseline.
PAPER_RECIPES = (
    Recipe(name="seed_only", responses="none"),
    Recipe(name="filtering", responses="web", min_score=PAPER_THRESHOLD),
    Recipe(name="rewriting", responses="rewrite"),
    Recipe(name="filtering_rewriting", responses="rewrite", min_score=PAPER_THRESHOLD),
    Recipe(name="filtering_distilling", responses="distilled", min_score=PAPER_THRESHOLD),
)


def check_recipes(recipes: Sequence[Recipe]) -> Sequence[Recipe]:
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique: {names}")
    if not recipes:
        raise ValueError("declare at least one recipe")
    return recipes


def recipe_version(recipe: Recipe, training: TrainingSettings) -> str:
    """A digest of everything one recipe decides alone: its declaration and the training
    settings it trains with (its own, or the instance's). It is the data version of the
    recipe's declaration, so that editing one recipe marks only its own checkpoint stale."""
    body = {"recipe": recipe.model_dump(mode="json", exclude={"training"}),
            "training": training.model_dump(mode="json"), "tags": [SEED_TAG, WEB_TAG]}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# ---- what the declared recipes ask of the upstream stages ------------------------------------


def floor(recipes: Iterable[Recipe], responses: str) -> tuple[bool, int | None]:
    """(whether any recipe trains on these responses, the lowest score one accepts; None
    when one of them takes every pair)."""
    wanted = [r for r in recipes if r.responses == responses]
    if not wanted:
        return False, None
    if any(r.min_score is None for r in wanted):
        return True, None
    return True, min(r.min_score for r in wanted)  # type: ignore[type-var]


def usable(min_score: int | None) -> pl.Expr:
    """Generated pairs a selection may take: instruction not flagged degenerate, scored at
    least ``min_score`` when there is one."""
    keep = pl.col("instruction_flag").is_null()
    return keep if min_score is None else keep & (pl.col("score").fill_null(0) >= min_score)


def needed(wanted: tuple[bool, int | None]) -> pl.Expr:
    """The pairs an upstream stage must process for the declared recipes (see ``floor``)."""
    any_recipe, lowest = wanted
    return usable(lowest) if any_recipe else pl.lit(False)


# ---- the training set -------------------------------------------------------------------------


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


def generated_pairs(rewritten: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
    """The generated (instruction, response) pairs a recipe selects: usable pairs scored at
    least its ``min_score`` (when it has one), answered by the responses it names."""
    chosen = rewritten.filter(usable(recipe.min_score))
    if recipe.responses == "none":
        chosen = chosen.head(0)
    elif recipe.responses == "rewrite":
        chosen = chosen.filter(pl.col("rewrite_status") == REWRITE_OK)
    elif recipe.responses == "distilled":
        chosen = chosen.filter(has_text("distilled"))
    answer = ANSWER_COLUMN.get(recipe.responses, "response")
    return chosen.select(
        pl.col("doc_id").alias("id"), "instruction", pl.col(answer).alias("response")
    )


def assemble_training_set(
    seed: pl.DataFrame, rewritten: pl.DataFrame, recipe: Recipe
) -> pl.DataFrame:
    """Seed pairs plus the recipe's generated pairs (a deterministic sample of
    ``generated_size`` when set), tagged by source."""
    generated = stable_order(generated_pairs(rewritten, recipe), "id", recipe.sample_seed)
    if recipe.generated_size is not None:
        generated = generated.head(recipe.generated_size)
    tagged = [
        rows.select("id", "instruction", "response").with_columns(
            source=pl.lit(source), prompt=pl.col("instruction") + TAG_SEPARATOR + tag_text
        )
        for rows, source, tag_text in ((seed, "seed", SEED_TAG), (generated, "generated", WEB_TAG))
    ]
    columns = ["id", "source", "instruction", "prompt", "response"]
    return pl.concat([t.select(columns) for t in tagged]).with_columns(recipe=pl.lit(recipe.name))


def chat_jsonl(training_set: pl.DataFrame) -> str:
    """The training set as chat-format JSONL (`messages`), for TRL, axolotl and friends."""
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    "source": s}, ensure_ascii=False) + "\n"
        for p, r, s in zip(training_set["prompt"], training_set["response"], training_set["source"], strict=True)
    )  # fmt: skip

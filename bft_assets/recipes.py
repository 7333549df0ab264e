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
from dataclasses import dataclass
from typing import Annotated, Literal

import dagster as dg
import polars as pl
from pydantic import Field, field_validator, model_validator

from bft_assets.prompts import SEED_TAG, WEB_TAG
from bft_assets.specs import ProjectPath, machinery
from bft_resources.keys import MAX_NAME_CHARS
from bft_resources.trainer import TrainingSettings

DatasetFormat = Literal["auto", "alpaca", "sharegpt", "openorca", "pairs"]
Responses = Literal["none", "web", "rewrite", "distilled", "external"]
PAPER_THRESHOLD = 5
# BFT compares every row of a table "given the same data quantity": 12.8K generated pairs per
# recipe at 7B (Table 1), 51.2K at 70B, 25.6K for the rewriting-vs-distilling pair (Table 2).
PAPER_7B_SIZE = 12_800
ALL = "all"
TAG_SEPARATOR = "\n"
# rewritten_dataset's rewrite_status of a rewrite that was extracted whole.
REWRITE_OK = "ok"
# Which column of rewritten_dataset answers the instruction, per kind of response.
ANSWER_COLUMN = {"web": "response", "rewrite": "rewrite", "distilled": "distilled"}
# The paper's Table 2 pair: the same 25.6K instructions, rewritten or answered directly.
PAPER_PAIR = "rewrite_vs_distill"


class ShortPool(ValueError):
    """A recipe's pool holds fewer pairs than it declares to train on."""


class ExternalDataset(dg.Resolvable, dg.Model):
    """(instruction, response) pairs from outside the pipeline (the paper's baselines:
    OpenOrca, ShareGPT, Alpaca-GPT4, Self-instruct, ClueWeb+filtering)."""

    uri: ProjectPath = Field(description="A JSON/JSONL(.gz)/Parquet file or a folder of them.")
    format: DatasetFormat = Field(
        default="auto",
        description="alpaca (instruction, input, output), sharegpt (the first turn of conversations), openorca "
        "(question, response), pairs (instruction, response), or auto (by each record's fields).",
    )


class Recipe(dg.Resolvable, dg.Model):
    """What one recipe trains on: seed pairs plus a selection of generated pairs."""

    name: str = Field(
        description=f"The recipe's partition key (ASCII letters, digits, _; at most {MAX_NAME_CHARS}).",
        examples=["filtering_rewriting"], pattern=rf"^[A-Za-z0-9_]{{1,{MAX_NAME_CHARS}}}$",
    )  # fmt: skip
    responses: Responses = Field(
        description="none (seed only), web (the document), rewrite (the rewriter's), distilled (the chat model's "
        "own answer), external (pairs from `dataset`)."
    )
    min_score: int | None = Field(
        default=None, description="Keep generated pairs scored at least this (paper: 5); null: no filter.",
        json_schema_extra={"minimum": 1, "maximum": 5},  # what `dg check defs` reads; _a_score is Python's
    )  # fmt: skip
    generated_size: int | Literal["all"] = Field(
        default=PAPER_7B_SIZE,
        description="Generated pairs trained on, a deterministic sample (paper, 7B: 12,800 for every recipe; 70B: "
        "51,200); a pool short of it fails before training. `all`: every selected pair (not the paper's).",
        examples=[12800, 51200, "all"],
        json_schema_extra={"minimum": 1},  # what `dg check defs` reads; _a_size is Python's
    )
    sample_seed: int = Field(default=0, description="Seed of that sample.")
    shared_instructions: str | None = Field(
        default=None,
        description="Recipes naming the same group train on one sample of instructions: the pairs every recipe "
        "of the group can use (BFT Table 2: filtering+rewriting and filtering+distilling on the same "
        "instructions). They must declare the same min_score, generated_size and sample_seed.",
        examples=[PAPER_PAIR],
    )
    exclude_flagged: bool = Field(
        default=False,
        description="Leave out pairs whose instruction was flagged degenerate (a bft option; the paper filters "
        "nothing but the score: 'No intermediate filtering is done' for rewriting).",
    )
    dataset: ExternalDataset | None = Field(
        default=None, description="With responses: external, the pairs."
    )
    training: Annotated[TrainingSettings | None, machinery(TrainingSettings | None)] = Field(
        default=None, description="Overrides the instance's training settings for this recipe."
    )

    @field_validator("min_score")
    @classmethod
    def _a_score(cls, score: int | None) -> int | None:
        if score is not None and not 1 <= score <= 5:
            raise ValueError(f"min_score {score}: scores run from 1 to 5")
        return score

    @field_validator("generated_size")
    @classmethod
    def _a_size(cls, size: int | str) -> int | str:
        if isinstance(size, int) and size < 1:
            raise ValueError(f"generated_size {size}: at least 1 pair, or `all`")
        return size

    @model_validator(mode="after")
    def _external_has_a_dataset(self) -> Recipe:
        if (self.responses == "external") != (self.dataset is not None):
            raise ValueError(
                f"recipe {self.name}: a dataset goes with responses: external, and only with it"
            )
        return self


# The recipes of BFT Tables 1 and 2 (filtering_distilling: Table 2), plus the seed-only
# baseline, each at the paper's 7B size.
PAPER_RECIPES = (
    Recipe(name="seed_only", responses="none"),
    Recipe(name="filtering", responses="web", min_score=PAPER_THRESHOLD),
    Recipe(name="rewriting", responses="rewrite"),
    Recipe(name="filtering_rewriting", responses="rewrite", min_score=PAPER_THRESHOLD, shared_instructions=PAPER_PAIR),
    Recipe(name="filtering_distilling", responses="distilled", min_score=PAPER_THRESHOLD,
           shared_instructions=PAPER_PAIR),
)  # fmt: skip


def check_recipes(recipes: Sequence[Recipe]) -> Sequence[Recipe]:
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique: {names}")
    if not recipes:
        raise ValueError("declare at least one recipe")
    for group, members in groups(recipes).items():
        if len({(r.min_score, r.generated_size, r.sample_seed) for r in members}) > 1:
            raise ValueError(f"recipes sharing instructions {group!r} ({', '.join(r.name for r in members)}) must "
                             "declare the same min_score, generated_size and sample_seed")  # fmt: skip
    return recipes


def groups(recipes: Iterable[Recipe]) -> dict[str, list[Recipe]]:
    found: dict[str, list[Recipe]] = {}
    for recipe in recipes:
        if recipe.shared_instructions:
            found.setdefault(recipe.shared_instructions, []).append(recipe)
    return found


def peers(recipes: Iterable[Recipe], recipe: Recipe) -> list[Recipe]:
    """The recipes that share ``recipe``'s instructions (itself included; alone when none)."""
    return groups(recipes).get(recipe.shared_instructions or "", []) or [recipe]


def recipe_version(recipe: Recipe, training: TrainingSettings, group: Sequence[Recipe] = ()) -> str:
    """A digest of everything one recipe decides alone: its declaration, the training
    settings it trains with (its own, or the instance's), and the recipes it shares its
    instructions with. It is the data version of the recipe's declaration, so that editing
    one recipe marks only its own checkpoint stale (and its group's)."""
    body = {"recipe": recipe.model_dump(mode="json", exclude={"training"}),
            "training": training.model_dump(mode="json"), "tags": [SEED_TAG, WEB_TAG],
            "group": sorted(r.model_dump_json(exclude={"training"}) for r in group if r is not recipe)}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# ---- what the declared recipes ask of the upstream stages ------------------------------------


@dataclass(frozen=True)
class Need:
    """What the declared recipes ask of a stage: whether any trains on its responses, the
    lowest score one accepts (None: every pair), and whether one takes flagged pairs."""

    wanted: bool
    min_score: int | None = None
    flagged: bool = False


def floor(recipes: Iterable[Recipe], responses: str) -> Need:
    wanted = [r for r in recipes if r.responses == responses]
    if not wanted:
        return Need(False)
    lowest = None if any(r.min_score is None for r in wanted) else min(r.min_score for r in wanted)  # type: ignore[type-var]
    return Need(True, lowest, any(not r.exclude_flagged for r in wanted))


def usable(min_score: int | None, exclude_flagged: bool = True) -> pl.Expr:
    """Generated pairs a selection may take: scored at least ``min_score`` when there is
    one (a flagged instruction has no score), and not flagged when ``exclude_flagged``."""
    keep = pl.col("instruction_flag").is_null() if exclude_flagged else pl.lit(True)
    return keep if min_score is None else keep & (pl.col("score").fill_null(0) >= min_score)


def needed(need: Need) -> pl.Expr:
    """The pairs an upstream stage must process for the declared recipes (see ``floor``)."""
    return usable(need.min_score, not need.flagged) if need.wanted else pl.lit(False)


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
    """The generated (instruction, response) pairs a recipe selects: pairs scored at least
    its ``min_score`` (when it has one), answered by the responses it names."""
    chosen = rewritten.filter(usable(recipe.min_score, recipe.exclude_flagged))
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


def sample(pool: pl.DataFrame, recipe: Recipe, shared: Sequence[pl.DataFrame] = ()) -> pl.DataFrame:
    """A recipe's sample of its pool: ``generated_size`` pairs in a deterministic order (all
    with ``all``), drawn from the instructions every pool of its group holds. ShortPool when
    the pool holds fewer pairs than declared."""
    for other in shared:
        pool = pool.filter(pl.col("id").is_in(other["id"].implode()))
    ordered = stable_order(pool, "id", recipe.sample_seed)
    if recipe.responses == "none" or recipe.generated_size == ALL:
        return ordered
    if ordered.height < recipe.generated_size:
        shared_note = " shared with its group" if shared else ""
        raise ShortPool(
            f"recipe {recipe.name}: its pool{shared_note} holds {ordered.height} pairs but it declares generated_size "
            f"{recipe.generated_size}; add shards, lower generated_size, or declare generated_size: all"
        )  # fmt: skip
    return ordered.head(recipe.generated_size)


def assemble_training_set(
    seed: pl.DataFrame, generated: pl.DataFrame, recipe: Recipe
) -> pl.DataFrame:
    """Seed pairs plus the recipe's sampled generated (or external) pairs, tagged by source
    as the paper tags them."""
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

"""What a recipe's data looks like (BFT section 5): unique trigrams at equal sample size,
mean lengths in the base model's tokens (Table 6), and MAUVE against the distilled and the
web answers to the same instructions, beside the paper's distilled-vs-distilled control."""

from __future__ import annotations

import re
from collections.abc import Sequence

import polars as pl

from bft_assets.recipes import has_text, stable_order
from bft_resources.embeddings import Embedder
from bft_resources.models import ModelRef

_WORDS = re.compile(r"\w+")


def trigrams(text: str) -> set[tuple[str, str, str]]:
    words = _WORDS.findall(text.lower())
    return set(zip(words, words[1:], words[2:], strict=False))


def unique_trigrams(texts: Sequence[str]) -> int:
    """Distinct word trigrams over a set of texts (BFT section 5's diversity measure)."""
    seen: set[tuple[str, str, str]] = set()
    for text in texts:
        seen |= trigrams(text)
    return len(seen)


def diversity(training_set: pl.DataFrame, sample: int, seed: int = 0) -> dict[str, float]:
    """Unique trigrams of generated instructions and responses at a fixed sample size."""
    generated = training_set.filter(pl.col("source") == "generated")
    n = min(sample, generated.height)
    if n == 0:
        return {"diversity_sample": 0}
    picked = generated.sample(n=n, seed=seed)
    return {
        "diversity_sample": n,
        "unique_trigrams_instructions": unique_trigrams(picked["instruction"].to_list()),
        "unique_trigrams_responses": unique_trigrams(picked["response"].to_list()),
    }


def mean_tokens(model: ModelRef, texts: list[str]) -> float:
    """Mean length in tokens of the model's tokenizer (0 for no texts)."""
    if not texts:
        return 0.0
    return float(sum(model.token_counter()(texts)) / len(texts))


def lengths(generated: pl.DataFrame, base: ModelRef) -> dict[str, float]:
    """Mean instruction and response lengths: BFT Table 6 counts the base model's tokens;
    words stay beside them."""
    words = {
        c: float(generated[c].str.split(" ").list.len().mean() or 0.0)
        for c in ("instruction", "response")
    }
    return {"mean_instruction_tokens": mean_tokens(base, generated["instruction"].to_list()),
            "mean_response_tokens": mean_tokens(base, generated["response"].to_list()),
            "mean_instruction_words": words["instruction"], "mean_response_words": words["response"]}  # fmt: skip


def mauve_scores(
    embedder: Embedder, pool: pl.DataFrame, generated: pl.DataFrame, limit: int, seed: int = 0
) -> dict:
    """MAUVE as the paper sets it up: the recipe's responses against the aligned model's
    distilled answers to the same instructions (and against the web responses to them), up
    to ``limit`` pairs (paper: 10K), beside a control: distilled answers to two disjoint
    halves of the instructions, i.e. what MAUVE gives two samples of one distribution."""
    if limit <= 0 or generated.height < 2 or pool.is_empty():
        return {}
    columns = [pl.col("doc_id").alias("id"), pl.col("response").alias("web")]
    distilled = "distilled" in pool.columns
    pool = pool.select(*columns, *(["distilled"] if distilled else []))
    same = generated.select("id", pl.col("response").alias("ours")).join(pool, on="id", how="inner")
    same = stable_order(same, "id", seed).head(limit)
    out: dict = {"mauve_features": embedder.mauve_features, "mauve_pairs": same.height}
    if same.height >= 2:
        out["mauve_vs_web"] = embedder.mauve(same["ours"].to_list(), same["web"].to_list(), seed)
    if distilled:
        answered = same.filter(has_text("distilled"))
        if answered.height >= 2:
            out["mauve_vs_distilled"] = embedder.mauve(
                answered["ours"].to_list(), answered["distilled"].to_list(), seed
            )
            out["mauve_pairs_distilled"] = answered.height
        control = stable_order(pool.filter(has_text("distilled")), "id", seed + 1)
        halves = control["distilled"].to_list()
        first, second = halves[0::2][:limit], halves[1::2][:limit]
        if min(len(first), len(second)) >= 2:
            out["mauve_control_distilled"] = embedder.mauve(first, second, seed)
    return out

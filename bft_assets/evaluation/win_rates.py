"""Evaluation arithmetic: win rates and AlpacaEval 2's length-controlled win rate.

Preferences are P(model's answer is better) in [0, 1]; a tie is 0.5, so it counts half.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class WinRate:
    win_rate: float  # percent
    standard_error: float  # percent
    n: int
    wins: int
    losses: int
    ties: int


def win_rate(preferences: Sequence[float]) -> WinRate:
    """Mean preference in percent with its standard error (sample std / sqrt(n))."""
    values = np.asarray(
        [p for p in preferences if p is not None and not math.isnan(p)], dtype=float
    )
    if values.size == 0:
        return WinRate(math.nan, math.nan, 0, 0, 0, 0)
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return WinRate(
        win_rate=float(values.mean() * 100),
        standard_error=se * 100,
        n=int(values.size),
        wins=int((values > 0.5).sum()),
        losses=int((values < 0.5).sum()),
        ties=int((values == 0.5).sum()),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_logistic(
    features: np.ndarray,
    targets: np.ndarray,
    l2: float = 1e-6,
    iterations: int = 100,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Weights of a logistic model of probabilities ``targets`` (soft labels) by Newton's
    method on the log loss, with no separate intercept (give a column of ones). ``prior``
    (mean, precision) adds the Gaussian penalty 0.5 (w - mean)' precision (w - mean)."""
    k = features.shape[1]
    mean, precision = prior if prior is not None else (np.zeros(k), np.zeros((k, k)))
    precision = precision + l2 * np.eye(k)
    weights = np.zeros(k)
    for _ in range(iterations):
        p = _sigmoid(features @ weights)
        gradient = features.T @ (p - targets) + precision @ (weights - mean)
        hessian = (features * (p * (1 - p))[:, None]).T @ features + precision
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return weights


@dataclass(frozen=True)
class LengthControlled:
    win_rate: float  # percent, with the length difference set to zero
    length_weight: float
    variant: str  # "simplified" or "full"


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    difficulty: Sequence[float] | None = None,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> LengthControlled:
    """AlpacaEval 2's length-controlled win rate (Dubois et al. 2024): a logistic GLM of the
    preference on tanh of the standardized length difference (reference minus model, as
    AlpacaEval computes it), the instruction's difficulty and a model term, predicted with
    the length term at zero and averaged over instructions.

    Without per-instruction difficulty this is the simplified variant (length and model
    terms only). AlpacaEval's published fit also regularizes the length and difficulty
    weights toward its 'gamed' baselines (GPT-4 Turbo prompted to be verbose or concise,
    fitted alongside each model at weight 0.1 per row); ``prior`` (mean, precision over the
    length, difficulty and model weights) stands in for that term in the full variant
    (see ``bft_assets.evaluation.lc``)."""
    y = np.asarray(preferences, dtype=float)
    delta = np.asarray(reference_lengths, dtype=float) - np.asarray(model_lengths, dtype=float)
    std = delta.std(ddof=1)
    standardized = delta / std if std > 0 else np.zeros_like(delta)
    columns = [np.tanh(standardized)]
    if difficulty is not None:
        columns.append(np.asarray(difficulty, dtype=float))
    columns.append(np.ones_like(y))
    weights = fit_logistic(
        np.stack(columns, axis=1), y, prior=prior if difficulty is not None else None
    )
    at_equal_length = weights[-1] + (weights[1] * columns[1] if difficulty is not None else 0.0)
    lc = float(np.mean(_sigmoid(np.asarray(at_equal_length) * np.ones_like(y))) * 100)
    return LengthControlled(
        lc, float(weights[0]), "full" if difficulty is not None else "simplified"
    )


# ---- scores of an evaluation: per suffix and step, the best step, the recipe table ----------


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def variant_scores(
    results: pl.DataFrame, variant: str, lc: Callable[..., dict] | None
) -> dict[str, float | str]:
    """One suffix's win rate (with standard error), length-controlled win rate (where ``lc``
    is given), judged count, both-order agreement and mean answer tokens."""
    rows = results.filter(pl.col("variant") == variant)
    judged = rows.filter(pl.col("preference").is_not_null())
    wr = win_rate(judged["preference"].to_list())
    controlled = (
        lc(judged["instruction"].to_list(), judged["preference"].to_list(),
           judged["answer"].str.len_chars().to_list(), judged["reference"].str.len_chars().to_list())
        if lc is not None and judged.height >= 3 else None
    )  # fmt: skip
    agreement = rows["agree"].drop_nulls()
    return {
        f"{variant}_win_rate": wr.win_rate,
        f"{variant}_standard_error": wr.standard_error,
        f"{variant}_lc_win_rate": controlled["length_controlled_winrate"]
        if controlled
        else math.nan,
        # LC is AlpacaEval 2's (GPT-4 Turbo verdicts): not computed for other judges or sets.
        f"{variant}_lc_variant": controlled["lc_variant"]
        if controlled
        else ("too few" if lc else "not AlpacaEval 2"),
        f"{variant}_judged": wr.n,
        f"{variant}_agreement": float(agreement.mean()) if agreement.len() else math.nan,
        f"{variant}_answer_tokens": float(rows["answer_tokens"].mean() or 0.0),
    }


def best_steps(by_step: dict[int, dict], tags: Sequence[str]) -> dict:
    """Each suffix's scores at its best checkpoint (the paper reports the highest win rate
    over the steps it trains for), with the best step and every step's win rate beside them."""
    out: dict = {}
    for suffix in tags:
        best = max(by_step, key=lambda step: _finite(by_step[step][f"{suffix}_win_rate"]))
        out.update({k: v for k, v in by_step[best].items() if k.startswith(f"{suffix}_")})
        out[f"{suffix}_best_step"] = best
        for step, scores in by_step.items():
            out[f"{suffix}_step{step}_win_rate"] = scores[f"{suffix}_win_rate"]
    return out


def shared_suffix(summaries: pl.DataFrame, tags: Sequence[str]) -> str | None:
    """The suffix with the higher win rate on average over the compared recipes: one choice
    for all of them, as the paper makes it (a choice per recipe would flatter every one)."""
    means = {
        tag: summaries[f"{tag}_win_rate"].drop_nans().mean()
        for tag in tags
        if f"{tag}_win_rate" in summaries.columns
    }
    means = {tag: m for tag, m in means.items() if m is not None}
    return max(means, key=means.__getitem__) if means else None


RECIPE_TABLE_COLUMNS = (
    "recipe", "suffix", "win_rate", "standard_error", "lc_win_rate", "generated_pairs",
    "unique_trigrams_instructions", "unique_trigrams_responses", "mean_instruction_tokens",
    "mean_response_tokens", "mauve_vs_web",
)  # fmt: skip


def recipe_table(summaries: pl.DataFrame, tags: Sequence[str]) -> pl.DataFrame:
    """One row per evaluated recipe, side by side, every recipe's win rate under the one
    suffix chosen across them (each suffix's scores stay in the summaries)."""
    if summaries.is_empty():
        return summaries
    suffix = shared_suffix(summaries, tags)
    if suffix is not None:
        summaries = summaries.with_columns(
            suffix=pl.lit(suffix),
            win_rate=pl.col(f"{suffix}_win_rate"),
            standard_error=pl.col(f"{suffix}_standard_error"),
            lc_win_rate=pl.col(f"{suffix}_lc_win_rate"),
        )
    return summaries.select([c for c in RECIPE_TABLE_COLUMNS if c in summaries.columns])

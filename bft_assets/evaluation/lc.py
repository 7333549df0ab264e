"""AlpacaEval 2's length-controlled win rate with its instruction-difficulty term, offline.

AlpacaEval's published LC fits, per model, a logistic GLM of the judge's preference on
tanh(standardized length difference), the instruction's difficulty and a bias, and reports
the mean predicted preference with the length term at zero (Dubois et al. 2024). The
difficulty comes from a joint fit over many models (its notebook ``instruction_difficulty``):
per model a bias and a length weight, per instruction one difficulty shared by all models.
AlpacaEval downloads its difficulties at run time; bft ships its own, fitted the same way on
52 leaderboard models' real GPT-4 Turbo verdicts (``../shared/data/alpaca_eval``, CC BY-NC:
only the 805 fitted numbers and a hash of each instruction are shipped), in
``bft_assets/data/alpaca_eval2_instruction_difficulty.csv``.
"""

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl

from bft_assets.evaluation.win_rates import length_controlled_win_rate, win_rate

BASELINE = "gpt4_1106_preview"  # AlpacaEval 2's reference outputs (output_1)
DIFFICULTY_L2 = 1.0  # ridge on the difficulties: identifies them up to the model biases


def instruction_key(instruction: str) -> str:
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:16]


def fit_instruction_difficulty(
    models: np.ndarray, instructions: np.ndarray, preferences: np.ndarray,
    model_lengths: np.ndarray, baseline_lengths: np.ndarray, n_instructions: int,
    l2: float = DIFFICULTY_L2,
) -> np.ndarray:  # fmt: skip
    """Per-instruction difficulty of the joint fit: logit P(model wins) = bias[model] +
    weight[model] * tanh(length difference / its std within the model) + difficulty[i]."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    names, m = np.unique(models, return_inverse=True)
    k = len(names)
    delta = baseline_lengths.astype(float) - model_lengths.astype(float)
    spread = np.array([delta[m == j].std(ddof=1) for j in range(k)])
    x = np.tanh(delta / spread[m])
    y = preferences.astype(float)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        bias, weight, difficulty = w[:k], w[k : 2 * k], w[2 * k :]
        z = bias[m] + weight[m] * x + difficulty[instructions]
        residual = expit(z) - y
        value = (
            -(y * log_expit(z) + (1 - y) * log_expit(-z)).sum() + 0.5 * l2 * difficulty @ difficulty
        )
        gradient = np.concatenate([
            np.bincount(m, residual, k), np.bincount(m, residual * x, k),
            np.bincount(instructions, residual, n_instructions) + l2 * difficulty,
        ])  # fmt: skip
        return value, gradient

    fitted = minimize(loss, np.zeros(2 * k + n_instructions), jac=True, method="L-BFGS-B",
                      options={"maxiter": 5000})  # fmt: skip
    return fitted.x[2 * k :]


def annotations_frame(compact: pl.DataFrame, exclude: set[str] = frozenset()) -> pl.DataFrame:
    """The compact leaderboard annotations a difficulty fit uses: judged rows of models
    against the baseline (not the baseline against itself), minus ``exclude``."""
    return compact.filter(
        pl.col("preference").is_not_null() & (pl.col("preference") >= 1)
        & (pl.col("generator_1") == BASELINE) & (pl.col("model") != BASELINE)
        & ~pl.col("model").is_in(list(exclude))
    )  # fmt: skip


def difficulty_table(
    compact: pl.DataFrame, instructions: list[str], exclude: set[str] = frozenset()
) -> pl.DataFrame:
    """(index, instruction_key, difficulty) for the 805 AlpacaEval instructions."""
    rows = annotations_frame(compact, exclude)
    difficulty = fit_instruction_difficulty(
        rows["model"].to_numpy(), rows["index"].to_numpy(), rows["preference"].to_numpy() - 1.0,
        rows["len_2"].to_numpy(), rows["len_1"].to_numpy(), len(instructions),
    )  # fmt: skip
    return pl.DataFrame({
        "index": list(range(len(instructions))),
        "instruction_key": [instruction_key(i) for i in instructions],
        "difficulty": np.round(difficulty, 6),
    })  # fmt: skip


@cache
def shipped_difficulty() -> dict[str, float]:
    path = resources.files("bft_assets") / "data" / "alpaca_eval2_instruction_difficulty.csv"
    table = pl.read_csv(Path(str(path)))
    return dict(zip(table["instruction_key"], table["difficulty"], strict=True))


def lc_scores(
    instructions: list[str], preferences: list[float], model_lengths: list[int], reference_lengths: list[int],
    difficulty: dict[str, float] | None = None,
) -> dict[str, float | str]:  # fmt: skip
    """Raw and length-controlled win rate (percent) with the raw rate's standard error. The
    difficulty term is used when every instruction has one (the AlpacaEval set); otherwise
    the simplified GLM, and ``lc_variant`` says so."""
    difficulty = shipped_difficulty() if difficulty is None else difficulty
    keys = [instruction_key(i) for i in instructions]
    known = all(k in difficulty for k in keys)
    lc = length_controlled_win_rate(
        preferences, model_lengths, reference_lengths,
        difficulty=[difficulty[k] for k in keys] if known else None,
    )  # fmt: skip
    raw = win_rate(preferences)
    return {"win_rate": raw.win_rate, "length_controlled_winrate": lc.win_rate,
            "standard_error": raw.standard_error, "lc_variant": lc.variant}  # fmt: skip


def annotations_lc(path: Path) -> dict[str, float | str]:
    """LC of an AlpacaEval ``annotations.json``: output_1 is the reference, output_2 the
    model, preference in [1, 2] (2: the model's answer is better)."""
    rows = [r for r in json.loads(Path(path).read_text()) if r.get("preference") is not None]
    return lc_scores([r["instruction"] for r in rows], [float(r["preference"]) - 1.0 for r in rows],
                     [len(r["output_2"]) for r in rows], [len(r["output_1"]) for r in rows])  # fmt: skip

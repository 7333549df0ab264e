"""How close bft's offline length-controlled win rate comes to AlpacaEval 2's leaderboard.

For each leaderboard model in ../shared/data/alpaca_eval's compact annotations: fit the
instruction difficulty and the length prior (``bft_assets.evaluation.lc``) WITHOUT that
model's verdicts and published weights, compute its LC from its own verdicts, and compare
with the published LC. ``--models a,b,c`` holds that set out jointly instead (one fit
without any of them) and reports it; give it several times for several sets. Each report is
a table, then the median and max |error| over its models and the five worst.

    python benchmarks/lc_leave_one_out.py [--data ../shared/data/alpaca_eval] [--models a,b,c]...
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import polars as pl

from bft_assets.evaluation.lc import (
    annotations_frame,
    difficulty_table,
    fit_length_prior,
    lc_scores,
    prior_from,
    published_weights,
)


def published(data: Path) -> dict[str, float]:
    """Leaderboard LC by results/ folder name (the `samples` link)."""
    out = {}
    with open(data / "leaderboard_AlpacaEval2_weighted_alpaca_eval_gpt4_turbo.csv") as handle:
        for row in csv.DictReader(handle):
            link = row.get("samples") or ""
            if "results/" in link:
                out[link.split("results/")[1].split("/")[0]] = float(
                    row["length_controlled_winrate"]
                )
    return out


class Data:
    def __init__(self, data: Path) -> None:
        self.compact = pl.read_parquet(data / "alpaca_eval2_annotations_compact.parquet")
        outputs = json.loads((data / "gpt4_1106_preview_model_outputs.json").read_text())
        self.instructions = [r["instruction"] for r in outputs]
        self.board = published(data)
        self.weights = published_weights(data)
        self.rows = annotations_frame(self.compact)
        self.models = sorted(set(self.rows["model"]) & set(self.board))


def held_out_lc(data: Data, held_out: list[str]) -> list[tuple[str, float, float]]:
    """(model, bft LC, published LC) for each of ``held_out``, everything fitted without them."""
    exclude = set(held_out)
    table = difficulty_table(data.compact, data.instructions, exclude=exclude)
    weights = {m: w for m, w in data.weights.items() if m not in exclude}
    prior = prior_from(
        fit_length_prior(data.compact, table["difficulty"].to_numpy(), weights, exclude)
    )
    difficulty = dict(zip(table["instruction_key"], table["difficulty"], strict=True))
    results = []
    for model in held_out:
        mine = data.rows.filter(pl.col("model") == model)
        scores = lc_scores([data.instructions[i] for i in mine["index"]], (mine["preference"] - 1.0).to_list(),
                           mine["len_2"].to_list(), mine["len_1"].to_list(), difficulty, prior)  # fmt: skip
        results.append((model, float(scores["length_controlled_winrate"]), data.board[model]))
    return results


def report(title: str, results: list[tuple[str, float, float]]) -> tuple[float, float]:
    print(f"\n{title}\n{'model':<48} {'bft LC':>8} {'published':>10} {'error':>7}")
    for model, ours, theirs in results:
        print(f"{model:<48} {ours:>8.2f} {theirs:>10.2f} {ours - theirs:>7.2f}")
    errors = {model: ours - theirs for model, ours, theirs in results}
    absolute = np.abs(list(errors.values()))
    worst = sorted(errors, key=lambda m: -abs(errors[m]))[:5]
    print(
        f"models {len(results)}; |error| median {np.median(absolute):.2f}, max {absolute.max():.2f}"
    )
    print("worst: " + ", ".join(f"{m} {errors[m]:+.2f}" for m in worst))
    return float(np.median(absolute)), float(absolute.max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_eval"),
    )
    parser.add_argument(
        "--models", action="append", default=[], help="comma-separated held-out set"
    )
    args = parser.parse_args()
    data = Data(Path(args.data))
    for group in args.models:
        held_out = [m.strip() for m in group.split(",") if m.strip()]
        unknown = sorted(set(held_out) - set(data.models))
        if unknown:
            parser.error(f"no verdicts or no published LC for {unknown}; known: {data.models}")
        report(f"held out together: {', '.join(held_out)}", held_out_lc(data, held_out))
    if not args.models:
        results = [row for model in data.models for row in held_out_lc(data, [model])]
        report("each model held out on its own (leave-one-out)", results)


if __name__ == "__main__":
    main()

"""How close bft's offline length-controlled win rate comes to AlpacaEval 2's leaderboard:
for each of the leaderboard models in ../shared/data/alpaca_eval's compact annotations, fit
the instruction difficulty WITHOUT that model's verdicts, compute its LC from its own
verdicts, and compare with the published LC. Prints a table and the median and max error.

    python benchmarks/lc_leave_one_out.py [--data ../shared/data/alpaca_eval]
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import polars as pl

from bft_assets.evaluation.lc import annotations_frame, difficulty_table, lc_scores


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


def leave_one_out(data: Path) -> list[tuple[str, float, float]]:
    compact = pl.read_parquet(data / "alpaca_eval2_annotations_compact.parquet")
    instructions = [
        r["instruction"]
        for r in json.loads((data / "gpt4_1106_preview_model_outputs.json").read_text())
    ]
    board = published(data)
    rows = annotations_frame(compact)
    results = []
    for model in sorted(set(rows["model"]) & set(board)):
        table = difficulty_table(compact, instructions, exclude={model})
        mine = rows.filter(pl.col("model") == model)
        difficulty = dict(zip(table["instruction_key"], table["difficulty"], strict=True))
        scores = lc_scores([instructions[i] for i in mine["index"]], (mine["preference"] - 1.0).to_list(),
                           mine["len_2"].to_list(), mine["len_1"].to_list(), difficulty)  # fmt: skip
        results.append((model, float(scores["length_controlled_winrate"]), board[model]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_eval"),
    )
    results = leave_one_out(Path(parser.parse_args().data))
    print(f"{'model':<48} {'bft LC':>8} {'published':>10} {'error':>7}")
    for model, ours, theirs in results:
        print(f"{model:<48} {ours:>8.2f} {theirs:>10.2f} {ours - theirs:>7.2f}")
    errors = np.abs([ours - theirs for _, ours, theirs in results])
    print(
        f"models {len(results)}; |error| median {np.median(errors):.2f}, mean {errors.mean():.2f}, max {errors.max():.2f}"
    )


if __name__ == "__main__":
    main()

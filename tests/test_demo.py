"""`bft demo` as a user runs it: a fresh DAGSTER_HOME and storage, the embedded model."""

import os
import subprocess
import sys

import dagster as dg
import polars as pl
import pytest

from conftest import REPO


@pytest.mark.slow
def test_demo_materializes_every_asset_and_records_runs(tmp_path, smollm2):
    smollm2.local_path()  # convert the embedded model once, outside the timed demo
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "BFT_STORAGE": str(tmp_path / "storage"),
        "BFT_CORPUS_URI": str(tmp_path / "corpus"),
    }
    env.pop("BFT_SEED_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "bft_assets.cli", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo finished" in result.stdout
    assert "recipes (win rate" in result.stdout and "filtering_rewriting" in result.stdout

    storage = tmp_path / "storage" / "demo"  # <storage>/<key_prefix>/<asset>
    seed = pl.read_parquet(storage / "seed_examples.parquet")
    assert seed.height == 24
    shards = sorted((storage / "candidate_responses").glob("*[0-9].parquet"))
    assert [p.stem for p in shards] == ["stdlib-docs-0000", "stdlib-docs-0001"]
    kept = sum(pl.read_parquet(p).height for p in shards)
    assert kept >= 10
    for stage in ("backtranslated_pool", "scored_pool", "rewritten_dataset"):
        tables = sorted((storage / stage).glob("*.parquet"))
        assert [p.stem for p in tables] == ["stdlib-docs-0000", "stdlib-docs-0001"]
        assert sum(pl.read_parquet(p).height for p in tables) == kept
    rewritten = pl.concat(
        pl.read_parquet(p) for p in (storage / "rewritten_dataset").glob("*.parquet")
    )
    assert rewritten["score"].is_between(1, 5).all()
    # the generation stages used the seed models the demo trained
    pool = pl.read_parquet(storage / "backtranslated_pool" / "stdlib-docs-0000.parquet")
    assert pool["model"].unique().to_list() == [str(storage / "seed_model" / "backward")]
    for recipe in ("seed_only", "filtering", "filtering_rewriting"):
        index = pl.read_parquet(storage / "finetuned_checkpoint" / f"{recipe}.checkpoints.parquet")
        assert index["step"].to_list() == [3]  # the demo declares steps: [3]
        assert (
            storage / "finetuned_checkpoint" / index["partition"][0] / "model.safetensors"
        ).exists()
        assert (storage / "finetuned_checkpoint" / f"{recipe}.train.jsonl").exists()
        summary = pl.read_parquet(storage / "eval_scores" / f"{recipe}.summary.parquet")
        # the demo declares eval.limit: 4
        assert 0 <= summary["assistant_win_rate"][0] <= 100 and summary["assistant_judged"][0] == 4
        assert summary["web_if_needed_judged"][0] == 4  # both suffixes scored, one chosen for all

    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        runs = instance.get_runs()
        # observe the corpus and the recipes, seed, 2 seed models, 2 shards, 3 recipes
        assert len(runs) == 10 and all(r.is_success for r in runs)
        materialized = instance.get_latest_materialization_event(
            dg.AssetKey(["demo", "candidate_responses"])
        )
        assert materialized is not None

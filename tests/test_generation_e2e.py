"""The three generation stages materialized for real: SmolLM2 end to end, a tiny random
Llama for the generate-mode scoring path."""

import re

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize, node

from bft_assets.corpus import discover_shards
from bft_assets.demo import write_demo_corpus
from bft_assets.instance import (
    BACKTRANSLATED_POOL,
    CANDIDATE_RESPONSES,
    CORPUS_DOCUMENTS,
    REWRITTEN_DATASET,
    SCORED_POOL,
)
from bft_assets.recipes import REWRITE_OK as OK
from bft_assets.replies import NO_SCORE, NOT_SELECTED, REWRITE_STATUSES, TRUNCATED
from bft_resources.corpus import CorpusSource

STAGES = [
    CORPUS_DOCUMENTS,
    CANDIDATE_RESPONSES,
    BACKTRANSLATED_POOL,
    SCORED_POOL,
    REWRITTEN_DATASET,
]

PROGRESS = re.compile(
    r"(?P<done>\d+) of (?P<total>\d+) [a-z ]+; (?P<rate>[\d.]+) (generated|prompt) tokens/s; ETA \d+ s"
)


def _setup(tmp_path, model: str, docs: int, **overrides):
    write_demo_corpus(tmp_path / "corpus", shards=1, docs_per_shard=docs)
    # The generation stages use the declared model instead of trained seed models.
    return declare(tmp_path, model, models={"backward": model, "forward": model}, **overrides)


def _table(tmp_path, asset: str, shard: str) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "storage" / "t" / asset / f"{shard}.parquet")


@pytest.mark.slow
def test_smollm2_backtranslates_scores_and_rewrites_a_shard(tmp_path, smollm2):
    inst = _setup(tmp_path, smollm2.model, docs=4, generation={
        "backtranslation": {"max_new_tokens": 32}, "scoring": {"mode": "logprobs"},
        "rewriting": {"max_new_tokens": 160, "force_format": True, "length_cap": "ratio", "rewrite_length_ratio": 1.0,
                      "rewrite_extra_tokens": 16}},
        # rewriting (every pair rewritten) and a distilled recipe at score >= 3
        recipes=[{"name": "rewriting", "responses": "rewrite"},
                 {"name": "distilling_3", "responses": "distilled", "min_score": 3}])  # fmt: skip
    with dg.instance_for_test() as instance:
        corpus = CorpusSource(uri=str(tmp_path / "corpus"))
        (shard,) = discover_shards(corpus, instance, inst.shards.name)
        result = materialize(inst, STAGES, instance, partition_key=shard)
    assert result.success
    candidates = _table(tmp_path, CANDIDATE_RESPONSES, shard)
    pool = _table(tmp_path, BACKTRANSLATED_POOL, shard)
    scored = _table(tmp_path, SCORED_POOL, shard)
    rewritten = _table(tmp_path, REWRITTEN_DATASET, shard)
    assert candidates["id"].to_list() == pool["doc_id"].to_list() == scored["doc_id"].to_list()
    assert rewritten["doc_id"].to_list() == candidates["id"].to_list()
    assert pool["instruction"].str.len_chars().min() > 0
    usable = scored.filter(pl.col("instruction_flag").is_null())
    assert usable["score"].is_between(1, 5).all()  # logprobs mode: always a valid score
    assert usable["expected_score"].is_between(1.0, 5.0).all()
    assert set(rewritten["rewrite_status"].unique()) <= set(REWRITE_STATUSES)
    selected = rewritten.filter(pl.col("instruction_flag").is_null())  # rewrite: all
    assert (
        selected["rewrite_reply"].null_count() == 0
        and NOT_SELECTED not in selected["rewrite_status"]
    )
    for row in selected.iter_rows(named=True):  # each status agrees with what the model did
        if row["rewrite_status"] == OK:
            assert row["rewrite"].strip() and "[/RES]" not in row["rewrite"]
        else:
            assert row["rewrite"] is None
        assert (row["rewrite_status"] == TRUNCATED) == (row["rewrite_reply_finish"] == "length")
    passed = rewritten.filter((pl.col("score") >= 3) & pl.col("instruction_flag").is_null())
    assert passed["distilled"].null_count() == 0
    below = rewritten.filter((pl.col("score") < 3) | pl.col("instruction_flag").is_not_null())
    assert below["distilled"].null_count() == below.height  # nobody trains on those answers
    meta = result.asset_materializations_for_node(node(inst, SCORED_POOL))[0].metadata
    assert meta["valid_rate"].value == 1.0
    assert sum(meta[f"score_{s}"].value for s in "12345") == usable.height
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["scored_pool_scores_in_range"] and checks["rewritten_dataset_no_prompt_markers"]
    assert all(checks[c] for c in checks if c.endswith("rows_accounted"))


def test_unparseable_replies_keep_their_rows_with_a_reason(tmp_path, tiny_tokenizer_model):
    """A random model never writes 'Score: N': every pair stays, with a null score and a
    reason, and the hard-floor check fails loudly instead of passing an empty pool."""
    inst = _setup(tmp_path, str(tiny_tokenizer_model), docs=6, generation={
        "backtranslation": {"max_new_tokens": 8, "batch_rows": 2},
        "scoring": {"mode": "generate", "max_new_tokens": 8}})  # fmt: skip
    with dg.instance_for_test() as instance:
        corpus = CorpusSource(uri=str(tmp_path / "corpus"))
        (shard,) = discover_shards(corpus, instance, inst.shards.name)
        result = materialize(inst, STAGES[:4], instance, partition_key=shard, raise_on_error=False)
        log = instance.all_logs(result.run_id)
    # the run log shows progress while the step works: a line per batch, before the step ends
    step = node(inst, BACKTRANSLATED_POOL)
    events = [e for e in log if e.step_key == step]
    ended = next(
        i
        for i, e in enumerate(events)
        if e.is_dagster_event and e.dagster_event_type == "STEP_SUCCESS"
    )
    progress = [PROGRESS.search(e.user_message) for e in events[:ended]]
    lines = [m for m in progress if m and int(m["done"]) < int(m["total"])]
    assert lines and all(float(m["rate"]) > 0 for m in lines), [
        e.user_message for e in events[:ended]
    ]
    scored = _table(tmp_path, SCORED_POOL, shard)
    pool = _table(tmp_path, BACKTRANSLATED_POOL, shard)
    assert scored.height == pool.height
    unscored = scored.filter(pl.col("score").is_null())
    assert unscored["score_reason"].null_count() == 0
    assert set(unscored["score_reason"].unique()) <= {
        NO_SCORE,
        "out_of_range",
        "instruction_flagged",
    }
    assert unscored["score_reply"].drop_nulls().len() >= 1  # the raw reply is kept
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    valid_rate = checks["scored_pool_valid_rate_hard_floor"]
    assert valid_rate.passed == (scored["score"].is_not_null().mean() >= 0.5)
    assert checks["scored_pool_rows_accounted"].passed

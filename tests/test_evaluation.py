"""eval_scores: verdict reading, the judge behind a real endpoint with faults, and a local
SmolLM2 judge end to end."""

import json

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize, node, place_checkpoint

from bft_assets.evaluation.annotators import BFT, annotator, first_digit_verdict
from bft_assets.evaluation.data_metrics import diversity
from bft_assets.evaluation.judging import (
    LOGPROBS,
    TEXT,
    UNREAD,
    combine_orders,
    judge_all,
    judgement_key,
    read_verdicts,
    verdict_reading,
)
from bft_assets.instance import EVAL_SCORES, FINETUNED_CHECKPOINT, REWRITTEN_DATASET
from bft_resources.engine import Chat, EndpointEngine, TransformersEngine
from bft_resources.engine.endpoint import EndpointError
from bft_resources.models import ModelRef
from bft_resources.storage import LocalStorage

from servers import FaultInjectingProxy, transformers_serve


def test_verdicts_from_text_and_both_orders():
    assert first_digit_verdict("1") == 1.0 and first_digit_verdict("Answer 2 is better") == 0.0
    assert first_digit_verdict("Neither.") is None
    assert combine_orders(0.8, 0.3) == (
        pytest.approx(0.75),
        True,
    )  # model first: 0.8; reference first: 1-0.3
    assert combine_orders(0.9, 0.9) == (pytest.approx(0.5), False)  # position bias: always "1"
    assert combine_orders(None, 0.2) == (pytest.approx(0.8), None)
    assert combine_orders(None, None) == (None, None)


def test_judgement_key_changes_with_any_input():
    base = judgement_key("q", "a", "r", "transformers:m", "v1")
    assert base == judgement_key("q", "a", "r", "transformers:m", "v1")
    others = {judgement_key("q", "a2", "r", "transformers:m", "v1"), judgement_key("q", "a", "r", "vllm:m", "v1"),
              judgement_key("q", "a", "r", "transformers:m", "v2")}  # fmt: skip
    assert len({base, *others}) == 4


def test_diversity_counts_at_equal_sample_size():
    rows = pl.DataFrame({"source": ["generated"] * 4 + ["seed"], "instruction": ["a b c d", "a b c", "x y z", "p q r", "s"],
                         "response": ["one two three", "one two three", "four five six", "seven eight nine", "x"]})  # fmt: skip
    out = diversity(rows, sample=10)
    assert out["diversity_sample"] == 4
    assert out["unique_trigrams_instructions"] == 4 and out["unique_trigrams_responses"] == 3


def test_local_judge_reads_logprobs(tiny_tokenizer_model):
    with TransformersEngine(dtype="float32").load(str(tiny_tokenizer_model)) as model:
        assert verdict_reading(model, Chat("Pick 1 or 2")) == LOGPROBS
        probs = read_verdicts(model, [Chat("Which is better? 1 or 2"), Chat("Pick 1 or 2")])
    assert len(probs) == 2 and all(0.0 <= p <= 1.0 for p in probs)


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    with transformers_serve(smollm2.local_path(), tmp_path_factory.mktemp("serve") / "log") as url:
        yield url


PAIRS = pl.DataFrame({
    "instruction": ["Name a colour.", "Name a fruit.", "Name a planet.", "Name an animal."],
    "answer": ["Blue.", "Apple.", "Mars.", "Cat."],
    "reference": ["Red.", "Pear.", "Venus.", "Dog."],
}).with_columns(judgement_key=pl.concat_str("instruction", "answer"))  # fmt: skip


@pytest.mark.slow
def test_endpoint_judge_survives_faults_and_keeps_what_it_judged(server, smollm2):
    proxy = FaultInjectingProxy(server, hang_s=6.0)
    try:
        # The timeout sits well above a real answer's latency: a hung request still reaches
        # the server afterwards and occupies it for a moment.
        judge = EndpointEngine(base_url=proxy.url, max_concurrency=1, max_retries=4, timeout_s=5.0,
                               retry_backoff_s=0.01)  # fmt: skip
        model = ModelRef(model=str(smollm2.local_path()))
        cache: dict = {}
        saved: list[int] = []
        # The first request (the logprobs probe) meets a 429, a 500, a timeout and a dropped
        # connection and gets through on its fifth attempt; the first batch (2 pairs, both
        # orders: 4 requests) is answered; then the endpoint goes down for good.
        proxy.script = ["429", "500", "timeout", "drop"]
        proxy.forwards_left, proxy.always = 5, "503"
        with pytest.raises(EndpointError, match="HTTP 503"), judge.load(model) as loaded:
            judge_all(
                loaded,
                PAIRS,
                cache,
                lambda: saved.append(len(cache)),
                2,
                annotator(BFT),
                lambda m: None,
            )
        assert proxy.seen[:9] == ["429", "500", "timeout", "drop"] + ["forward"] * 5
        assert saved == [2] and len(cache) == 2  # the first batch was judged and saved
        # transformers serve ignores logprobs: verdicts are read from text (UNREAD where a
        # 135M judge wrote neither 1 nor 2)
        assert {how for _, _, how in cache.values()} <= {TEXT, UNREAD}

        proxy.always, proxy.forwards_left, proxy.seen = None, None, []
        todo = PAIRS.filter(~pl.col("judgement_key").is_in(list(cache)))
        with judge.load(model) as loaded:
            judge_all(
                loaded,
                todo,
                cache,
                lambda: saved.append(len(cache)),
                2,
                annotator(BFT),
                lambda m: None,
            )
        assert (
            len(cache) == 4 and len(proxy.seen) == 1 + 4
        )  # the probe, then the 2 missing pairs twice
    finally:
        proxy.close()


@pytest.mark.slow
def test_eval_scores_with_a_local_smollm2_judge(tmp_path, smollm2):
    eval_file = tmp_path / "eval.json"
    inst = declare(tmp_path, smollm2.model, eval={"uri": str(eval_file), "max_new_tokens": 24, "mauve_texts": 3,
                                                  "min_agreement": 0.0})  # fmt: skip
    storage = LocalStorage(root=str(tmp_path / "storage"))
    recipe = "filtering"
    # SmolLM2 stands as the recipe's trained model
    place_checkpoint(storage, inst.table(FINETUNED_CHECKPOINT), recipe, smollm2.local_path(),
                     {"recipe": recipe, "base_model": "smollm2"})  # fmt: skip
    storage.write(inst.table(FINETUNED_CHECKPOINT), pl.DataFrame({
        "id": ["g1", "g2", "s1"], "source": ["generated", "generated", "seed"],
        "instruction": ["Explain sorting.", "Explain hashing.", "Say hi."], "prompt": ["p", "p", "p"],
        "response": ["Sorting puts items in order by a key.", "Hashing maps data to a fixed-size value.", "Hi!"],
        "recipe": [recipe] * 3,
    }), partition=recipe, suffix="train")  # fmt: skip
    storage.write(inst.table(REWRITTEN_DATASET), pl.DataFrame({
        "doc_id": ["g1", "g2", "d3"], "response": ["A web page about lists.", "Docs on dicts.", "A page on sets."],
        "distilled": ["Lists are ordered.", "Dicts map keys to values.", "Sets hold unique items."],
    }), partition="s0")  # fmt: skip
    eval_file.write_text(json.dumps([
        {"instruction": "Name a primary colour.", "output": "Red is a primary colour.", "dataset": "colours"},
        {"instruction": "What is 2 + 2?", "output": "2 + 2 = 4.", "dataset": "maths"},
        {"instruction": "Name a planet.", "output": "Mars.", "dataset": "space"},
    ]))  # fmt: skip
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(inst.shards.name, ["s0"])
        first = materialize(inst, [EVAL_SCORES], instance, partition_key=recipe)
        again = materialize(inst, [EVAL_SCORES], instance, partition_key=recipe)
    table = pl.read_parquet(tmp_path / "storage" / "t" / EVAL_SCORES / f"{recipe}.parquet")
    assert table.height == 6  # 3 instructions x 2 suffixes
    assert table["preference"].is_between(0, 1).all() and (table["read_by"] == LOGPROBS).all()
    meta = {
        k: v.value
        for k, v in first.asset_materializations_for_node(node(inst, EVAL_SCORES))[
            0
        ].metadata.items()
    }
    assert (
        0 <= meta["assistant_win_rate"] <= 100
        and meta["suffix_chosen_across_recipes"] in ("assistant", "web_if_needed")
        and meta["assistant_judged"] == 3
        and meta["web_if_needed_judged"] == 3
    )
    assert meta["unique_trigrams_responses"] > 0 and 0 <= meta["mauve_vs_web"] <= 1
    # MAUVE on the 2 generated pairs whose instructions have web and distilled answers, beside the control
    assert meta["mauve_pairs"] == 2 and 0 <= meta["mauve_vs_distilled"] <= 1
    assert (
        "mauve_control_distilled" not in meta
    )  # 3 distilled answers: halves of 2 and 1 are too few
    assert meta["annotator"] == "bft"
    assert "| filtering |" in meta["recipes"]
    checks = {e.check_name: e.passed for e in first.get_asset_check_evaluations()}
    assert checks["eval_scores_all_judged"] and checks["eval_scores_preferences_in_range"]
    again_meta = again.asset_materializations_for_node(node(inst, EVAL_SCORES))[0].metadata
    # nothing re-judged that did not change (two suffixes may draw the same answer: one judgement)
    assert again_meta["judgements_reused"].value == table["judgement_key"].n_unique() >= 5


def test_one_suffix_is_chosen_across_recipes_on_average(tmp_path):
    """The paper keeps the suffix with the higher win rate on average over the compared
    models: filtering is better with its own best suffix, but every recipe is reported under
    the one that wins on average, and both suffixes' scores stay in the summaries."""
    from bft_assets.evaluation.asset import recipe_summaries

    inst = declare(tmp_path, "m", recipes=[{"name": "filtering", "responses": "web", "min_score": 5},
                                           {"name": "rewriting", "responses": "rewrite"}])  # fmt: skip
    storage = LocalStorage(root=str(tmp_path / "storage"))
    for recipe, assistant, web in (("filtering", 60.0, 50.0), ("rewriting", 40.0, 55.0)):
        storage.write(inst.table(EVAL_SCORES), pl.DataFrame([{
            "recipe": recipe, "assistant_win_rate": assistant, "web_if_needed_win_rate": web,
            "assistant_standard_error": 1.0, "web_if_needed_standard_error": 2.0,
            "assistant_lc_win_rate": assistant, "web_if_needed_lc_win_rate": web,
        }]), partition=recipe, suffix="summary")  # fmt: skip
    table = recipe_summaries(inst, storage)
    assert table["suffix"].to_list() == ["web_if_needed", "web_if_needed"]  # mean 52.5 > 50
    assert table["win_rate"].to_list() == [50.0, 55.0]  # filtering's own best (60) is not used
    summary = storage.read(inst.table(EVAL_SCORES), "filtering", "summary")
    assert summary["assistant_win_rate"][0] == 60.0  # every suffix's score is still reported

"""Recipes select what they must; seed_model and finetuned_checkpoint materialize for real."""

import json

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize, merged, node

from bft_assets.checkpoint_index import read_checkpoint_index
from bft_assets.instance import FINETUNED_CHECKPOINT, REWRITTEN_DATASET, SEED_EXAMPLES, SEED_MODEL
from bft_assets.prompts import BACKTRANSLATE, SEED_TAG, WEB_TAG
from bft_assets.recipes import (
    PAPER_RECIPES,
    Need,
    Recipe,
    ShortPool,
    assemble_training_set,
    chat_jsonl,
    check_recipes,
    generated_pairs,
    sample,
)
from bft_assets.seed_model import seed_training_examples
from bft_resources.storage import LocalStorage
from bft_resources.trainer import MANIFEST

from tiny_models import without_chat_template

RECIPES = {r.name: r for r in PAPER_RECIPES}
SEED = pl.DataFrame({"id": ["s1", "s2"], "instruction": ["Say hi.", "Count to two."],
                     "response": ["Hi!", "One, two."], "source": ["x", "x"], "where": ["a", "b"]})  # fmt: skip


def _rewritten(prefix: str = "") -> pl.DataFrame:
    """Hand-made rewritten_dataset rows covering every case a recipe distinguishes."""
    return pl.DataFrame({
        "doc_id": [f"{prefix}{i}" for i in ("pass-ok", "pass-fail", "fail-ok", "flagged", "pass-ok-2")],
        "instruction": ["Q1", "Q2", "Q3", "", "Q5"],
        "response": ["web1", "web2", "web3", "web4", "web5"],
        "instruction_flag": [None, None, None, "empty", None],
        "score": [5, 5, 3, None, 5],
        "rewrite": ["rw1", None, "rw3", None, "rw5"],
        "rewrite_status": ["ok", "no_markers", "ok", "not_selected", "ok"],
        "distilled": ["d1", "d2", None, None, "  "],
    })  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("seed_only", []),
        ("filtering", [("pass-ok", "web1"), ("pass-fail", "web2"), ("pass-ok-2", "web5")]),
        ("rewriting", [("pass-ok", "rw1"), ("fail-ok", "rw3"), ("pass-ok-2", "rw5")]),
        ("filtering_rewriting", [("pass-ok", "rw1"), ("pass-ok-2", "rw5")]),
        ("filtering_distilling", [("pass-ok", "d1"), ("pass-fail", "d2")]),
    ],
)
def test_each_recipe_selects_what_it_must(recipe, expected):
    pairs = generated_pairs(_rewritten(), RECIPES[recipe])
    assert list(pairs.select("id", "response").iter_rows()) == expected


def test_a_recipe_declared_in_yaml_selects_at_its_own_threshold():
    at_least_3 = Recipe(name="filtering_3", responses="web", min_score=3)
    pairs = generated_pairs(_rewritten(), at_least_3)
    assert pairs["id"].to_list() == ["pass-ok", "pass-fail", "fail-ok", "pass-ok-2"]
    with pytest.raises(ValueError, match="scores run from 1 to 5"):
        Recipe(name="x", responses="web", min_score=6)


def test_upstream_stages_do_what_the_declared_recipes_need(tmp_path):
    """rewriting (every pair rewritten) makes rewritten_dataset rewrite all pairs; without
    it only pairs at the lowest declared threshold are; without a distilled recipe nothing
    is distilled."""
    paper = declare(tmp_path, "m", recipes=[r.model_dump() for r in PAPER_RECIPES])
    # rewriting filters nothing, flagged instructions included ("no intermediate filtering")
    assert paper.needs("rewrite") == Need(True, None, True) and paper.needs("distilled") == Need(
        True, 5, True
    )
    filtered = declare(tmp_path, "m", recipes=[
        {"name": "filtering_rewriting", "responses": "rewrite", "min_score": 5},
        {"name": "fr4", "responses": "rewrite", "min_score": 4, "exclude_flagged": True}])  # fmt: skip
    assert filtered.needs("rewrite") == Need(True, 4, True) and filtered.needs("distilled") == Need(
        False
    )


def _training_set(
    rewritten: pl.DataFrame, recipe: Recipe, group: tuple[Recipe, ...] = ()
) -> pl.DataFrame:
    others = [generated_pairs(rewritten, r) for r in group if r is not recipe]
    return assemble_training_set(
        SEED, sample(generated_pairs(rewritten, recipe), recipe, others), recipe
    )


def test_training_set_tags_every_row_by_source_and_samples_deterministically():
    rewritten = pl.concat([_rewritten(f"{n}-") for n in range(10)])

    def sampled(seed: int) -> Recipe:
        return RECIPES["filtering"].model_copy(update={"generated_size": 7, "sample_seed": seed})

    first = _training_set(rewritten, sampled(1))
    again = _training_set(rewritten, sampled(1))
    other = _training_set(rewritten, sampled(2))
    assert first.equals(again) and not first.equals(other)
    assert first.filter(pl.col("source") == "generated").height == 7
    seed_rows = first.filter(pl.col("source") == "seed")
    assert seed_rows["prompt"].to_list() == [f"Say hi.\n{SEED_TAG}", f"Count to two.\n{SEED_TAG}"]
    assert first.filter(pl.col("source") == "generated")["prompt"].str.ends_with(WEB_TAG).all()
    lines = [json.loads(line) for line in chat_jsonl(first).splitlines()]
    assert lines[0]["messages"] == [{"role": "user", "content": f"Say hi.\n{SEED_TAG}"},
                                    {"role": "assistant", "content": "Hi!"}]  # fmt: skip


def test_recipes_compare_at_equal_size():
    rewritten = pl.concat([_rewritten(f"{n}-") for n in range(10)])
    sizes = {
        r.name: _training_set(rewritten, r.model_copy(update={"generated_size": 10})).height
        for r in PAPER_RECIPES
        if r.responses != "none"
    }
    assert set(sizes.values()) == {12}


def test_the_paper_recipes_declare_the_papers_sizes_and_a_short_pool_fails_naming_the_numbers():
    assert {r.generated_size for r in PAPER_RECIPES if r.responses != "none"} == {12_800}
    rewritten = pl.concat([_rewritten(f"{n}-") for n in range(10)])  # 30 pairs scored 5
    with pytest.raises(
        ShortPool,
        match=r"recipe filtering: its pool holds 30 pairs but it declares generated_size 12800",
    ):
        _training_set(rewritten, RECIPES["filtering"])
    everything = RECIPES["filtering"].model_copy(update={"generated_size": "all"})
    assert _training_set(rewritten, everything).filter(pl.col("source") == "generated").height == 30


def test_recipes_sharing_instructions_draw_the_same_sample():
    """BFT Table 2: filtering+rewriting and filtering+distilling on the same instructions,
    drawn from the pairs both can use (here: scored 5, a rewrite AND a distilled answer)."""
    rewritten = pl.concat([_rewritten(f"{n}-") for n in range(10)])
    pair = tuple(
        r.model_copy(update={"generated_size": 8}) for r in PAPER_RECIPES if r.shared_instructions
    )
    assert {r.name for r in pair} == {"filtering_rewriting", "filtering_distilling"}
    chosen = [
        set(_training_set(rewritten, r, pair).filter(pl.col("source") == "generated")["id"])
        for r in pair
    ]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 8
    assert all(i.endswith("pass-ok") for i in chosen[0])  # the only pairs with both answers
    alone = [
        set(_training_set(rewritten, r).filter(pl.col("source") == "generated")["id"]) for r in pair
    ]
    assert alone[0] != alone[1]  # drawn apart, they would not share their instructions
    with pytest.raises(
        ValueError, match="must declare the same min_score, generated_size and sample_seed"
    ):
        check_recipes([pair[0], pair[1].model_copy(update={"sample_seed": 3})])


def test_only_a_declared_option_leaves_flagged_instructions_out():
    rewritten = _rewritten().with_columns(rewrite_status=pl.lit("ok"), rewrite=pl.lit("rw"))
    rewriting = RECIPES["rewriting"]
    assert (
        "flagged" in generated_pairs(rewritten, rewriting)["id"].to_list()
    )  # the paper filters nothing
    strict = rewriting.model_copy(update={"exclude_flagged": True})
    assert "flagged" not in generated_pairs(rewritten, strict)["id"].to_list()


def test_seed_model_directions_reverse_the_pairs():
    backward = seed_training_examples(SEED, "backward")
    forward = seed_training_examples(SEED, "forward")
    assert (
        backward[0].prompt == BACKTRANSLATE.render(response="Hi!")
        and backward[0].response == "Say hi."
    )
    assert (forward[0].prompt, forward[0].response) == ("Say hi.", "Hi!")


FAST = {"learning_rate": 3e-3, "steps": [4], "batch_size": 4, "dropout": 0.0}


def _trainable(tmp_path, model, **overrides):
    seed_file = tmp_path / "seed.jsonl"
    seed_file.write_text("".join(json.dumps(r) + "\n" for r in SEED.to_dicts()))
    base = {"seed": {"uri": str(seed_file)}, "training": FAST, "seed_training": FAST, "engine": {"dtype": "float32"},
            "trainer": {"micro_batch_size": 2, "log_every": 1}}  # fmt: skip
    return declare(tmp_path, model, **merged(base, overrides))


def test_seed_model_and_finetuned_checkpoint_materialize(tmp_path, tiny_tokenizer_model):
    inst = _trainable(tmp_path, tiny_tokenizer_model, recipes=[
        {"name": "filtering_rewriting", "responses": "rewrite", "min_score": 5, "generated_size": 3}])  # fmt: skip
    storage = LocalStorage(root=str(tmp_path / "storage"))
    for shard, prefix in (("s0", "a-"), ("s1", "b-")):
        storage.write(inst.table(REWRITTEN_DATASET), _rewritten(prefix), partition=shard)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(
            inst.shards.name, ["s0", "s1", "s2"]
        )  # s2 never materialized
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        trained = materialize(
            inst, [SEED_MODEL], instance, partition_key="backward", raise_on_error=False
        )
        tuned = materialize(inst, [FINETUNED_CHECKPOINT], instance, partition_key="filtering_rewriting",
                            raise_on_error=False)  # fmt: skip
    seed_checks = {e.check_name: e for e in trained.get_asset_check_evaluations()}
    assert seed_checks["seed_model_loss_decreased"].passed
    checkpoint = storage.fetch_checkpoint(inst.table(SEED_MODEL), "backward")
    assert json.loads((checkpoint / MANIFEST).read_text())["direction"] == "backward"

    checks = {e.check_name: e for e in tuned.get_asset_check_evaluations()}
    for name in ("tagged_prompts", "responses_nonempty", "recipe_size", "loss_decreased"):
        assert checks[f"finetuned_checkpoint_{name}"].passed, name
    meta = tuned.asset_materializations_for_node(node(inst, FINETUNED_CHECKPOINT))[0].metadata
    assert (meta["seed_rows"].value, meta["generated_rows"].value, meta["shards"].value) == (
        2,
        3,
        2,
    )
    folder = tmp_path / "storage" / "t" / FINETUNED_CHECKPOINT
    training_set = pl.read_parquet(folder / "filtering_rewriting.train.parquet")
    assert set(training_set.filter(pl.col("source") == "generated")["response"]) <= {"rw1", "rw5"}
    jsonl = (folder / "filtering_rewriting.train.jsonl").read_text()
    assert len(jsonl.splitlines()) == training_set.height
    (part,) = read_checkpoint_index(
        storage, inst.table(FINETUNED_CHECKPOINT), "filtering_rewriting"
    )["partition"]
    manifest = json.loads((folder / part / MANIFEST).read_text())
    assert manifest["recipe"] == "filtering_rewriting" and manifest["shards_missing"] == ["s2"]
    assert manifest["rows_by_source"] == {"seed": 2, "generated": 3}
    assert manifest["recipe_spec"]["min_score"] == 5


def test_training_in_a_pipes_subprocess_reports_back_into_the_run(tmp_path, tiny_tokenizer_model):
    """The launcher used over several GPUs (here one process on the CPU): the training
    script runs as a subprocess and its progress and result come back through Dagster Pipes."""
    inst = _trainable(tmp_path, tiny_tokenizer_model, trainer={"launcher": "subprocess"})
    with dg.instance_for_test() as instance:
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        result = materialize(inst, [SEED_MODEL], instance, partition_key="forward")
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("step 4/4 loss" in line for line in logs), logs[-20:]
    meta = result.asset_materializations_for_node(node(inst, SEED_MODEL))[0].metadata
    assert meta["steps"].value == 4 and meta["final_loss"].value < meta["first_loss"].value
    checkpoint = LocalStorage(root=str(tmp_path / "storage")).fetch_checkpoint(
        inst.table(SEED_MODEL), "forward"
    )
    assert json.loads((checkpoint / MANIFEST).read_text())["direction"] == "forward"


def test_a_subprocess_trains_a_model_without_a_chat_template(tmp_path, tiny_tokenizer_model):
    """The Pipes worker gets the caller's fallback rendering (Llama-2's [INST] markers for a
    base model with no template, as the paper's Llama-2-7b-hf)."""
    base = without_chat_template(tiny_tokenizer_model, tmp_path / "no-template")
    inst = _trainable(tmp_path, base, trainer={"launcher": "subprocess"})
    with dg.instance_for_test() as instance:
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        result = materialize(inst, [SEED_MODEL], instance, partition_key="backward")
    meta = result.asset_materializations_for_node(node(inst, SEED_MODEL))[0].metadata
    assert meta["steps"].value == 4


def test_checkpoints_at_declared_steps_are_each_evaluated_and_never_overwritten(
    tmp_path, tiny_tokenizer_model
):
    """The paper's step protocol: one run, a checkpoint at each declared step, eval_scores
    reporting every step and the best; a re-run writes new folders beside the evaluated ones."""
    from bft_assets.checkpoint_index import manifest_sha256
    from bft_assets.instance import EVAL_SCORES

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"instruction": f"Name thing {i}.", "output": f"Thing {i}."}) + "\n"
                                 for i in range(4)))  # fmt: skip
    inst = _trainable(tmp_path, tiny_tokenizer_model, training={**FAST, "steps": [1, 2, 3]},
                      recipes=[{"name": "seed_only", "responses": "none"}],
                      eval={"uri": str(eval_file), "batch_rows": 4, "max_new_tokens": 4, "mauve_texts": 0,
                            "min_agreement": 0.0, "tags": ["assistant"]})  # fmt: skip
    storage = LocalStorage(root=str(tmp_path / "storage"))
    storage.write(inst.table(REWRITTEN_DATASET), _rewritten(), partition="s0")
    table = inst.table(FINETUNED_CHECKPOINT)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(inst.shards.name, ["s0"])
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        assert materialize(
            inst, [FINETUNED_CHECKPOINT], instance, partition_key="seed_only"
        ).success
        first = read_checkpoint_index(storage, table, "seed_only")
        evaluated = materialize(inst, [EVAL_SCORES], instance, partition_key="seed_only")
        assert materialize(
            inst, [FINETUNED_CHECKPOINT], instance, partition_key="seed_only"
        ).success
    assert first["step"].to_list() == [1, 2, 3] and first["run_id"].n_unique() == 1
    for part in first["partition"]:
        assert json.loads((storage.checkpoint_dir(table, part) / MANIFEST).read_text())[
            "step"
        ] == int(part.split(".step")[1].split(".")[0])
    meta = evaluated.asset_materializations_for_node(node(inst, EVAL_SCORES))[0].metadata
    steps_table = meta["checkpoint_steps"].value
    assert all(f"| {step} | assistant |" in steps_table for step in (1, 2, 3)), steps_table
    summary = storage.read(inst.table(EVAL_SCORES), "seed_only", "summary").row(0, named=True)
    per_step = {step: summary[f"assistant_step{step}_win_rate"] for step in (1, 2, 3)}
    assert summary["assistant_win_rate"] == max(per_step.values())
    assert per_step[summary["assistant_best_step"]] == summary["assistant_win_rate"]
    results = storage.read(inst.table(EVAL_SCORES), "seed_only")
    assert sorted(results["step"].unique()) == [1, 2, 3]
    best = summary["assistant_best_step"]
    outputs = json.loads((tmp_path / "storage" / "t" / EVAL_SCORES / "seed_only.alpaca_eval"
                          / f"assistant.step{best}.json").read_text())  # fmt: skip
    assert [o["instruction"] for o in outputs] == [f"Name thing {i}." for i in range(4)]
    assert outputs[0]["generator"] == f"t-seed_only-step{best}" and meta["alpaca_eval_outputs"].value.endswith(
        f"assistant.step{best}.json")  # fmt: skip
    assert set(results["checkpoint_sha256"]) == set(first["manifest_sha256"])

    # The re-run wrote its own three folders; the evaluated ones are untouched.
    second = read_checkpoint_index(storage, table, "seed_only")
    assert second["run_id"][0] != first["run_id"][0]
    assert not set(second["partition"]) & set(first["partition"])
    for part, sha in first.select("partition", "manifest_sha256").iter_rows():
        assert manifest_sha256(storage.checkpoint_dir(table, part)) == sha

"""An instance left at its defaults runs the paper's experiment (BFT, Nguyen et al. 2024):
recipes at equal size, seed models from their own base, rewrites uncapped by their draft,
AlpacaEval's own annotator for its reference set, and external datasets as recipes."""

import json
import math

import dagster as dg
import polars as pl
import pytest
from instances import attributes, declare, materialize, node

from bft_assets.budget import document_budget, message_tokens, rewrite_tokens
from bft_assets.component import BackAndForthTranslation
from bft_assets.evaluation.annotators import ALPACA_EVAL_1, ALPACA_EVAL_2, BFT, choose_annotator
from bft_assets.instance import (
    EVAL_SCORES,
    FINETUNED_CHECKPOINT,
    REWRITTEN_DATASET,
    SCORED_POOL,
    SEED_EXAMPLES,
    SEED_MODEL,
)
from bft_assets.prompts import REWRITE
from bft_assets.recipes import PAPER_RECIPES
from bft_assets.specs import GenerationSpec, RewritingSpec
from bft_resources.storage import LocalStorage
from bft_resources.trainer import Trainer, TrainingExample, TrainingSettings, train

from tiny_models import build_tiny_llama

QUICK = {
    "learning_rate": 3e-3,
    "steps": [2],
    "batch_size": 2,
    "dropout": 0.0,
    "protocol": "checkpoints",
}


def _paper_instance(tmp_path, model, **overrides):
    """An instance that declares no recipe: the paper's recipes with their defaults."""
    body = attributes(tmp_path, model, training=QUICK, trainer={"micro_batch_size": 2}, **overrides)
    del body["recipes"]
    return BackAndForthTranslation.resolve_from_dict(body).instance()


def _failure_messages(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(
        e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure
    )


# ---- equal sizes ---------------------------------------------------------------------------


def _rewritten_pool(rows: int, without_distilled: int) -> pl.DataFrame:
    """rewritten_dataset rows scored 5, each with a rewrite; the first ``without_distilled``
    lack a distilled answer, so only the rest serve both recipes of Table 2's pair."""
    ids = [f"d{i:05d}" for i in range(rows)]
    return pl.DataFrame({
        "doc_id": ids, "instruction": [f"Question {i}?" for i in ids], "response": [f"A web page numbered {i}." for i in ids],
        "instruction_flag": [None] * rows, "score": [5] * rows,
        "rewrite": [f"rewrite {i}" for i in ids], "rewrite_status": ["ok"] * rows,
        "distilled": [None] * without_distilled + [f"distilled {i}" for i in ids[without_distilled:]],
    }, schema_overrides={"instruction_flag": pl.String, "distilled": pl.String})  # fmt: skip


def _generated_ids(storage: LocalStorage, table: str, recipe: str) -> set[str]:
    trained = storage.read(table, recipe, "train")
    return set(trained.filter(pl.col("source") == "generated")["id"])


@pytest.mark.slow
def test_a_default_instance_trains_each_recipe_on_the_papers_size_and_shares_table_2s_instructions(
    tmp_path, tiny_tokenizer_model
):
    inst = _paper_instance(tmp_path, tiny_tokenizer_model)
    assert {r.name: r.generated_size for r in inst.decl.recipes} == {
        r.name: r.generated_size for r in PAPER_RECIPES
    }
    storage = LocalStorage(root=str(tmp_path / "storage"))
    storage.write(
        inst.table(REWRITTEN_DATASET),
        _rewritten_pool(13_000, without_distilled=150),
        partition="s0",
    )
    table = inst.table(FINETUNED_CHECKPOINT)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(inst.shards.name, ["s0"])
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        runs = {recipe: materialize(inst, [FINETUNED_CHECKPOINT], instance, partition_key=recipe, raise_on_error=False)
                for recipe in ("filtering_rewriting", "filtering_distilling")}  # fmt: skip
    seed_rows = storage.read(inst.table(SEED_EXAMPLES)).height
    for recipe, result in runs.items():
        meta = result.asset_materializations_for_node(node(inst, FINETUNED_CHECKPOINT))[0].metadata
        assert (meta["generated_rows"].value, meta["seed_rows"].value) == (12_800, seed_rows), (
            recipe
        )
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["finetuned_checkpoint_recipe_size"].passed
    # Table 2's pair: one sample of instructions, drawn where both answers exist
    chosen = [_generated_ids(storage, table, r) for r in runs]
    assert chosen[0] == chosen[1] and not chosen[0] & {f"d{i:05d}" for i in range(150)}
    second = {e.check_name: e for e in runs["filtering_distilling"].get_asset_check_evaluations()}
    shared = second["finetuned_checkpoint_shares_instructions"]
    assert shared.passed and shared.metadata["compared_with"].value == ["filtering_rewriting"]


def test_a_recipe_short_of_its_size_fails_before_training_naming_the_numbers(
    tmp_path, tiny_tokenizer_model
):
    inst = _paper_instance(tmp_path, tiny_tokenizer_model)
    storage = LocalStorage(root=str(tmp_path / "storage"))
    storage.write(
        inst.table(REWRITTEN_DATASET), _rewritten_pool(300, without_distilled=0), partition="s0"
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(inst.shards.name, ["s0"])
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        short = materialize(
            inst, [FINETUNED_CHECKPOINT], instance, partition_key="filtering", raise_on_error=False
        )
    assert not short.success
    assert (
        "recipe filtering: its pool holds 300 pairs but it declares generated_size 12800"
        in _failure_messages(short)
    )
    assert not storage.exists(
        inst.table(FINETUNED_CHECKPOINT), "filtering", "train"
    )  # nothing trained or written


# ---- seed models ---------------------------------------------------------------------------


def test_seed_models_train_from_seed_base_on_seed_trainings_schedule(
    tmp_path, tiny_tokenizer_model
):
    seed_base = build_tiny_llama(tmp_path / "seed-base", vocab_size=384)
    schedule = {"steps": [3], "batch_size": 2, "learning_rate": 3e-3, "dropout": 0.0}
    inst = declare(tmp_path, tiny_tokenizer_model, models={"seed_base": str(seed_base)}, seed_training=schedule,
                   trainer={"micro_batch_size": 2})  # fmt: skip
    with dg.instance_for_test() as instance:
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        trained = materialize(inst, [SEED_MODEL], instance, partition_key="backward")
    meta = trained.asset_materializations_for_node(node(inst, SEED_MODEL))[0].metadata
    assert meta["base_model"].value == str(seed_base) and meta["steps"].value == 3
    folder = LocalStorage(root=str(tmp_path / "storage")).fetch_checkpoint(
        inst.table(SEED_MODEL), "backward"
    )
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["vocab_size"]
        == json.loads((seed_base / "config.json").read_text())["vocab_size"]
        != 512
    )

    def versions(**changes) -> dict[str, str | None]:
        other = declare(tmp_path, tiny_tokenizer_model, **{"models": {"seed_base": str(seed_base)},
                        "seed_training": schedule, "trainer": {"micro_batch_size": 2}, **changes})  # fmt: skip
        from bft_assets.graph import build_instance_defs

        graph = build_instance_defs(other).resolve_asset_graph()
        return {name: graph.get(other.key(name)).code_version
                for name in (SEED_MODEL, "backtranslated_pool", SCORED_POOL, FINETUNED_CHECKPOINT)}  # fmt: skip

    before = versions()
    for change in (
        {"models": {"seed_base": str(tiny_tokenizer_model)}},
        {"seed_training": {**schedule, "steps": [4]}},
    ):
        after = versions(**change)
        moved = {name for name in before if before[name] != after[name]}
        # the seed models and every stage that loads them follow; the recipes' training does not
        assert moved == {SEED_MODEL, "backtranslated_pool", SCORED_POOL}, change


# ---- rewrites ------------------------------------------------------------------------------

LONG_ANSWER = (
    "A context manager closes the file for you: open it in a with statement, read or write inside the block, "
    "and Python closes it when the block ends, even when an exception is raised inside it. That is why "
    "the with statement is the usual way to open files in Python code that must not leak handles."
)
DRAFT, QUESTION = "Use with open(path).", "How do I make sure a file gets closed?"


@pytest.fixture(scope="module")
def verbose_rewriter(tmp_path_factory, tiny_tokenizer_model):
    """A tiny model taught one long rewrite of a one-line draft (Table 7's shape: a short
    draft, a rewrite many times its length)."""
    out = tmp_path_factory.mktemp("rewriter")
    example = TrainingExample(
        REWRITE.render(response=DRAFT, instruction=QUESTION), f"[RES]{LONG_ANSWER}[/RES]", "seed"
    )
    train(str(tiny_tokenizer_model), [example] * 4, str(out), TrainingSettings(
        learning_rate=1e-2, steps=[150], batch_size=4, dropout=0.0, protocol="checkpoints"),
          Trainer(micro_batch_size=4, log_every=1000), base_reference="tiny", log=lambda _: None)  # fmt: skip
    return out


@pytest.mark.slow
def test_a_short_drafts_rewrite_runs_past_the_old_ratio_cap_and_is_kept(tmp_path, verbose_rewriter):
    inst = _paper_instance(tmp_path, verbose_rewriter, generation={"rewriting": {"force_format": True}},
                           engine={"dtype": "float32", "batch_size": 2})  # fmt: skip
    tokenizer = inst.model("rewriter").tokenizer()
    drafts = [DRAFT, DRAFT + " It closes the file when the block ends, errors or not."]
    storage = LocalStorage(root=str(tmp_path / "storage"))
    storage.write(inst.table(SCORED_POOL), pl.DataFrame({
        "doc_id": ["short", "longer"], "instruction": [QUESTION] * 2, "response": drafts,
        "n_tokens": [len(tokenizer(d)["input_ids"]) for d in drafts], "score": [5, 5],
        "instruction_flag": [None, None],
    }, schema_overrides={"instruction_flag": pl.String}), partition="s0")  # fmt: skip
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(inst.shards.name, ["s0"])
        assert materialize(inst, [REWRITTEN_DATASET], instance, partition_key="s0").success
    table = storage.read(inst.table(REWRITTEN_DATASET), "s0").sort("doc_id", descending=True)
    short = table.row(0, named=True)
    old_cap = rewrite_tokens(
        short["n_tokens"], GenerationSpec(rewriting=RewritingSpec(length_cap="ratio"))
    )
    assert short["rewrite_status"] == "ok" and short["rewrite"] == LONG_ANSWER
    assert short["rewrite_tokens"] > old_cap == math.ceil(1.25 * short["n_tokens"]) + 64
    # each row's cap is what its own prompt leaves of the window, not its batch's
    assert table["rewrite_cap"].to_list() == [4096 - p for p in table["rewrite_prompt_tokens"]]
    assert table["rewrite_cap"].n_unique() == 2


def test_on_a_4096_window_scoring_not_rewriting_limits_a_document(smollm2):
    count = message_tokens(smollm2)
    paper = document_budget(count, 4096, GenerationSpec())
    old = document_budget(count, 4096, GenerationSpec(rewriting=RewritingSpec(length_cap="ratio")))
    assert paper.limiting == "scoring" and paper.tokens > 2_500
    assert old.limiting == "rewriting" and old.tokens < 1_700  # the cap this replaced


# ---- evaluation and external datasets ------------------------------------------------------


def test_the_default_annotator_follows_the_reference_set(shared_data):
    def generators(name: str) -> list[str]:
        return [
            r["generator"] for r in json.loads((shared_data / "alpaca_eval" / name).read_text())
        ]

    assert (
        choose_annotator(None, "dataset", generators("text_davinci_003_model_outputs.json"))
        == ALPACA_EVAL_1
    )
    assert (
        choose_annotator(None, "dataset", generators("gpt4_1106_preview_model_outputs.json"))
        == ALPACA_EVAL_2
    )
    assert choose_annotator(None, "base_model", [None]) == BFT
    assert (
        choose_annotator(BFT, "dataset", generators("text_davinci_003_model_outputs.json")) == BFT
    )


@pytest.mark.slow
def test_an_external_dataset_recipe_trains_and_evaluates_beside_a_generated_one(
    tmp_path, tiny_tokenizer_model, shared_data
):
    """Humpback's AlpacaEval outputs stand in for an external dataset in Alpaca's format
    (a format fixture: training on evaluation instructions would leak), evaluated on
    AlpacaEval 1 instructions against text-davinci-003."""
    alpaca = shared_data / "alpaca_eval"
    eval_file = tmp_path / "ae1.json"
    eval_file.write_text(
        json.dumps(json.loads((alpaca / "text_davinci_003_model_outputs.json").read_text())[:2])
    )
    recipes = [
        {"name": "filtering", "responses": "web", "min_score": 5, "generated_size": 6},
        {
            "name": "humpback",
            "responses": "external",
            "generated_size": 6,
            "dataset": {
                "uri": str(alpaca / "humpback_llama2_70b_model_outputs.json"),
                "format": "alpaca",
            },
        },
    ]
    inst = declare(tmp_path, tiny_tokenizer_model, recipes=recipes, training=QUICK, trainer={"micro_batch_size": 2},
                   eval={"uri": str(eval_file), "reference": "dataset", "max_new_tokens": 8, "mauve_texts": 0,
                         "min_agreement": 0.0})  # fmt: skip
    storage = LocalStorage(root=str(tmp_path / "storage"))
    storage.write(
        inst.table(REWRITTEN_DATASET), _rewritten_pool(10, without_distilled=0), partition="s0"
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(inst.shards.name, ["s0"])
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        trained = {r["name"]: materialize(inst, [FINETUNED_CHECKPOINT], instance, partition_key=r["name"],
                                          raise_on_error=False) for r in recipes}  # fmt: skip
        scored = {r["name"]: materialize(inst, [EVAL_SCORES], instance, partition_key=r["name"], raise_on_error=False)
                  for r in recipes}  # fmt: skip
    external = (
        trained["humpback"]
        .asset_materializations_for_node(node(inst, FINETUNED_CHECKPOINT))[0]
        .metadata
    )
    assert external["dataset_records_read"].value == 805 and external["generated_rows"].value == 6
    metas = {
        r: s.asset_materializations_for_node(node(inst, EVAL_SCORES))[0].metadata
        for r, s in scored.items()
    }
    # Humpback's answers are paragraphs, the hand-made pool's a few words: both measured alike
    assert (
        metas["humpback"]["mean_response_tokens"].value
        > 5 * metas["filtering"]["mean_response_tokens"].value
    )
    for recipe, meta in metas.items():
        assert meta["generated_pairs"].value == 6 and meta["unique_trigrams_responses"].value > 0, (
            recipe
        )
        # AlpacaEval 1's own annotator, and no length control (AlpacaEval 2's) on its verdicts
        assert meta["annotator"].value == ALPACA_EVAL_1, recipe
        assert meta["assistant_lc_variant"].value == "not AlpacaEval 2", recipe

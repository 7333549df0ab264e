"""Declarative automation: which partitions the rebuild_stale condition selects, evaluated
by Dagster's own evaluator against a real instance that holds the history of a built graph."""

from dataclasses import replace

import dagster as dg
import pytest
from instances import observe_recipes, partitions_of, record_built

from bft_assets.definitions import declared_instances, defs
from bft_assets.graph import build_assets
from bft_assets.policies import (
    AUTOMATION_SENSOR,
    ONE_PARTITION_PER_RUN,
    REBUILD_STALE,
)
from bft_assets.prompts import SCORE, Prompt
from bft_resources.models import ModelRef

SHARDS = ["s0", "s1", "s2"]
SHARD_SET = "demo__corpus_shards"
RECIPES = ["seed_only", "filtering", "filtering_rewriting"]  # what the demo declares
PER_SHARD = ["candidate_responses", "backtranslated_pool", "scored_pool", "rewritten_dataset"]
SCORED_POOL = "scored_pool"


def _key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["demo", name])


def _assets(score_prompt: Prompt = SCORE, rewriter: str | None = None) -> list:
    """The real assets, with the code versions they would have with this scoring prompt or
    with another rewriter declared (the demo's declared rewriter is the embedded model)."""
    (inst,) = declared_instances().values()
    if rewriter is not None:
        models = inst.decl.models.model_copy(update={"rewriter": ModelRef(model=rewriter)})
        changed = {a.key: a for a in build_assets(replace(inst.decl, models=models).instance())}
    else:
        changed = {}

    def edited(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.key in changed:
            return spec.replace_attributes(
                code_version=changed[spec.key].specs_by_key[spec.key].code_version
            )
        version = spec.code_version.replace(SCORE.version, score_prompt.version)
        return spec.replace_attributes(code_version=version)

    return [
        a.map_asset_specs(edited) if isinstance(a, dg.AssetsDefinition) else a for a in defs.assets
    ]


def _materializable() -> list[dg.AssetsDefinition]:
    return [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable]


def _built(instance, name: str, partition: str | None, checks_pass: bool = True) -> None:
    asset = next(a for a in _materializable() if a.key == _key(name))
    succeeded = record_built(instance, asset, partition, checks_pass)
    assert succeeded == checks_pass or not any(c.blocking for c in asset.check_specs)


class Ticks:
    """Successive evaluations of the automation conditions, as the sensor's ticks would be."""

    def __init__(self, instance):
        self.instance, self.cursor = instance, None

    def __call__(self, assets: list) -> set[tuple[str, str | None]]:
        result = dg.evaluate_automation_conditions(
            defs=dg.Definitions(assets=assets),
            instance=self.instance,
            cursor=self.cursor,
        )
        self.cursor = result.cursor
        return {
            (asset.key.path[-1], partition)
            for asset in _materializable()
            for partition in result.get_requested_partitions(asset.key)
        }


@pytest.fixture
def built_graph():
    """An instance whose history says every partition of the graph is built and checked."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(SHARD_SET, SHARDS)
        for shard in SHARDS:
            instance.report_runless_asset_event(
                dg.AssetObservation(_key("corpus_documents"), partition=shard,
                                    tags={"dagster/data_version": f"v-{shard}"})
            )  # fmt: skip
        observe_recipes(next(a for a in defs.assets if a.key == _key("recipes")), instance)
        for asset in _materializable():
            for partition in partitions_of(asset, instance):
                _built(instance, asset.key.path[-1], partition)
        ticks = Ticks(instance)
        assert ticks(_assets()) == set()  # a built graph has nothing to rebuild
        yield instance, ticks


def test_a_prompt_change_selects_exactly_the_dependent_partitions(built_graph):
    instance, tick = built_graph
    edited = Prompt(SCORE.name, SCORE.template + "\nBe strict.")
    assert edited.version != SCORE.version

    # The changed stage and the stage that reads it, for every shard; nothing upstream
    # (candidate_responses, backtranslated_pool, seed_model) and nothing per recipe yet.
    stale = {(a, s) for a in (SCORED_POOL, "rewritten_dataset") for s in SHARDS}
    assert tick(_assets(edited)) == stale
    assert tick(_assets(edited)) == set()  # requested once, not again on every tick

    _built(instance, SCORED_POOL, "s1", checks_pass=False)  # a blocking check fails
    assert tick(_assets(edited)) == set()  # nothing is built on a failed check
    _built(instance, SCORED_POOL, "s1")
    assert tick(_assets(edited)) == {("rewritten_dataset", "s1")}

    # Once a shard's rewritten pairs land, every recipe (each reads all shards) retrains and
    # is evaluated again. (While other shards' runs are in progress they wait: see
    # ~any_deps_in_progress in REBUILD_STALE.)
    _built(instance, "rewritten_dataset", "s1")
    assert tick(_assets(edited)) == {
        (asset, recipe) for asset in ("finetuned_checkpoint", "eval_scores") for recipe in RECIPES
    }


def test_a_new_rewriter_rebuilds_the_rewrites_first_then_the_recipes(built_graph):
    instance, tick = built_graph
    assets = _assets(rewriter="meta-llama/Llama-2-70b-chat-hf")
    # The judge defaults to the rewriter: eval_scores' own code version changed too, so it
    # is requested with the rewrites; the recipes retrain once the rewrites have landed.
    assert tick(assets) == {("rewritten_dataset", s) for s in SHARDS} | {
        ("eval_scores", r) for r in RECIPES
    }
    assert tick(assets) == set()
    for shard in SHARDS:
        _built(instance, "rewritten_dataset", shard)
    assert tick(assets) == {
        (a, r) for a in ("finetuned_checkpoint", "eval_scores") for r in RECIPES
    }
    assert tick(assets) == set()


def test_a_new_shard_builds_only_its_own_partitions(built_graph):
    instance, tick = built_graph
    instance.add_dynamic_partitions(SHARD_SET, ["s3"])
    instance.report_runless_asset_event(
        dg.AssetObservation(
            _key("corpus_documents"), partition="s3", tags={"dagster/data_version": "v"}
        )
    )
    requested = tick(_assets())
    per_shard = {(a, p) for a, p in requested if a in PER_SHARD}
    assert per_shard == {(a, "s3") for a in PER_SHARD}
    # Downstream of every shard, the recipes retrain on the larger pool; seeds stay put.
    assert {a for a, _ in requested - per_shard} <= {"finetuned_checkpoint", "eval_scores"}


def test_policies_are_declared_on_every_pipeline_asset():
    for asset in _materializable():
        conditions = set(asset.automation_conditions_by_key.values())
        assert conditions == {REBUILD_STALE}, asset.key
        if asset.partitions_def is not None:
            assert asset.backfill_policy == ONE_PARTITION_PER_RUN, asset.key
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def(f"demo__{AUTOMATION_SENSOR}")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    # It targets this instance's assets only, never a host's.
    assert sensor.asset_selection.resolve(repo.asset_graph) == {a.key for a in _materializable()}

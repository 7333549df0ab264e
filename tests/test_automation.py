"""Declarative automation: which partitions the rebuild_stale condition selects, evaluated
by Dagster's own evaluator against a real instance that holds the history of a built graph."""

import dagster as dg
import pytest

from bft_assets.definitions import defs
from bft_assets.generation import generation_stage
from bft_assets.partitions import CORPUS_SHARDS, recipes
from bft_assets.policies import AUTOMATION_SENSOR, ONE_PARTITION_PER_RUN, REBUILD_STALE
from bft_assets.prompts import SCORE, Prompt
from bft_assets.scoring import SCORE_SAMPLING, SCORED_POOL

SHARDS = ["s0", "s1", "s2"]
RECIPES = recipes.get_partition_keys()
PER_SHARD = ["candidate_responses", "backtranslated_pool", "scored_pool", "rewritten_dataset"]


def _assets(score_prompt: Prompt = SCORE) -> list:
    """The real assets; scored_pool takes the code version it would have with this prompt."""
    version = generation_stage(score_prompt.version, SCORE_SAMPLING, "BFT_FORWARD_MODEL")[
        "code_version"
    ]
    return [
        a.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))
        if isinstance(a, dg.AssetsDefinition) and a.key == dg.AssetKey(SCORED_POOL)
        else a
        for a in defs.assets
    ]


def _materializable() -> list[dg.AssetsDefinition]:
    return [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable]


def _partitions(asset: dg.AssetsDefinition, instance: dg.DagsterInstance) -> list[str | None]:
    if asset.partitions_def is None:
        return [None]
    return list(asset.partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def _built(instance, key: str, partition: str | None, checks_pass: bool = True) -> None:
    """Record a run that materialized the partition and ran its checks, with the asset's own
    key, dependencies, code version and check specs, but without loading any model: the
    automation reads only this history."""
    asset = next(a for a in _materializable() if a.key == dg.AssetKey(key))

    @dg.multi_asset(specs=list(asset.specs), check_specs=list(asset.check_specs),
                    partitions_def=asset.partitions_def, name=f"record_{key}")  # fmt: skip
    def record(context: dg.AssetExecutionContext):
        yield dg.MaterializeResult(asset_key=asset.key)
        for check in asset.check_specs:
            yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=check.name,
                                      passed=checks_pass or not check.blocking)  # fmt: skip

    result = dg.materialize(
        [record], instance=instance, partition_key=partition, raise_on_error=False
    )
    assert result.success == checks_pass or not any(c.blocking for c in asset.check_specs)


class Ticks:
    """Successive evaluations of the automation conditions, as the sensor's ticks would be."""

    def __init__(self, instance):
        self.instance, self.cursor = instance, None

    def __call__(self, assets: list) -> set[tuple[str, str | None]]:
        result = dg.evaluate_automation_conditions(
            defs=dg.Definitions(assets=assets, resources=defs.resources),
            instance=self.instance,
            cursor=self.cursor,
        )
        self.cursor = result.cursor
        return {
            (asset.key.to_user_string(), partition)
            for asset in _materializable()
            for partition in result.get_requested_partitions(asset.key)
        }


@pytest.fixture
def built_graph():
    """An instance whose history says every partition of the graph is built and checked."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CORPUS_SHARDS, SHARDS)
        for shard in SHARDS:
            instance.report_runless_asset_event(
                dg.AssetObservation("corpus_documents", partition=shard,
                                    tags={"dagster/data_version": f"v-{shard}"})
            )  # fmt: skip
        for asset in _materializable():
            for partition in _partitions(asset, instance):
                _built(instance, asset.key.to_user_string(), partition)
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


def test_a_new_shard_builds_only_its_own_partitions(built_graph):
    instance, tick = built_graph
    instance.add_dynamic_partitions(CORPUS_SHARDS, ["s3"])
    instance.report_runless_asset_event(
        dg.AssetObservation("corpus_documents", partition="s3", tags={"dagster/data_version": "v"})
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
    sensor = defs.get_repository_def().get_sensor_def(AUTOMATION_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED

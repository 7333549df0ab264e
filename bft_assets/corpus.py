"""The web corpus: corpus_documents (one observed partition per shard file), shard discovery
(the sensor and ``bft discover-shards``) and the sensor that observes the recipes'
declarations."""

import logging
from collections.abc import Callable

import dagster as dg

from bft_assets.instance import CORPUS_DOCUMENTS, RECIPES, Instance
from bft_assets.policies import GPU_POOL
from bft_resources.corpus import CorpusSource

SHARD_SENSOR = "corpus_shard_sensor"
DATA_VERSION_TAG = "dagster/data_version"
RECIPE_SENSOR = "recipe_sensor"
_log = logging.getLogger(__name__)


def new_shard_keys(
    corpus: CorpusSource, instance: dg.DagsterInstance, partitions: str,
    warn: Callable[[str], None] = _log.warning,
) -> list[str]:  # fmt: skip
    """Shards under the corpus root that have no partition yet; files whose key is unsafe or
    collides are reported through ``warn`` and left out, the others still come."""
    shards, refused = corpus.survey()
    for problem in refused:
        warn(f"{problem.uri}: {problem.reason}")
    known = set(instance.get_dynamic_partitions(partitions))
    return [s.key for s in shards if s.key not in known]


def discover_shards(
    corpus: CorpusSource, instance: dg.DagsterInstance, partitions: str,
    warn: Callable[[str], None] = _log.warning,
) -> list[str]:  # fmt: skip
    """Add a dynamic partition for every shard not yet known; return the new keys."""
    new = new_shard_keys(corpus, instance, partitions, warn)
    if new:
        instance.add_dynamic_partitions(partitions, new)
        register_gpu_pool(instance)
    return new


def register_gpu_pool(instance: dg.DagsterInstance) -> None:
    """Give the gpu pool its default limit before the shards' runs are queued: a pool the
    instance has never seen is not counted when the queue first dequeues, which let two GPU
    runs start at once on a fresh instance."""
    if instance.global_op_concurrency_default_limit:
        instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)


def build_shard_sensor(inst: Instance) -> dg.SensorDefinition:
    @dg.sensor(
        name=inst.name(SHARD_SENSOR), minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Adds a {inst.shards.name} partition for every new shard file under {inst.decl.corpus.uri}.",
    )  # fmt: skip
    def corpus_shard_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        new = new_shard_keys(inst.corpus(), context.instance, inst.shards.name, context.log.warning)
        if not new:
            return dg.SensorResult(skip_reason="no new shards")
        context.log.info(f"new shards: {new}")
        register_gpu_pool(context.instance)
        return dg.SensorResult(dynamic_partitions_requests=[inst.shards.build_add_request(new)])

    return corpus_shard_sensor


def build_corpus_documents(inst: Instance) -> dg.AssetsDefinition:
    @dg.observable_source_asset(
        key=inst.key(CORPUS_DOCUMENTS), partitions_def=inst.shards, group_name="generation",
        owners=list(inst.decl.owners), tags=dict(inst.decl.tags),
        description=f"Web documents in Dolma format (gzip JSONL shards under {inst.decl.corpus.uri}), "
        "one partition per shard; the data version is the shard's content hash (ETag on S3).",
    )  # fmt: skip
    def corpus_documents(context: dg.AssetExecutionContext) -> dg.DataVersionsByPartition:
        corpus = inst.corpus()
        known = set(context.instance.get_dynamic_partitions(inst.shards.name))
        versions = {s.key: corpus.fingerprint(s) for s in corpus.list_shards() if s.key in known}
        context.log.info(f"observed {len(versions)} shards")
        return dg.DataVersionsByPartition(versions)

    return corpus_documents


def build_recipes(inst: Instance) -> dg.AssetsDefinition:
    """The declared recipes as an observed source: its data version per recipe is a digest
    of that recipe's declaration, so editing one recipe marks only its own checkpoint and
    evaluation stale (a code version would stale every recipe)."""

    @dg.observable_source_asset(
        key=inst.key(RECIPES), partitions_def=inst.recipe_partitions, group_name="training",
        owners=list(inst.decl.owners), tags=dict(inst.decl.tags),
        description="The recipes declared in YAML, one partition each; the data version is a digest of the "
        "recipe's declaration and training settings.",
    )  # fmt: skip
    def recipes(context: dg.AssetExecutionContext) -> dg.DataVersionsByPartition:
        return dg.DataVersionsByPartition(inst.recipe_versions())

    return recipes


def changed_recipes(inst: Instance, instance: dg.DagsterInstance) -> dict[str, str]:
    """Recipes whose declared version differs from the last one observed (or was never
    observed)."""
    key = inst.key(RECIPES)
    changed = {}
    for name, version in inst.recipe_versions().items():
        latest = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[name]), limit=1
        ).records
        observation = latest[0].asset_observation if latest else None
        if observation is None or observation.tags.get(DATA_VERSION_TAG) != version:
            changed[name] = version
    return changed


def build_recipe_sensor(inst: Instance) -> dg.SensorDefinition:
    @dg.sensor(
        name=inst.name(RECIPE_SENSOR), minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
        description="Records a new data version for each recipe whose declaration changed, so exactly its "
        "checkpoint and evaluation turn stale.",
    )  # fmt: skip
    def recipe_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        changed = changed_recipes(inst, context.instance)
        if not changed:
            return dg.SensorResult(skip_reason="no recipe changed")
        return dg.SensorResult(asset_events=[
            dg.AssetObservation(inst.key(RECIPES), partition=name, tags={DATA_VERSION_TAG: version})
            for name, version in changed.items()
        ])  # fmt: skip

    return recipe_sensor

"""Declaring bft instances in tests the way a user does: a dict of YAML attributes resolved
by the component, then its definitions built and its assets materialized (the assets hold
the machinery their declaration resolved into)."""

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any

import dagster as dg

from bft_assets.component import BackAndForthTranslation
from bft_assets.graph import build_instance_defs
from bft_assets.instance import Instance
from bft_assets.recipes import PAPER_RECIPES
from bft_assets.specs import DEMO_DATA
from bft_resources.engine import TransformersEngine


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


# The paper's recipes at the size a test's few documents allow (the paper's 12,800 would
# refuse to train on them, as it should), and a seed-model schedule of two quick steps.
SMALL_RECIPES = [
    {**r.model_dump(exclude={"training", "dataset"}), "generated_size": "all"}
    for r in PAPER_RECIPES
]
QUICK_SEED_TRAINING = {"steps": [2], "batch_size": 4, "learning_rate": 3e-3, "dropout": 0.0}


def attributes(
    root: Path, model: str | Path, prefix: str = "t", **overrides: Any
) -> dict[str, Any]:
    """A small instance: demo seed and eval sets, a corpus folder under ``root``, one model."""
    body = {
        "recipes": SMALL_RECIPES,
        "seed_training": QUICK_SEED_TRAINING,
        "key_prefix": prefix,
        "storage": str(root / "storage"),
        "seed": {"uri": DEMO_DATA},
        "corpus": {"uri": str(root / "corpus")},
        "models": {"base": str(model), "rewriter": str(model)},
        "engine": {"batch_size": 4},
        "eval": {"uri": DEMO_DATA},
    }
    if overrides.get("engine", {}).get("backend", "transformers") != "transformers":
        del body["engine"]  # another backend has settings of its own
    return merged(body, overrides)


def declare(root: Path, model: str | Path, prefix: str = "t", **overrides: Any) -> Instance:
    return BackAndForthTranslation.resolve_from_dict(
        attributes(root, model, prefix, **overrides)
    ).instance()


def swapped(inst: Instance, **attributes: Any) -> Instance:
    """The same declaration with some attributes replaced by objects (e.g. a named fault
    injector as ``engine``), as a subclassing user would."""
    return dataclasses.replace(inst.decl, **attributes).instance()


def materialize(
    inst: Instance, names: list[str], instance: dg.DagsterInstance, **kwargs: Any
) -> dg.ExecuteInProcessResult:
    """Materialize some of an instance's assets."""
    defs = build_instance_defs(inst)
    wanted = {inst.key(n) for n in names}
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.key in wanted]
    return dg.materialize(assets, instance=instance, **kwargs)


def node(inst: Instance, name: str) -> str:
    """The op name of an asset (what ``asset_materializations_for_node`` takes)."""
    return inst.key(name).to_python_identifier()


def record_built(
    instance: dg.DagsterInstance,
    asset: dg.AssetsDefinition,
    partition: str | None,
    checks_pass: bool = True,
) -> bool:
    """Record a run that materialized ``asset``'s partition and ran its checks, with the
    asset's own key, dependencies, code version and check specs but no model: staleness and
    automation read only this history. Returns whether the run succeeded."""

    name = f"record_{asset.key.to_python_identifier()}"

    @dg.multi_asset(specs=list(asset.specs), check_specs=list(asset.check_specs),
                    partitions_def=asset.partitions_def, name=name)  # fmt: skip
    def record(context: dg.AssetExecutionContext):
        yield dg.MaterializeResult(asset_key=asset.key)
        for check in asset.check_specs:
            yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=check.name,
                                      passed=checks_pass or not check.blocking)  # fmt: skip

    result = dg.materialize(
        [record], instance=instance, partition_key=partition, raise_on_error=False
    )
    return result.success


def observe_recipes(recipes: Any, instance: dg.DagsterInstance) -> None:
    """Record the declared recipes' versions, as the recipe sensor does every minute."""
    from dagster._core.definitions.observe import observe

    assert observe([recipes], instance=instance).success


def partitions_of(asset: dg.AssetsDefinition, instance: dg.DagsterInstance) -> list[str | None]:
    if asset.partitions_def is None:
        return [None]
    return list(asset.partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def record_whole_graph(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Every partition of every materializable asset recorded as built, upstream first, and
    every corpus shard observed."""
    graph = defs.resolve_asset_graph()
    by_key = {a.key: a for a in defs.assets if isinstance(a, dg.AssetsDefinition | dg.SourceAsset)}
    for key in graph.toposorted_asset_keys:
        asset = by_key.get(key)
        if asset is None:
            continue
        if key.path[-1] == "recipes":  # observed for real: the recipe declarations' versions
            observe_recipes(asset, instance)
            continue
        if isinstance(asset, dg.SourceAsset) or not asset.is_materializable:
            for shard in partitions_of(asset, instance):
                instance.report_runless_asset_event(
                    dg.AssetObservation(
                        key, partition=shard, tags={"dagster/data_version": f"v-{shard}"}
                    )
                )
            continue
        for partition in partitions_of(asset, instance):
            assert record_built(instance, asset, partition)


def place_checkpoint(storage, table: str, recipe: str, source, manifest: dict, steps=(1,)) -> list:
    """Stand a model folder in as a recipe's trained checkpoints (one per step), in the layout
    finetuned_checkpoint writes: step folders plus the run's index."""
    import shutil

    from bft_assets.checkpoint_index import checkpoint_partition, publish_checkpoints
    from bft_resources.checkpoints import write_manifest
    from bft_resources.trainer import TrainingResult

    parts = {}
    for step in steps:
        parts[step] = checkpoint_partition(recipe, step, "placed00")
        folder = storage.checkpoint_dir(table, parts[step])
        shutil.copytree(source, folder)
        write_manifest(folder, {**manifest, "step": step})
    result = TrainingResult(str(folder), max(steps), [], [], 0.0, 0, 0)
    _, local = publish_checkpoints(storage, table, recipe, parts, result, "placed00")
    return [local[step] for step in sorted(local)]


def table_counts(value: Any) -> dict[str, int]:
    """A metadata table of counts (reason | rows | share) back as {reason: rows}."""
    text = getattr(value, "value", value)
    rows = [line.strip("|").split("|") for line in str(text).splitlines()[2:]]
    return {cells[0].strip(): int(cells[1]) for cells in rows if len(cells) >= 2}


SENT: list = []  # every chat a RecordingEngine's model was asked to answer


class RecordingEngine(TransformersEngine):
    """The real local engine, recording in ``SENT`` every chat a stage sends it: what
    reaches the model, or what a re-run had to answer again."""

    def load(self, model, fallback=None, log=print):  # type: ignore[override]
        @contextlib.contextmanager
        def recording():
            with TransformersEngine.load(self, model, fallback, log) as loaded:
                real = loaded.generate

                def generate(chats, sampling):
                    SENT.extend(chats)
                    return real(chats, sampling)

                loaded.generate = generate
                yield loaded

        return recording()

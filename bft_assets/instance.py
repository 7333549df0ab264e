"""One declared instance of bft, as its stages see it: names, keys, partitions, storage and
the model each role loads.

``Instance`` wraps the declaration (the component, ``decl``) and copies none of its fields:
``inst.decl.generation.scoring`` is the declared value itself. Every key, job, sensor and
partition set carries the instance's prefix and its tables live under
``<storage>/<prefix>/<asset>``, so two instances (a corpus ablation, a rewriter ablation)
share nothing but the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

import dagster as dg

from bft_assets.policies import GPU_POOL, REBUILD_STALE, gpu_op_tags
from bft_assets.recipes import Need, Recipe, floor, peers, recipe_version
from bft_resources.corpus import CorpusSource
from bft_resources.engine import Engine
from bft_resources.keys import safe_segment
from bft_resources.models import ModelRef
from bft_resources.storage import Storage, storage_for
from bft_resources.trainer import Trainer, TrainingSettings

if TYPE_CHECKING:
    from bft_assets.component import BackAndForthTranslation

# The graph's asset names (the last part of each key; asset keys are part of the interface).
SEED_EXAMPLES = "seed_examples"
CORPUS_DOCUMENTS = "corpus_documents"
CANDIDATE_RESPONSES = "candidate_responses"
BACKTRANSLATED_POOL = "backtranslated_pool"
SCORED_POOL = "scored_pool"
REWRITTEN_DATASET = "rewritten_dataset"
SEED_MODEL = "seed_model"
RECIPES = "recipes"
FINETUNED_CHECKPOINT = "finetuned_checkpoint"
EVAL_SCORES = "eval_scores"

DIRECTIONS = ("backward", "forward")
CORPUS_SHARDS = "corpus_shards"


def digest(*parts: Any) -> str:
    """A short stable hash of declared settings, for code versions."""
    text = json.dumps(parts, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    """A declared setting as JSON: a pydantic model's dump, a dataclass's fields."""
    return (
        value.model_dump(mode="json") if hasattr(value, "model_dump") else dataclasses.asdict(value)
    )


class Instance:
    def __init__(self, decl: BackAndForthTranslation):
        self.decl = decl
        self.prefix = decl.key_prefix

    # ---- names ---------------------------------------------------------------------------

    def key(self, asset: str) -> dg.AssetKey:
        return dg.AssetKey([self.prefix, asset])

    def table(self, asset: str) -> str:
        """Where an asset's tables and checkpoints live under the storage root: its key path."""
        return "/".join(self.key(asset).path)

    def name(self, thing: str) -> str:
        """A job, sensor or partition-set name of this instance."""
        return f"{self.prefix}__{thing}"

    @cached_property
    def shards(self) -> dg.DynamicPartitionsDefinition:
        return dg.DynamicPartitionsDefinition(name=self.name(CORPUS_SHARDS))

    @cached_property
    def recipe_partitions(self) -> dg.StaticPartitionsDefinition:
        return dg.StaticPartitionsDefinition([r.name for r in self.decl.recipes])

    @cached_property
    def directions(self) -> dg.StaticPartitionsDefinition:
        return dg.StaticPartitionsDefinition(list(DIRECTIONS))

    @staticmethod
    def partition(context: dg.AssetExecutionContext) -> str:
        """The run's partition key, refused before anything touches a file when it is not a
        safe path segment (anyone with the UI can add a shard partition)."""
        return safe_segment(context.partition_key)

    # ---- recipes -------------------------------------------------------------------------

    def recipe(self, name: str) -> Recipe:
        for recipe in self.decl.recipes:
            if recipe.name == name:
                return recipe
        raise KeyError(
            f"no recipe {name!r} in {self.prefix}: {[r.name for r in self.decl.recipes]}"
        )

    def training_for(self, recipe: Recipe) -> TrainingSettings:
        return recipe.training or self.decl.training

    def recipe_versions(self) -> dict[str, str]:
        """Each recipe's own version: the data version of its declaration."""
        recipes = self.decl.recipes
        return {r.name: recipe_version(r, self.training_for(r), peers(recipes, r)) for r in recipes}

    def needs(self, responses: str) -> Need:
        """What the declared recipes ask of an upstream stage (``recipes.floor``)."""
        return floor(self.decl.recipes, responses)

    # ---- storage and models ----------------------------------------------------------------

    @cached_property
    def s3(self) -> Any:
        """dagster-aws's S3Resource for the declared settings (None: boto3's chain)."""
        return self.decl.s3.resource() if self.decl.s3 is not None else None

    @cached_property
    def storage(self) -> Storage:
        return storage_for(self.decl.storage, self.s3)

    def corpus(self) -> CorpusSource:
        return CorpusSource(uri=self.decl.corpus.uri, s3=self.s3)

    def model(self, role: str) -> ModelRef:
        """The declared model of a role (base, rewriter, judge, seed_base, backward,
        forward), reading s3:// folders with the instance's S3 settings."""
        models = self.decl.models
        declared = {
            "base": models.base,
            "rewriter": models.rewriter,
            "judge": models.judge or models.rewriter,
            "seed_base": models.seed_base or models.base,
            "backward": models.backward,
            "forward": models.forward,
        }[role]
        if declared is None:
            raise KeyError(f"{self.prefix}: models.{role} is not declared")
        return declared.with_s3(self.s3)

    def trainer(self, role: str = "recipe") -> Trainer:
        """The trainer of a role: the seed models' own where declared."""
        return (self.decl.seed_trainer if role == "seed" else None) or self.decl.trainer

    def engine(self, role: str = "generation") -> Engine:
        """The engine a role loads its model with: the judge's own where declared."""
        if role == "judge" and self.decl.judge.engine is not None:
            return self.decl.judge.engine
        return self.decl.engine

    # ---- seed models -------------------------------------------------------------------------

    def trains_seed_model(self) -> bool:
        models = self.decl.models
        declared = models.backward is not None and models.forward is not None
        return self.decl.seed_models_from is None and not declared

    def seed_model_key(self) -> dg.AssetKey | None:
        """The seed_model asset the generation stages read, this instance's or another's."""
        if self.decl.seed_models_from is not None:
            return dg.AssetKey([self.decl.seed_models_from.instance, SEED_MODEL])
        return self.key(SEED_MODEL) if self.trains_seed_model() else None

    def seed_model_storage(self) -> Storage:
        source = self.decl.seed_models_from
        return self.storage if source is None else storage_for(source.storage, self.s3)

    def stage_model_reference(self, direction: str) -> str:
        """What a generation stage loads, for its code version."""
        declared = getattr(self.decl.models, direction)
        if declared is not None:
            return declared.reference
        source = self.seed_model_key()
        assert source is not None
        if not self.trains_seed_model():  # another instance's: its own declaration versions it
            return f"{source.to_user_string()}[{direction}]"
        base = self.model("seed_base").reference
        schedule = digest(self.decl.seed_training, self.trainer("seed"))
        return f"{source.to_user_string()}[{direction}] trained from {base} ({schedule})"

    def stage_model(self, direction: str) -> ModelRef:
        """The model a generation stage loads: the declared model of its direction, or the
        trained seed_model checkpoint of that direction (this instance's or another's)."""
        if getattr(self.decl.models, direction) is not None:
            return self.model(direction)
        source = self.seed_model_key()
        assert source is not None
        table = "/".join(source.path)
        try:
            folder = self.seed_model_storage().fetch_checkpoint(table, direction)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc}; or declare models.{direction} to use a model of your own"
            ) from exc
        return ModelRef(model=str(folder))

    def stage_deps(self, direction: str) -> list[dg.AssetDep]:
        """A stage's dependency on the seed model of its direction, when it reads one."""
        source = self.seed_model_key()
        if getattr(self.decl.models, direction) is not None or source is None:
            return []
        mapping = dg.SpecificPartitionsPartitionMapping([direction])
        return [dg.AssetDep(source, partition_mapping=mapping)]

    # ---- decorator arguments shared by every asset ----------------------------------------

    def storage_kind(self) -> str:
        return "s3" if self.decl.storage.startswith("s3://") else "parquet"

    def asset_args(self, asset: str, kinds: set[str], group: str) -> dict[str, Any]:
        """What every asset of the instance declares; the declaration's translation may
        change its group, owners, tags and description."""
        spec = dg.AssetSpec(
            self.key(asset), group_name=group, owners=list(self.decl.owners),
            tags=dict(self.decl.tags), kinds=kinds | {self.storage_kind()},
        )  # fmt: skip
        spec = self.decl.translate(spec, asset)
        return {
            "key": spec.key,
            "group_name": spec.group_name,
            "owners": list(spec.owners),
            "tags": dict(spec.tags),
            "kinds": set(spec.kinds),
            "automation_condition": REBUILD_STALE,
            **({"description": spec.description} if spec.description else {}),
        }

    def gpu_args(self, asset: str, gpus: int) -> dict[str, Any]:
        """Assets that load a model: the gpu pool and the step's GPU request (plus the op
        tags the declaration adds)."""
        tags = {**gpu_op_tags(gpus), **self.decl.op_tags.get(asset, {})}
        return {"pool": GPU_POOL, "op_tags": tags}

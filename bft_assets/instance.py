"""One declared instance of bft: its names, its resources and its code versions.

Every factory gets a ``BftInstance``. Its asset keys, checks, jobs, sensors and partition
sets carry the instance's key prefix; its resources are registered under prefixed keys and
injected into its own assets only; its tables live under ``<storage>/<prefix>/<asset>``.
So two instances (a corpus ablation, a rewriter ablation) share nothing but the code.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from bft_assets.policies import (
    GPU_POOL,
    ONE_PARTITION_PER_RUN,
    REBUILD_STALE,
    gpu_op_tags,
)
from bft_assets.specs import (
    DEMO_DATA,
    CorpusSpec,
    EngineSpec,
    EvalSpec,
    GenerationSpec,
    JudgeSpec,
    Models,
    ModelSpec,
    RecipeSpec,
    S3Spec,
    SeedModelsFrom,
    SeedSpec,
    TrainerSpec,
    TrainingSettings,
)
from bft_resources.corpus import CorpusSource
from bft_resources.embeddings import Embedder
from bft_resources.engine import InferenceEngine
from bft_resources.eval_source import EvalSetSource
from bft_resources.judge import Judge
from bft_resources.keys import safe_segment
from bft_resources.models import ModelResource
from bft_resources.seed_source import SeedSource
from bft_resources.storage import Storage, storage_for
from bft_resources.trainer import Trainer

# The graph's asset names (the last part of each key; asset keys are part of the interface).
SEED_EXAMPLES = "seed_examples"
CORPUS_DOCUMENTS = "corpus_documents"
CANDIDATE_RESPONSES = "candidate_responses"
BACKTRANSLATED_POOL = "backtranslated_pool"
SCORED_POOL = "scored_pool"
REWRITTEN_DATASET = "rewritten_dataset"
SEED_MODEL = "seed_model"
FINETUNED_CHECKPOINT = "finetuned_checkpoint"
EVAL_SCORES = "eval_scores"

DIRECTIONS = ("backward", "forward")
CORPUS_SHARDS = "corpus_shards"


def digest(*parts: Any) -> str:
    """A short stable hash of declared settings, for code versions."""
    text = json.dumps(parts, sort_keys=True, default=lambda o: o.model_dump(mode="json"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Bound:
    """An instance's resources as one asset execution sees them."""

    storage: Storage
    seed_source: SeedSource
    corpus: CorpusSource
    base_model: ModelResource
    rewriter_model: ModelResource
    engine: InferenceEngine
    trainer: Trainer
    judge: Judge
    eval_set: EvalSetSource
    embedder: Embedder
    backward_model: ModelResource | None = None
    forward_model: ModelResource | None = None
    seed_model_storage: Storage | None = None


@dataclass(frozen=True)
class BftInstance:
    prefix: str
    storage_root: str
    seed: SeedSpec
    corpus: CorpusSpec
    models: Models
    eval: EvalSpec
    recipes: tuple[RecipeSpec, ...]
    engine: EngineSpec = field(default_factory=EngineSpec)
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    seed_models_from: SeedModelsFrom | None = None
    s3: S3Spec | None = None
    owners: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    # ---- names ---------------------------------------------------------------------------

    def key(self, asset: str) -> dg.AssetKey:
        return dg.AssetKey([self.prefix, asset])

    def table(self, asset: str) -> str:
        """Where an asset's tables and checkpoints live under the storage root: its key path."""
        return "/".join(self.key(asset).path)

    def name(self, thing: str) -> str:
        """A job, sensor or partition-set name of this instance."""
        return f"{self.prefix}__{thing}"

    def resource_key(self, role: str) -> str:
        return f"{self.prefix}__{role}"

    @cached_property
    def shards(self) -> dg.DynamicPartitionsDefinition:
        return dg.DynamicPartitionsDefinition(name=self.name(CORPUS_SHARDS))

    @cached_property
    def recipe_partitions(self) -> dg.StaticPartitionsDefinition:
        return dg.StaticPartitionsDefinition([r.name for r in self.recipes])

    @cached_property
    def directions(self) -> dg.StaticPartitionsDefinition:
        return dg.StaticPartitionsDefinition(list(DIRECTIONS))

    @staticmethod
    def partition(context: dg.AssetExecutionContext) -> str:
        """The run's partition key, refused before anything touches a file when it is not a
        safe path segment (anyone with the UI can add a shard partition)."""
        return safe_segment(context.partition_key)

    def recipe(self, name: str) -> RecipeSpec:
        for recipe in self.recipes:
            if recipe.name == name:
                return recipe
        raise KeyError(f"no recipe {name!r} in {self.prefix}: {[r.name for r in self.recipes]}")

    # ---- what the declared recipes ask of the upstream stages --------------------------

    def _floor(self, responses: str) -> tuple[bool, int | None]:
        """(whether any recipe trains on these responses, the lowest score it accepts; None
        when one of them takes every pair)."""
        wanted = [r for r in self.recipes if r.responses == responses]
        if not wanted:
            return False, None
        if any(r.min_score is None for r in wanted):
            return True, None
        return True, min(r.min_score for r in wanted)  # type: ignore[type-var]

    @property
    def rewrite_floor(self) -> tuple[bool, int | None]:
        return self._floor("rewrite")

    @property
    def distill_floor(self) -> tuple[bool, int | None]:
        return self._floor("distilled")

    def training_for(self, recipe: str | None) -> TrainingSettings:
        if recipe is None:
            return self.training
        return self.recipe(recipe).training or self.training

    # ---- models ------------------------------------------------------------------------

    @property
    def judge_model(self) -> ModelSpec:
        return self.models.judge or self.models.rewriter

    def trains_seed_model(self) -> bool:
        declared = self.models.backward is not None and self.models.forward is not None
        return self.seed_models_from is None and not declared

    def seed_model_key(self) -> dg.AssetKey | None:
        """The seed_model asset the generation stages read, this instance's or another's."""
        if self.seed_models_from is not None:
            return dg.AssetKey([self.seed_models_from.instance, SEED_MODEL])
        return self.key(SEED_MODEL) if self.trains_seed_model() else None

    def stage_model_reference(self, direction: str) -> str:
        """What a generation stage loads, for its code version."""
        declared = getattr(self.models, direction)
        if declared is not None:
            return declared.reference
        source = self.seed_model_key()
        assert source is not None
        return f"{source.to_user_string()}[{direction}] trained from {self.models.base.reference}"

    def stage_deps(self, direction: str) -> list[dg.AssetDep]:
        """A stage's dependency on the seed model of its direction, when it reads one."""
        if getattr(self.models, direction) is not None or self.seed_model_key() is None:
            return []
        mapping = dg.SpecificPartitionsPartitionMapping([direction])
        return [dg.AssetDep(self.seed_model_key(), partition_mapping=mapping)]

    # ---- decorator arguments shared by every asset -------------------------------------

    def storage_kind(self) -> str:
        return "s3" if self.storage_root.startswith("s3://") else "parquet"

    def asset_args(self, asset: str, kinds: set[str], roles: set[str]) -> dict[str, Any]:
        return {
            "key": self.key(asset),
            "owners": list(self.owners),
            "tags": dict(self.tags),
            "kinds": kinds | {self.storage_kind()},
            "required_resource_keys": {self.resource_key(r) for r in roles & self.roles},
            "automation_condition": REBUILD_STALE,
        }

    def gpu_args(self, gpus: int) -> dict[str, Any]:
        """Partitioned assets that load a model: the gpu pool, one partition per backfill
        run, and the step's GPU request."""
        return {"pool": GPU_POOL, "backfill_policy": ONE_PARTITION_PER_RUN, "op_tags": gpu_op_tags(gpus)}  # fmt: skip

    # ---- resources ---------------------------------------------------------------------

    @property
    def roles(self) -> set[str]:
        """The resource roles this instance registers (the optional ones only when declared)."""
        optional = {"backward_model": self.models.backward, "forward_model": self.models.forward,
                    "seed_model_storage": self.seed_models_from}  # fmt: skip
        return set(Bound.__dataclass_fields__) - {k for k, v in optional.items() if v is None}

    def s3_resource(self) -> S3Resource | None:
        if self.s3 is None:
            return None
        return S3Resource(**{k: v for k, v in self.s3.model_dump().items() if v is not None})

    def _model(self, spec: ModelSpec, s3: S3Resource | None) -> ModelResource:
        return ModelResource(model=spec.model, revision=spec.revision, context_window=spec.context_window,
                             trust_remote_code=spec.trust_remote_code, s3=s3)  # fmt: skip

    def resources(self) -> dict[str, dg.ConfigurableResource]:
        """This instance's resources, keyed by ``resource_key(role)``."""
        from bft_assets.demo import demo_eval_path, demo_seed_path

        s3 = self.s3_resource()
        engine = self.engine
        api_key = dg.EnvVar(engine.api_key_env) if engine.api_key_env else None
        judge_key = dg.EnvVar(self.judge.api_key_env) if self.judge.api_key_env else None
        roles: dict[str, dg.ConfigurableResource | None] = {
            "storage": storage_for(self.storage_root, s3),
            "seed_source": SeedSource(uri=str(demo_seed_path()) if self.seed.uri == DEMO_DATA else self.seed.uri),
            "corpus": CorpusSource(uri=self.corpus.uri, s3=s3),
            "base_model": self._model(self.models.base, s3),
            "rewriter_model": self._model(self.models.rewriter, s3),
            "backward_model": self._model(self.models.backward, s3) if self.models.backward else None,
            "forward_model": self._model(self.models.forward, s3) if self.models.forward else None,
            "seed_model_storage": storage_for(self.seed_models_from.storage, s3)
            if self.seed_models_from else None,
            "engine": InferenceEngine(
                backend=engine.backend, batch_size=engine.batch_size, device=engine.device, dtype=engine.dtype,
                tensor_parallel_size=engine.tensor_parallel_size, gpu_memory_utilization=engine.gpu_memory_utilization,
                max_model_len=engine.max_model_len, enable_prefix_caching=engine.enable_prefix_caching,
                base_url=engine.base_url, api_key=api_key, served_model=engine.served_model,
                max_concurrency=engine.max_concurrency,
            ),
            "trainer": Trainer(**self.trainer.model_dump()),
            "judge": Judge(backend=self.judge.backend, model=self._model(self.judge_model, s3),
                           base_url=self.judge.base_url, api_key=judge_key, batch_size=self.judge.batch_size),
            "eval_set": EvalSetSource(uri=str(demo_eval_path()) if self.eval.uri == DEMO_DATA else self.eval.uri,
                                      limit=self.eval.limit),
            "embedder": Embedder(mauve_featurizer=self.eval.mauve_featurizer),
        }  # fmt: skip
        return {self.resource_key(r): v for r, v in roles.items() if v is not None}

    def bound(self, context: dg.AssetExecutionContext | dg.SensorEvaluationContext) -> Bound:
        """The resources of this instance that the running asset or sensor asked for."""
        available = context.resources
        values = {}
        for role in Bound.__dataclass_fields__:
            try:
                values[role] = getattr(available, self.resource_key(role))
            except Exception:  # not required by this asset, or not declared
                values[role] = None
        return Bound(**values)  # type: ignore[arg-type]

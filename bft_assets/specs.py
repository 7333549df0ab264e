"""The method's declared settings: what a user writes under each attribute of a bft
instance that is not a piece of machinery (engines, the trainer and training settings are
the resources themselves, declared once in ``bft_resources``).

Plain typed models with the paper's values as defaults. Every field changes what some asset
produces, so every field reaches some asset's code version.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
from pydantic import Field, TypeAdapter

from bft_resources.engine import EngineSpec
from bft_resources.models import ModelRef
from bft_resources.uris import resolve_against

# Where dagster's component loader keeps its load context (project root included).
LOAD_CONTEXT = "component_load_context"

# A packaged demo set must be asked for by name: a deployment that forgets its seed or its
# evaluation set fails instead of training on 24 demo pairs.
DEMO_DATA = "bft:demo"
PAPER_SEED_SIZE = 3200
PAPER_TEMPERATURE = 1.0  # docs/method.md: every generation step samples at T=1.0, top_p=0.9
PAPER_TOP_P = 0.9


def project_root(context: dg.ResolutionContext) -> Path | None:
    """The dg project root of the declaration being loaded (None outside a project)."""
    load = context.stash.get(LOAD_CONTEXT)
    return getattr(load, "project_root", None)


def _project_path(context: dg.ResolutionContext, value: object) -> str:
    """A declared location; a relative local path is resolved against the dg project root,
    never against the working directory of whichever process reads it."""
    value = context.resolve_value(value, as_type=str)
    root = project_root(context)
    return resolve_against(value, root) if root is not None and value else value


ProjectPath = Annotated[str, dg.Resolver(_project_path, model_field_type=str)]


def machinery(kind: Any, description: str = "", examples: Sequence[object] = ()) -> dg.Resolver:
    """The attribute IS a piece of machinery (an engine, the trainer, training settings):
    the YAML validates against its own fields and resolves into it, nothing copied."""
    adapter = TypeAdapter(kind)
    return dg.Resolver(
        lambda context, value: adapter.validate_python(context.resolve_value(value)),
        model_field_type=kind, description=description, examples=list(examples),
    )  # fmt: skip


ResolvedEngine = Annotated[EngineSpec, machinery(EngineSpec)]


def _model_ref(context: dg.ResolutionContext, value: object) -> ModelRef:
    value = context.resolve_value(value)
    root = project_root(context)
    if root is not None and isinstance(value, str) and value.startswith(("./", "../")):
        value = resolve_against(value, root)  # a folder in the project; a hub id stays one
    if isinstance(value, str):
        return ModelRef(model=value)
    if isinstance(value, ModelRef):
        return value
    return ModelRef.model_validate(value if isinstance(value, dict) else value.model_dump())


ResolvedModel = Annotated[
    ModelRef,
    dg.Resolver(
        _model_ref,
        model_field_type=str | ModelRef,
        description="A model: a bare reference, or {model, revision, context_window, trust_remote_code}.",
        examples=["meta-llama/Llama-2-70b-chat-hf", {"model": "meta-llama/Llama-2-7b-hf", "revision": "main"}],
    ),
]  # fmt: skip


class Models(dg.Resolvable, dg.Model):
    base: ResolvedModel = Field(description="The base model each recipe fine-tunes.")
    rewriter: ResolvedModel = Field(description="The aligned chat model that rewrites (and distills) responses.")  # fmt: skip
    judge: ResolvedModel | None = Field(
        default=None,
        description="The pairwise judge (a local model, or the served name behind judge.engine: endpoint); "
        "default: the rewriter.",
    )
    seed_base: ResolvedModel | None = Field(
        default=None,
        description="The base model the backward and forward seed models are fine-tuned from (the paper: "
        "Llama-2-70B in every experiment); default: models.base.",
    )
    backward: ResolvedModel | None = Field(
        default=None,
        description="Backtranslate with this model instead of training seed_model[backward].",
    )
    forward: ResolvedModel | None = Field(
        default=None, description="Score with this model instead of training seed_model[forward]."
    )


class SeedModelsFrom(dg.Resolvable, dg.Model):
    """Use another instance's trained seed models, so that a corpus ablation differs only in
    its web documents."""

    instance: str = Field(description="The other instance's key_prefix.", examples=["web"])
    storage: ProjectPath = Field(
        description="That instance's storage root.", examples=["s3://bucket/bft/web"]
    )


class SeedSpec(dg.Resolvable, dg.Model):
    uri: ProjectPath = Field(
        description=f"An oasst *.trees.jsonl, flat JSONL/Parquet pairs, or a folder of them; {DEMO_DATA!r}: the packaged 24 demo pairs.",
        examples=["/data/oasst1/2023-04-12_oasst_ready.trees.jsonl", DEMO_DATA],
    )
    max_examples: int = Field(default=PAPER_SEED_SIZE, ge=1, description="Seed pairs kept (paper: 3,200).")  # fmt: skip


class CorpusSpec(dg.Resolvable, dg.Model):
    uri: ProjectPath = Field(
        description="Folder or s3:// prefix of Dolma gzip JSONL shards; one shard, one partition.",
        examples=["s3://bucket/dolma/cc_en_head/", "/data/dolma/cc_en_head"],
    )
    min_words: int = Field(default=20, ge=0, description="Fewer words: dropped as too_short.")
    english_only: bool = Field(default=True, description="Drop documents that do not look English.")  # fmt: skip
    min_english_score: float = Field(
        default=0.2, ge=0, le=1, description="Share of English function words under which a document is not English."
    )  # fmt: skip
    max_document_bytes: int = Field(
        default=1_000_000, ge=1, description="Longer raw lines: too_large."
    )
    min_keep_rate: float = Field(default=0.05, ge=0, le=1, description="Keep rate under which a WARN check fails.")  # fmt: skip


class SamplingSpec(dg.Resolvable, dg.Model):
    temperature: float = Field(default=PAPER_TEMPERATURE, ge=0, description="Sampling temperature (paper: 1.0).")  # fmt: skip
    top_p: float = Field(default=PAPER_TOP_P, gt=0, le=1, description="Nucleus mass (paper: 0.9).")
    max_new_tokens: int = Field(default=256, ge=1, description="Most tokens generated per reply.")
    seed: int = Field(default=0, description="Sampling seed (per batch).")
    batch_rows: int = Field(default=32, ge=1, description="Rows per persisted batch (the unit of resumption).")  # fmt: skip


class ScoringSpec(SamplingSpec):
    mode: Literal["generate", "logprobs"] = Field(
        default="generate",
        description="generate: sample the reasoning and parse 'Score: N' (paper); logprobs: read P(1..5).",
    )
    max_new_tokens: int = Field(default=512, ge=1, description="generate: most tokens of the reasoning.")  # fmt: skip
    min_valid_rate: float = Field(default=0.8, ge=0, le=1, description="WARN under this valid-score rate (paper: 88%).")  # fmt: skip
    hard_min_valid_rate: float = Field(default=0.5, ge=0, le=1, description="ERROR under this valid-score rate.")  # fmt: skip


class RewritingSpec(SamplingSpec):
    max_new_tokens: int = Field(
        default=1024, ge=1, description="Most tokens of a distilled answer."
    )
    rewrite_length_ratio: float = Field(
        default=1.25,
        gt=0,
        description="A rewrite may take this many tokens per token of its draft (it copies the draft where it can)...",
    )
    rewrite_extra_tokens: int = Field(default=64, ge=0, description="... plus these (the [RES] markers, a short draft's growth).")  # fmt: skip
    force_format: bool = Field(
        default=False, description="Open the reply with [RES] and stop at [/RES] (small models)."
    )
    min_extraction_rate: float = Field(default=0.5, ge=0, le=1, description="WARN under this extraction rate.")  # fmt: skip


class GenerationSpec(dg.Resolvable, dg.Model):
    backtranslation: SamplingSpec = Field(default_factory=SamplingSpec, description="Step 1.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="Step 2.")
    rewriting: RewritingSpec = Field(default_factory=RewritingSpec, description="Step 3.")


Annotator = Literal["bft", "weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_gpt4"]


class JudgeSpec(dg.Resolvable, dg.Model):
    """How the pairwise judge (``models.judge``) runs and is asked."""

    engine: Annotated[EngineSpec | None, machinery(EngineSpec | None)] = Field(
        default=None,
        description="The judge's own engine, e.g. {backend: vllm, tensor_parallel_size: 8} for a 70B judge or "
        "{backend: endpoint, base_url, api_key_env}; default: the instance's engine.",
    )
    annotator: Annotator = Field(
        default="bft",
        description="How the judge is asked and read: AlpacaEval 2's weighted_alpaca_eval_gpt4_turbo or AlpacaEval 1's "
        "alpaca_eval_gpt4 (templates and configs from the installed alpaca-eval; with GPT-4-Turbo / GPT-4 as the judge "
        "they give numbers comparable with the paper's tables), or bft's one-token prompt for small local judges.",
        examples=["weighted_alpaca_eval_gpt4_turbo"],
    )


class EvalSpec(dg.Resolvable, dg.Model):
    uri: ProjectPath = Field(
        description=f"AlpacaEval JSON list or JSONL ({{instruction, output, ...}}); {DEMO_DATA!r}: 8 demo instructions.",
        examples=["/data/alpaca_eval/alpaca_eval.json", DEMO_DATA],
    )
    reference: Literal["dataset", "base_model"] = Field(
        default="dataset", description="Reference answers: the set's outputs, or the untuned base model's."
    )  # fmt: skip
    limit: int | None = Field(default=None, ge=1, description="Evaluate the first N instructions only.")  # fmt: skip
    temperature: float = Field(default=0.7, ge=0, description="Answer sampling temperature (paper: 0.7).")  # fmt: skip
    top_p: float = Field(default=0.9, gt=0, le=1, description="Answer nucleus mass (paper: 0.9).")
    max_new_tokens: int = Field(default=512, ge=1, description="Most tokens of an answer.")
    seed: int = Field(default=0, description="Sampling seed.")
    batch_rows: int = Field(default=16, ge=1, description="Instructions per persisted batch.")
    tags: list[str] = Field(default_factory=lambda: ["assistant", "web_if_needed"], description="Suffix variants.")  # fmt: skip
    min_agreement: float = Field(default=0.6, ge=0, le=1, description="WARN under this both-order agreement.")  # fmt: skip
    diversity_sample: int = Field(default=1000, ge=1, description="Generated pairs for trigram counts.")  # fmt: skip
    mauve_texts: int = Field(
        default=10000, ge=0, description="Pairs per side for MAUVE (paper: 10K; 0: skip)."
    )
    mauve_featurizer: ProjectPath = Field(
        default="",
        description="GPT-2-family model folder for MAUVE's features (paper: the MAUVE package's default GPT-2, gpt2-large); empty: MiniLM.",
    )


class S3Spec(dg.Resolvable, dg.Model):
    """S3 client settings; credentials come from boto3's chain (variables, profile, role)."""

    endpoint_url: str | None = Field(default=None, description="e.g. a MinIO or moto server.")
    region_name: str | None = Field(default=None, description="e.g. us-east-1")
    profile_name: str | None = Field(default=None, description="An AWS profile.")

    def resource(self):
        """dagster-aws's S3Resource with these settings (imported here: S3 is optional)."""
        from dagster_aws.s3 import S3Resource

        return S3Resource(**self.model_dump(exclude_none=True))


KEY_PREFIX_PATTERN = r"^[a-z][a-z0-9_]*$"

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
from pydantic import Field, TypeAdapter, field_validator, model_validator

from bft_resources.engine import EngineSpec, OptionalEngineSpec
from bft_resources.keys import MAX_NAME_CHARS
from bft_resources.models import ModelRef
from bft_resources.uris import parse_location, resolve_against

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
    """A declared location, read once when the declaration loads (``uris.parse_location``):
    a relative local path is resolved against the dg project root, never against the working
    directory of whichever process reads it; ``file:///x`` becomes ``/x``; another scheme, or
    a relative path outside a dg project, is refused here, naming the attribute's line."""
    value = context.resolve_value(value, as_type=str)
    root = project_root(context)
    if root is not None and value:
        value = resolve_against(value, root)
    if not value or value == DEMO_DATA:
        return value
    return parse_location(value).uri


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
        default=1024, ge=1,
        description="Most tokens of a distilled answer (the paper gives none; its compared responses average "
        "468-567 tokens, Table 6).",
    )  # fmt: skip
    length_cap: Literal["context", "ratio"] = Field(
        default="context",
        description="context (the paper caps no rewrite): a rewrite may use what is left of the rewriter's context "
        "after its own prompt, row by row; ratio: rewrite_length_ratio x its draft + rewrite_extra_tokens "
        "(this project's earlier cap). A setting of the other cap is refused when declared (nothing would read it).",
    )
    min_room: int = Field(
        # Declared (the paper gives no cap and no room): 768 is about 1.6x the paper's mean rewritten
        # response (468 tokens, Table 6) and, on Llama-2's 4,096-token window, leaves scoring as the
        # prompt that limits a document (1,024 would make rewriting the limit and drop documents
        # the paper keeps).
        default=768,
        ge=1,
        description="context mode: a document is kept only when its rewriting prompt leaves the rewriter at least "
        "this many tokens (declared: about 1.6x the paper's mean rewritten response, 468 tokens, Table 6; on a "
        "4,096-token window scoring stays the prompt that limits a document).",
    )
    rewrite_length_ratio: float = Field(
        default=1.25,
        gt=0,
        description="ratio mode: tokens a rewrite may take per token of its draft...",
    )
    rewrite_extra_tokens: int = Field(default=64, ge=0, description="ratio mode: ... plus these.")
    force_format: bool = Field(
        default=False, description="Open the reply with [RES] and stop at [/RES] (small models)."
    )
    min_extraction_rate: float = Field(default=0.5, ge=0, le=1, description="WARN under this extraction rate.")  # fmt: skip

    @model_validator(mode="after")
    def _no_setting_of_the_other_cap(self) -> "RewritingSpec":
        # A setting of the cap not chosen would be read by nothing: a rewrite declared at
        # 1.0 x its draft would run to the context window instead. Refused, named.
        unread = {
            "context": ("rewrite_length_ratio", "rewrite_extra_tokens"),
            "ratio": ("min_room",),
        }
        declared = [name for name in unread[self.length_cap] if name in self.model_fields_set]
        if declared:
            other = "ratio" if self.length_cap == "context" else "context"
            raise ValueError(
                f"{', '.join(declared)}: read only with length_cap: {other}, and length_cap is "
                f"{self.length_cap}{' (the default)' if 'length_cap' not in self.model_fields_set else ''}; "
                f"declare length_cap: {other} or leave {'them' if len(declared) > 1 else 'it'} out"
            )
        return self


class GenerationSpec(dg.Resolvable, dg.Model):
    backtranslation: SamplingSpec = Field(default_factory=SamplingSpec, description="Step 1.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="Step 2.")
    rewriting: RewritingSpec = Field(default_factory=RewritingSpec, description="Step 3.")


Annotator = Literal["bft", "weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_gpt4"]


class OtherJudge(dg.Resolvable, dg.Model):
    """A further judge whose win rates are reported beside the main one's (BFT Table 10:
    GPT-4 Turbo and Claude-3-Opus)."""

    name: str = Field(
        description="Its label in the metadata.",
        examples=["claude3_opus"],
        pattern=r"^[a-z][a-z0-9_]{0,31}$",
    )
    served_model: str = Field(
        description="The served model's name.", examples=["claude-3-opus-20240229"]
    )
    engine: Annotated[EngineSpec, machinery(EngineSpec)] = Field(
        description="Usually {backend: endpoint, base_url, api_key_env}.",
    )
    annotator: Annotator = Field(
        default="weighted_alpaca_eval_gpt4_turbo", description="How it is asked and read."
    )
    references: ProjectPath | None = Field(
        default=None,
        description="Its own reference set for the same instructions (e.g. AlpacaEval 2's GPT-4 Turbo outputs while "
        "the main judge runs AlpacaEval 1); default: the main references.",
    )


class JudgeSpec(dg.Resolvable, dg.Model):
    """How the pairwise judge (``models.judge``) runs and is asked."""

    engine: Annotated[OptionalEngineSpec, machinery(OptionalEngineSpec)] = Field(
        default=None,
        description="The judge's own engine, e.g. {backend: vllm, tensor_parallel_size: 8} for a 70B judge or "
        "{backend: endpoint, base_url, api_key_env}; default: the instance's engine.",
    )
    annotator: Annotator | None = Field(
        default=None,
        description="How the judge is asked and read. Default: AlpacaEval's own annotator for the reference set "
        "(alpaca_eval_gpt4 against text-davinci-003's outputs, AlpacaEval 1 as in BFT Tables 1 and 2; "
        "weighted_alpaca_eval_gpt4_turbo against GPT-4 Turbo's, AlpacaEval 2, Table 10), read from the set's "
        "`generator`; bft's one-token prompt for base-model references and other sets. AlpacaEval's templates "
        "and configs come from the installed alpaca-eval.",
        examples=["weighted_alpaca_eval_gpt4_turbo", "bft"],
    )
    others: list[OtherJudge] = Field(
        default_factory=list,
        description="Further judges reported beside this one (e.g. Claude-3-Opus, Table 10).",
    )


class EvalSpec(dg.Resolvable, dg.Model):
    uri: ProjectPath = Field(
        description=f"AlpacaEval JSON list or JSONL ({{instruction, output, ...}}); {DEMO_DATA!r}: 8 demo instructions.",
        examples=["/data/alpaca_eval/alpaca_eval.json", DEMO_DATA],
    )
    reference: Literal["dataset", "base_model"] = Field(
        default="dataset", description="Reference answers: the set's outputs, or the untuned base model's."
    )  # fmt: skip
    limit: int | None = Field(
        default=None, description="Evaluate the first N instructions only (at least 1).",
        json_schema_extra={"minimum": 1},  # what `dg check defs` reads; the validator below is Python's
    )  # fmt: skip
    temperature: float = Field(default=0.7, ge=0, description="Answer sampling temperature (paper: 0.7).")  # fmt: skip
    top_p: float = Field(default=0.9, gt=0, le=1, description="Answer nucleus mass (paper: 0.9).")
    max_new_tokens: int = Field(
        default=2048, ge=1,
        description="Most tokens of an answer, and at most what the prompt leaves of the model's context. The paper "
        "gives no limit; 2048 is AlpacaEval's own generation setting (88 of its model configs, Llama-2-7B-chat's).",
    )  # fmt: skip
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

    @field_validator("limit")
    @classmethod
    def _a_limit(cls, limit: int | None) -> int | None:
        # A validator: pydantic cannot apply ge=1 to an optional field (None would fail it).
        if limit is not None and limit < 1:
            raise ValueError(f"limit {limit}: at least 1 instruction, or leave it out for all")
        return limit


class S3Spec(dg.Resolvable, dg.Model):
    """S3 client settings; credentials come from boto3's chain (variables, profile, role)."""

    endpoint_url: str | None = Field(default=None, description="e.g. a MinIO or moto server.")
    region_name: str | None = Field(default=None, description="e.g. us-east-1")
    profile_name: str | None = Field(default=None, description="An AWS profile.")

    def resource(self):
        """dagster-aws's S3Resource with these settings (imported here: S3 is optional)."""
        from dagster_aws.s3 import S3Resource

        return S3Resource(**self.model_dump(exclude_none=True))


# Lowercase ASCII, a letter first, at most MAX_NAME_CHARS: a path segment of every table.
KEY_PREFIX_PATTERN = rf"^[a-z][a-z0-9_]{{0,{MAX_NAME_CHARS - 1}}}$"

"""The attributes of one bft instance, as a user declares them in ``defs.yaml``.

Plain typed models with the paper's values as defaults; ``component.py`` resolves a YAML
declaration into them and ``instance.py`` turns them into names, resources and code
versions. Every field here changes what some asset produces, so every field reaches some
asset's code version.
"""

from typing import Annotated, Literal

import dagster as dg
from pydantic import Field, field_validator

from bft_resources.models import SMOLLM2

# A packaged demo set must be asked for by name: a deployment that forgets its seed or its
# evaluation set fails instead of training on 24 demo pairs.
DEMO_DATA = "bft:demo"
PAPER_SEED_SIZE = 3200
PAPER_TEMPERATURE = 1.0  # METHOD.md: every generation step samples at T=1.0, top_p=0.9
PAPER_TOP_P = 0.9
PAPER_THRESHOLD = 5


class ModelSpec(dg.Model):
    """A model reference: what to load, at which revision, and how."""

    model: str = Field(
        description=f"A hub id, a local folder, an s3:// folder, or the built-in {SMOLLM2!r}.",
        examples=["meta-llama/Llama-2-7b-hf", "s3://bucket/models/llama-2-7b", SMOLLM2],
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) loaded everywhere the model is.",
        examples=["main", "01c7f73d771dfac7d292323805ebc428287df4f9"],
    )
    context_window: int | None = Field(
        default=None, description="Tokens it attends to (default: the config's)."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run code shipped with the model. Off unless you trust it."
    )

    @property
    def reference(self) -> str:
        return self.model if self.revision is None else f"{self.model}@{self.revision}"


def _model_spec(context: dg.ResolutionContext, value: object) -> ModelSpec:
    value = context.resolve_value(value)
    if isinstance(value, str):
        return ModelSpec(model=value)
    if isinstance(value, ModelSpec):
        return value
    return ModelSpec.model_validate(value if isinstance(value, dict) else value.model_dump())


ResolvedModel = Annotated[
    ModelSpec,
    dg.Resolver(
        _model_spec,
        model_field_type=str | ModelSpec,
        description="A model: a bare reference, or {model, revision, context_window, trust_remote_code}.",
        examples=["meta-llama/Llama-2-70b-chat-hf", {"model": "meta-llama/Llama-2-7b-hf", "revision": "main"}],
    ),
]  # fmt: skip


class Models(dg.Resolvable, dg.Model):
    base: ResolvedModel = Field(description="The base model fine-tuned into the seed models and the recipe models.")  # fmt: skip
    rewriter: ResolvedModel = Field(description="The aligned chat model that rewrites (and distills) responses.")  # fmt: skip
    judge: ResolvedModel | None = Field(
        default=None,
        description="The pairwise judge (a local model, or the served name with judge.backend: endpoint); default: the rewriter.",
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
    storage: str = Field(
        description="That instance's storage root.", examples=["s3://bucket/bft/web"]
    )


class SeedSpec(dg.Resolvable, dg.Model):
    uri: str = Field(
        description=f"An oasst *.trees.jsonl, flat JSONL/Parquet pairs, or a folder of them; {DEMO_DATA!r}: the packaged 24 demo pairs.",
        examples=["/data/oasst1/2023-04-12_oasst_ready.trees.jsonl", DEMO_DATA],
    )
    max_examples: int = Field(default=PAPER_SEED_SIZE, description="Seed pairs kept (paper: 3,200).")  # fmt: skip


class CorpusSpec(dg.Resolvable, dg.Model):
    uri: str = Field(
        description="Folder or s3:// prefix of Dolma gzip JSONL shards; one shard, one partition.",
        examples=["s3://bucket/dolma/cc_en_head/", "/data/dolma/cc_en_head"],
    )
    min_words: int = Field(default=20, description="Fewer words: dropped as too_short.")
    english_only: bool = Field(default=True, description="Drop documents that do not look English.")  # fmt: skip
    min_english_score: float = Field(
        default=0.2, description="Share of English function words under which a document is not English."
    )  # fmt: skip
    max_document_bytes: int = Field(default=1_000_000, description="Longer raw lines: too_large.")
    min_keep_rate: float = Field(default=0.05, description="Keep rate under which a WARN check fails.")  # fmt: skip


class EngineSpec(dg.Resolvable, dg.Model):
    backend: Literal["transformers", "vllm", "endpoint"] = Field(
        default="transformers",
        description="transformers (CPU or a GPU), vllm (GPUs, the gpu extra) or endpoint (OpenAI-compatible).",
    )
    batch_size: int = Field(default=8, description="transformers: prompts per generate call.")
    device: str = Field(default="auto", description="transformers: cpu, cuda, cuda:1 ... or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="Weights' dtype.")  # fmt: skip
    tensor_parallel_size: int = Field(
        default=1, description="vllm: GPUs one model spreads over (also each generation step's GPU request)."
    )  # fmt: skip
    gpu_memory_utilization: float = Field(default=0.9, description="vllm: share of GPU memory.")
    max_model_len: int | None = Field(default=None, description="vllm: context length.")
    enable_prefix_caching: bool = Field(default=True, description="vllm: reuse shared prefixes.")
    base_url: str | None = Field(default=None, description="endpoint: e.g. http://127.0.0.1:8000/v1")  # fmt: skip
    api_key_env: str | None = Field(
        default=None, description="endpoint: NAME of the variable holding the key (read as an EnvVar, never shown)."
    )  # fmt: skip
    served_model: str | None = Field(default=None, description="endpoint: model name on the server.")  # fmt: skip
    max_concurrency: int = Field(default=8, description="endpoint: requests in flight.")


class JudgeSpec(dg.Resolvable, dg.Model):
    backend: Literal["local", "endpoint"] = Field(default="local", description="A local model, or an endpoint.")  # fmt: skip
    base_url: str | None = Field(default=None, description="endpoint: e.g. https://api.openai.com/v1")  # fmt: skip
    api_key_env: str | None = Field(
        default=None, description="endpoint: NAME of the variable holding the key.", examples=["OPENAI_API_KEY"]
    )  # fmt: skip
    batch_size: int = Field(default=8, description="local: prompts per forward pass.")
    annotator: Literal["bft", "weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_gpt4"] = Field(
        default="bft",
        description="How the judge is asked and read: AlpacaEval 2's weighted_alpaca_eval_gpt4_turbo or AlpacaEval 1's "
        "alpaca_eval_gpt4 (templates and configs from the installed alpaca-eval; with GPT-4-Turbo / GPT-4 as the judge "
        "they give numbers comparable with the paper's tables), or bft's one-token prompt for small local judges.",
        examples=["weighted_alpaca_eval_gpt4_turbo"],
    )


class TrainerSpec(dg.Resolvable, dg.Model):
    method: Literal["full", "lora"] = Field(default="full", description="Full fine-tuning or LoRA.")
    merge_lora: bool = Field(default=True, description="Merge LoRA adapters into the checkpoint.")
    micro_batch_size: int = Field(default=4, description="Examples per forward pass and process.")
    max_seq_len: int | None = Field(
        default=None,
        description="Tokens per example; longer ones are cut and counted. Default: the base model's context.",
    )
    log_every: int = Field(default=10, description="Log every N optimizer steps.")
    num_gpus: int = Field(default=1, description="Processes (GPUs) per training run (accelerate launch when > 1).")  # fmt: skip
    distributed: str = Field(
        default="auto",
        description="accelerate config: auto, single_gpu, ddp, fsdp, zero3, zero3_offload, or a YAML path.",
        examples=["fsdp", "zero3_offload", "/etc/bft/my_accelerate.yaml"],
    )
    launcher: Literal["auto", "in_process", "subprocess"] = Field(default="auto", description="Where training runs.")  # fmt: skip
    bf16: bool | None = Field(default=None, description="bf16 weights; default: where the GPU supports it.")  # fmt: skip
    gradient_checkpointing: bool | None = Field(default=None, description="Default: on a GPU.")
    gpu_memory_gb: float | None = Field(
        default=None, description="One GPU's memory for the fit check; default: read from the GPU."
    )

    @field_validator("distributed")
    @classmethod
    def _a_strategy(cls, value: str) -> str:
        from bft_resources.distributed import STRATEGIES

        if value != "auto" and value not in STRATEGIES and not value.endswith((".yaml", ".yml")):
            raise ValueError(
                f"distributed {value!r}: auto, {', '.join(STRATEGIES)} or a path to a .yaml file"
            )
        return value


class TrainingSettings(dg.Resolvable, dg.Model):
    """METHOD.md step 4 (7B): cosine schedule, batch 32, weight decay 0.1, dropout 0.1, lr 1e-5."""

    learning_rate: float = Field(default=1e-5, description="Peak learning rate (paper: 1e-5 7B, 5.5e-6 70B).")  # fmt: skip
    steps: list[int] = Field(
        default=[600, 900, 1200],
        description="Optimizer steps with a checkpoint each; training ends at the last and eval_scores "
        "reports every one and the best (paper, 7B: 600, 900, 1200). A seed model keeps its last.",
        examples=[[600, 900, 1200], [3]],
    )
    batch_size: int = Field(default=32, description="Examples per optimizer step.")
    weight_decay: float = Field(default=0.1, description="AdamW weight decay.")
    dropout: float = Field(default=0.1, description="Every dropout the architecture exposes (the manifest names them).")  # fmt: skip
    warmup_ratio: float = Field(
        default=0.0,
        description="Share of steps warming up the learning rate (not in the paper: 0 unless set).",
    )
    seed: int = Field(default=0, description="Initialization and data order.")


class SamplingSpec(dg.Resolvable, dg.Model):
    temperature: float = Field(default=PAPER_TEMPERATURE, description="Sampling temperature (paper: 1.0).")  # fmt: skip
    top_p: float = Field(default=PAPER_TOP_P, description="Nucleus mass (paper: 0.9).")
    max_new_tokens: int = Field(default=256, description="Most tokens generated per reply.")
    seed: int = Field(default=0, description="Sampling seed (per batch).")
    batch_rows: int = Field(default=32, description="Rows per persisted batch (the unit of resumption).")  # fmt: skip


class ScoringSpec(SamplingSpec):
    mode: Literal["generate", "logprobs"] = Field(
        default="generate",
        description="generate: sample the reasoning and parse 'Score: N' (paper); logprobs: read P(1..5).",
    )
    max_new_tokens: int = Field(default=512, description="generate: most tokens of the reasoning.")
    min_valid_rate: float = Field(default=0.8, description="WARN under this valid-score rate (paper: 88%).")  # fmt: skip
    hard_min_valid_rate: float = Field(default=0.5, description="ERROR under this valid-score rate.")  # fmt: skip


class RewritingSpec(SamplingSpec):
    max_new_tokens: int = Field(default=1024, description="Most tokens of a distilled answer.")
    rewrite_length_ratio: float = Field(
        default=1.25,
        description="A rewrite may take this many tokens per token of its draft (it copies the draft where it can)...",
    )
    rewrite_extra_tokens: int = Field(default=64, description="... plus these (the [RES] markers, a short draft's growth).")  # fmt: skip
    force_format: bool = Field(
        default=False, description="Open the reply with [RES] and stop at [/RES] (small models)."
    )
    min_extraction_rate: float = Field(default=0.5, description="WARN under this extraction rate.")  # fmt: skip


class GenerationSpec(dg.Resolvable, dg.Model):
    backtranslation: SamplingSpec = Field(default_factory=SamplingSpec, description="Step 1.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="Step 2.")
    rewriting: RewritingSpec = Field(default_factory=RewritingSpec, description="Step 3.")


Responses = Literal["none", "web", "rewrite", "distilled"]


class RecipeSpec(dg.Resolvable, dg.Model):
    """What one recipe trains on: seed pairs plus a selection of generated pairs."""

    name: str = Field(description="The recipe's partition key.", examples=["filtering_rewriting"])
    responses: Responses = Field(
        description="none (seed only), web (the document), rewrite (the rewriter's), distilled (the chat model's own answer)."
    )
    min_score: int | None = Field(
        default=None,
        description="Keep generated pairs scored at least this (paper: 5); null: no filter.",
    )
    generated_size: int | None = Field(
        default=None, description="Generated pairs trained on (a deterministic sample); null: all."
    )
    sample_seed: int = Field(default=0, description="Seed of that sample.")
    training: TrainingSettings | None = Field(
        default=None, description="Overrides the instance's training settings for this recipe."
    )

    @field_validator("min_score")
    @classmethod
    def _a_score(cls, score: int | None) -> int | None:
        if score is not None and not 1 <= score <= 5:
            raise ValueError(f"min_score {score}: scores run from 1 to 5")
        return score

    @field_validator("name")
    @classmethod
    def _a_partition_name(cls, name: str) -> str:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"recipe name {name!r}: letters, digits and _ only")
        return name


# The recipes of BFT Tables 1 and 2 (filtering_distilling: Table 2), plus the seed-only baseline.
PAPER_RECIPES = (
    RecipeSpec(name="seed_only", responses="none"),
    RecipeSpec(name="filtering", responses="web", min_score=PAPER_THRESHOLD),
    RecipeSpec(name="rewriting", responses="rewrite"),
    RecipeSpec(name="filtering_rewriting", responses="rewrite", min_score=PAPER_THRESHOLD),
    RecipeSpec(name="filtering_distilling", responses="distilled", min_score=PAPER_THRESHOLD),
)


class EvalSpec(dg.Resolvable, dg.Model):
    uri: str = Field(
        description=f"AlpacaEval JSON list or JSONL ({{instruction, output, ...}}); {DEMO_DATA!r}: 8 demo instructions.",
        examples=["/data/alpaca_eval/alpaca_eval.json", DEMO_DATA],
    )
    reference: Literal["dataset", "base_model"] = Field(
        default="dataset", description="Reference answers: the set's outputs, or the untuned base model's."
    )  # fmt: skip
    limit: int | None = Field(default=None, description="Evaluate the first N instructions only.")
    temperature: float = Field(default=0.7, description="Answer sampling temperature (paper: 0.7).")  # fmt: skip
    top_p: float = Field(default=0.9, description="Answer nucleus mass (paper: 0.9).")
    max_new_tokens: int = Field(default=512, description="Most tokens of an answer.")
    seed: int = Field(default=0, description="Sampling seed.")
    batch_rows: int = Field(default=16, description="Instructions per persisted batch.")
    tags: list[str] = Field(default_factory=lambda: ["assistant", "web_if_needed"], description="Suffix variants.")  # fmt: skip
    min_agreement: float = Field(default=0.6, description="WARN under this both-order agreement.")
    diversity_sample: int = Field(default=1000, description="Generated pairs for trigram counts.")
    mauve_texts: int = Field(
        default=10000, description="Pairs per side for MAUVE (paper: 10K; 0: skip)."
    )
    mauve_featurizer: str = Field(
        default="",
        description="GPT-2-family model folder for MAUVE's features (paper: the MAUVE package's default GPT-2, gpt2-large); empty: MiniLM.",
    )


class S3Spec(dg.Resolvable, dg.Model):
    """S3 client settings; credentials come from boto3's chain (variables, profile, role)."""

    endpoint_url: str | None = Field(default=None, description="e.g. a MinIO or moto server.")
    region_name: str | None = Field(default=None, description="e.g. us-east-1")
    profile_name: str | None = Field(default=None, description="An AWS profile.")


KEY_PREFIX_PATTERN = r"^[a-z][a-z0-9_]*$"


def check_recipes(recipes: list[RecipeSpec]) -> list[RecipeSpec]:
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique: {names}")
    if not recipes:
        raise ValueError("declare at least one recipe")
    return recipes

"""The one Definitions object of bft: assets, checks, sensors, jobs and resources."""

import os

import dagster as dg
from dagster_aws.s3 import S3Resource

from bft_assets.backtranslation import backtranslated_pool
from bft_assets.corpus import candidate_responses, corpus_documents, corpus_shard_sensor
from bft_assets.evaluation import eval_scores
from bft_assets.partitions import corpus_shards, directions, recipes
from bft_assets.policies import inference_gpus, rebuild_stale_sensor, training_gpus
from bft_assets.rewriting import rewritten_dataset
from bft_assets.scoring import scored_pool
from bft_assets.seed import seed_examples
from bft_assets.seed_model import seed_model
from bft_assets.settings import resolved, setting
from bft_assets.training import finetuned_checkpoint
from bft_resources.corpus import CorpusSource
from bft_resources.embeddings import Embedder
from bft_resources.engine import InferenceEngine
from bft_resources.eval_source import EvalSetSource
from bft_resources.judge import Judge
from bft_resources.models import ModelResource
from bft_resources.seed_source import SeedSource
from bft_resources.storage import storage_for
from bft_resources.trainer import Trainer

SEED_JOB = "seed_job"
SHARD_JOB = "shard_job"
OBSERVE_CORPUS_JOB = "observe_corpus_job"
SEED_MODEL_JOB = "seed_model_job"
RECIPE_JOB = "recipe_job"

seed_job = dg.define_asset_job(
    SEED_JOB, selection=[seed_examples], description="Build the seed set."
)
shard_job = dg.define_asset_job(
    SHARD_JOB,
    selection=dg.AssetSelection.assets(
        candidate_responses, backtranslated_pool, scored_pool, rewritten_dataset
    ),
    partitions_def=corpus_shards,
    description="Build every per-shard asset for one corpus shard.",
)

seed_model_job = dg.define_asset_job(
    SEED_MODEL_JOB,
    selection=[seed_model],
    partitions_def=directions,
    description="Train the backward or forward seed model.",
)
recipe_job = dg.define_asset_job(
    RECIPE_JOB,
    selection=[finetuned_checkpoint, eval_scores],
    partitions_def=recipes,
    description="Fine-tune the base model on one recipe's training set and evaluate it.",
)
observe_corpus_job = dg.define_asset_job(
    OBSERVE_CORPUS_JOB,
    selection=dg.AssetSelection.assets(corpus_documents.key),
    description="Fingerprint every known shard, so changed shards mark their partitions stale.",
)


# S3Resource field -> the standard AWS variable it comes from. A field whose variable is
# unset stays empty and boto3's own chain (profile, instance role, SSO) fills it in.
S3_SETTINGS = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region_name": "AWS_REGION",
    "profile_name": "AWS_PROFILE",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}


def _s3() -> S3Resource:
    """S3 client settings, every value an EnvVar: the UI shows where each comes from, and
    a credential never sits in the definitions or a log."""
    return S3Resource(
        **{field: dg.EnvVar(var) for field, var in S3_SETTINGS.items() if os.environ.get(var)}
    )


def step_executor() -> dg.ExecutorDefinition | None:
    """Where a run's steps execute (BFT_EXECUTOR). k8s and ecs give every step its own pod or
    task, so that each asks for the GPUs its op tags name and CPU steps ask for none."""
    kind = resolved("BFT_EXECUTOR")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind == "ecs":
        from dagster_aws.ecs import ecs_executor

        return ecs_executor
    if kind == "in_process":
        return dg.in_process_executor  # no process per step: ~3 s less per step on 2 cores
    if kind != "multiprocess":
        raise ValueError(f"BFT_EXECUTOR={kind!r}: use multiprocess, in_process, k8s or ecs")
    return None


def _judge() -> Judge:
    if resolved("BFT_JUDGE_URL"):
        api_key = dg.EnvVar("BFT_JUDGE_API_KEY") if os.environ.get("BFT_JUDGE_API_KEY") else None
        return Judge(backend="endpoint", base_url=setting("BFT_JUDGE_URL"), model=setting("BFT_JUDGE_MODEL"),
                     api_key=api_key)  # fmt: skip
    return Judge(backend="local", model=setting("BFT_JUDGE_MODEL"))


def build_resources() -> dict[str, object]:
    s3 = _s3()
    return {
        "storage": storage_for(setting("BFT_STORAGE"), resolved("BFT_STORAGE"), s3),
        "seed_source": SeedSource(uri=setting("BFT_SEED_URI")),
        "corpus": CorpusSource(uri=setting("BFT_CORPUS_URI"), s3=s3),
        "base_model": ModelResource(model=setting("BFT_BASE_MODEL"), s3=s3),
        "backward_model": ModelResource(model=setting("BFT_BACKWARD_MODEL"), s3=s3),
        "forward_model": ModelResource(model=setting("BFT_FORWARD_MODEL"), s3=s3),
        "rewriter_model": ModelResource(model=setting("BFT_REWRITER_MODEL"), s3=s3),
        "engine": InferenceEngine(
            backend=resolved("BFT_ENGINE"), tensor_parallel_size=inference_gpus()
        ),
        "trainer": Trainer(num_gpus=training_gpus()),
        "judge": _judge(),
        "eval_set": EvalSetSource(uri=setting("BFT_EVAL_URI")),
        "embedder": Embedder(),
    }


defs = dg.Definitions(
    assets=[
        seed_examples,
        corpus_documents,
        candidate_responses,
        backtranslated_pool,
        scored_pool,
        rewritten_dataset,
        seed_model,
        finetuned_checkpoint,
        eval_scores,
    ],
    sensors=[corpus_shard_sensor, rebuild_stale_sensor],
    jobs=[seed_job, seed_model_job, shard_job, recipe_job, observe_corpus_job],
    resources=build_resources(),
    executor=step_executor(),
)

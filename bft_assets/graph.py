"""One instance's definitions: its assets and checks, partition sets, jobs and sensors, every
name carrying the instance's key prefix. No executor and no resource: those are the host's
(each asset holds the machinery its declaration resolved into)."""

import warnings

import dagster as dg

from bft_assets.backtranslation import build_backtranslated_pool
from bft_assets.candidates import build_candidate_responses
from bft_assets.corpus import (
    build_corpus_documents,
    build_recipe_sensor,
    build_recipes,
    build_shard_sensor,
)
from bft_assets.evaluation.asset import build_eval_scores
from bft_assets.instance import (
    BACKTRANSLATED_POOL,
    CANDIDATE_RESPONSES,
    CORPUS_DOCUMENTS,
    EVAL_SCORES,
    FINETUNED_CHECKPOINT,
    RECIPES,
    REWRITTEN_DATASET,
    SCORED_POOL,
    SEED_EXAMPLES,
    SEED_MODEL,
    Instance,
)
from bft_assets.policies import AUTOMATION_SENSOR, rebuild_stale_sensor
from bft_assets.rewriting import build_rewritten_dataset
from bft_assets.scoring import build_scored_pool
from bft_assets.seed import build_seed_examples
from bft_assets.seed_model import build_seed_model
from bft_assets.training import build_finetuned_checkpoint

SEED_JOB = "seed_job"
SEED_MODEL_JOB = "seed_model_job"
SHARD_JOB = "shard_job"
RECIPE_JOB = "recipe_job"
OBSERVE_CORPUS_JOB = "observe_corpus_job"
OBSERVE_RECIPES_JOB = "observe_recipes_job"
PER_SHARD = (CANDIDATE_RESPONSES, BACKTRANSLATED_POOL, SCORED_POOL, REWRITTEN_DATASET)


def build_assets(inst: Instance) -> list[dg.AssetsDefinition]:
    assets = [
        build_seed_examples(inst),
        build_corpus_documents(inst),
        build_candidate_responses(inst),
        build_backtranslated_pool(inst),
        build_scored_pool(inst),
        build_rewritten_dataset(inst),
        build_recipes(inst),
        build_finetuned_checkpoint(inst),
        build_eval_scores(inst),
    ]
    if inst.trains_seed_model():
        assets.append(build_seed_model(inst))
    return assets


def build_jobs(inst: Instance) -> list:
    def keys(*names: str) -> dg.AssetSelection:
        return dg.AssetSelection.assets(*(inst.key(n) for n in names))

    jobs = [
        dg.define_asset_job(inst.name(SEED_JOB), selection=keys(SEED_EXAMPLES), description="Build the seed set."),
        dg.define_asset_job(inst.name(SHARD_JOB), selection=keys(*PER_SHARD), partitions_def=inst.shards,
                            description="Build every per-shard asset for one corpus shard."),
        dg.define_asset_job(inst.name(RECIPE_JOB), selection=keys(FINETUNED_CHECKPOINT, EVAL_SCORES),
                            partitions_def=inst.recipe_partitions,
                            description="Fine-tune the base model on one recipe's training set and evaluate it."),
        dg.define_asset_job(inst.name(OBSERVE_CORPUS_JOB), selection=keys(CORPUS_DOCUMENTS),
                            description="Fingerprint every known shard, so changed shards mark their partitions stale."),
        dg.define_asset_job(inst.name(OBSERVE_RECIPES_JOB), selection=keys(RECIPES),
                            description="Record each recipe declaration's version, so an edited recipe marks its own "
                                        "checkpoint and evaluation stale."),
    ]  # fmt: skip
    if inst.trains_seed_model():
        jobs.append(
            dg.define_asset_job(
                inst.name(SEED_MODEL_JOB),
                selection=keys(SEED_MODEL),
                partitions_def=inst.directions,
                description="Train the backward or forward seed model.",
            )
        )
    return jobs


def build_instance_defs(inst: Instance) -> dg.Definitions:
    # Code references are a beta API of Dagster's: its warning is Dagster's to give, not a
    # line for every user of bft in every run log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        assets = dg.with_source_code_references(build_assets(inst))
    return dg.Definitions(
        assets=assets,
        jobs=build_jobs(inst),
        sensors=[
            build_shard_sensor(inst),
            build_recipe_sensor(inst),
            rebuild_stale_sensor(
                inst.name(AUTOMATION_SENSOR), dg.AssetSelection.key_prefixes([inst.prefix])
            ),
        ],
    )

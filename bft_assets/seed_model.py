"""seed_model[direction]: the base model fine-tuned on the seed pairs (METHOD.md, Models).

The backward model p(x|y) learns from seed pairs reversed: the response inside the
backtranslation prompt as input, the instruction as target. The forward model p(y|x)
learns from the seed pairs as they are. Generation stages read these checkpoints.
"""

from pathlib import Path

import dagster as dg
import polars as pl

from bft_assets.partitions import directions
from bft_assets.policies import gpu_step, training_gpus
from bft_assets.prompts import BACKTRANSLATE, llama2_inst
from bft_assets.seed import SEED_EXAMPLES, seed_examples
from bft_assets.settings import resolved
from bft_assets.tuning import (
    TRAINING_VERSION,
    TrainingConfig,
    loss_check,
    probe_check,
    training_metadata,
)
from bft_resources.engine import InferenceEngine
from bft_resources.models import ModelResource
from bft_resources.storage import Storage
from bft_resources.trainer import Trainer, TrainingExample

SEED_MODEL = "seed_model"
CHECK_SEED_LOSS = "seed_model_loss_decreased"
CHECK_SEED_LOADS = "seed_model_checkpoint_generates"


def seed_training_examples(seed: pl.DataFrame, direction: str) -> list[TrainingExample]:
    """Backward: (backtranslation prompt around the response) -> instruction. Forward:
    instruction -> response."""
    if direction == "backward":
        return [TrainingExample(BACKTRANSLATE.render(response=r), i, "seed")
                for i, r in zip(seed["instruction"], seed["response"], strict=True)]  # fmt: skip
    return [
        TrainingExample(i, r, "seed")
        for i, r in zip(seed["instruction"], seed["response"], strict=True)
    ]


def stage_model(source: str, storage: Storage, direction: str, configured: ModelResource) -> str:
    """The model a generation stage loads: the trained seed_model checkpoint of its
    direction, or the configured model (before seed_model exists, or by choice)."""
    if source == "configured":
        return configured.model
    return str(seed_model_checkpoint(storage, direction))


def seed_model_checkpoint(storage: Storage, direction: str) -> Path:
    """The trained checkpoint of a direction; a clear error when it is not there yet."""
    try:
        return storage.fetch_checkpoint(SEED_MODEL, direction)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}; or set model_source: configured to use the configured model instead"
        ) from exc


@dg.asset(
    partitions_def=directions,
    deps=[seed_examples],
    group_name="training",
    kinds={"transformers"},
    **gpu_step(training_gpus()),
    code_version=f"{TRAINING_VERSION};prompt={BACKTRANSLATE.version};base={resolved('BFT_BASE_MODEL')}",
    check_specs=[
        dg.AssetCheckSpec(CHECK_SEED_LOSS, asset=SEED_MODEL, blocking=True,
                          description="Training loss is finite and lower at the end than at the start."),
        dg.AssetCheckSpec(CHECK_SEED_LOADS, asset=SEED_MODEL, blocking=True,
                          description="The saved checkpoint loads back and answers a fixed prompt."),
    ],
)  # fmt: skip
def seed_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    base_model: ModelResource,
    trainer: Trainer,
    engine: InferenceEngine,
    storage: Storage,
) -> dg.MaterializeResult:
    """The base model fine-tuned on the seed pairs: `backward` learns p(instruction |
    response) to backtranslate web documents, `forward` learns p(response | instruction) to
    score the generated pairs."""
    direction = context.partition_key
    seed = storage.read(SEED_EXAMPLES)
    examples = seed_training_examples(seed, direction)
    result = trainer.fine_tune(
        str(base_model.local_path()), examples, str(storage.checkpoint_dir(SEED_MODEL, direction)), trainer.hyperparameters(**config.values()),
        base_reference=base_model.reference, fallback=llama2_inst, log=context.log.info, context=context,
        extra_manifest={"direction": direction},
    )  # fmt: skip
    uri = storage.publish_checkpoint(SEED_MODEL, direction)
    checkpoint = str(storage.fetch_checkpoint(SEED_MODEL, direction))
    return dg.MaterializeResult(
        metadata={
            "direction": direction,
            "rows": len(examples),
            **training_metadata(result, uri),
            "base_model": base_model.reference,
        },
        check_results=[
            loss_check(CHECK_SEED_LOSS, result),
            probe_check(CHECK_SEED_LOADS, engine, checkpoint),
        ],
    )

"""seed_model[direction]: the base model fine-tuned on the seed pairs (METHOD.md, Models).

The backward model p(x|y) learns from seed pairs reversed: the response inside the
backtranslation prompt as input, the instruction as target. The forward model p(y|x)
learns from the seed pairs as they are. Generation stages read these checkpoints.
"""

import dagster as dg
import polars as pl

from bft_assets.instance import SEED_EXAMPLES, SEED_MODEL, BftInstance
from bft_assets.prompts import BACKTRANSLATE, llama2_inst
from bft_assets.specs import TrainingSettings
from bft_assets.tuning import loss_check, probe_check, training_metadata, training_version
from bft_resources.trainer import Hyperparameters, Trainer, TrainingExample

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


def seed_hyperparameters(trainer: Trainer, settings: TrainingSettings) -> Hyperparameters:
    """A seed model trains to the last declared step and keeps that checkpoint only: the
    generation stages read one model (the several-checkpoint protocol is for evaluated models)."""
    return trainer.hyperparameters(**{**settings.model_dump(), "steps": [max(settings.steps)]})


def build_seed_model(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(SEED_MODEL)
    table = inst.table(SEED_MODEL)
    settings = inst.training_for(None)

    @dg.asset(
        **inst.asset_args(SEED_MODEL, {"huggingface", "pytorch"}, {"base_model", "trainer", "engine", "storage"}),
        partitions_def=inst.directions,
        deps=[inst.key(SEED_EXAMPLES)],
        group_name="training",
        **inst.gpu_args(inst.trainer.num_gpus),
        code_version=f"{training_version(inst, settings)};prompt={BACKTRANSLATE.version}",
        check_specs=[
            dg.AssetCheckSpec(CHECK_SEED_LOSS, asset=key, blocking=True,
                              description="Training loss is finite and lower at the end than at the start."),
            dg.AssetCheckSpec(CHECK_SEED_LOADS, asset=key, blocking=True,
                              description="The saved checkpoint loads back and answers a fixed prompt."),
        ],
    )  # fmt: skip
    def seed_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The base model fine-tuned on the seed pairs: `backward` learns p(instruction |
        response) to backtranslate web documents, `forward` learns p(response | instruction)
        to score the generated pairs."""
        r = inst.bound(context)
        storage, trainer, base_model = r.storage, r.trainer, r.base_model
        direction = context.partition_key
        seed = storage.read(inst.table(SEED_EXAMPLES))
        examples = seed_training_examples(seed, direction)
        result = trainer.fine_tune(
            str(base_model.local_path()), examples, str(storage.checkpoint_dir(table, direction)),
            seed_hyperparameters(trainer, settings), base_reference=base_model.reference,
            fallback=llama2_inst, log=context.log.info, context=context, extra_manifest={"direction": direction},
        )  # fmt: skip
        uri = storage.publish_checkpoint(table, direction)
        checkpoint = str(storage.fetch_checkpoint(table, direction))
        return dg.MaterializeResult(
            metadata={
                "direction": direction,
                "rows": len(examples),
                **training_metadata(result, uri),
                "base_model": base_model.reference,
            },
            check_results=[
                loss_check(CHECK_SEED_LOSS, result),
                probe_check(CHECK_SEED_LOADS, r.engine, checkpoint),
            ],
        )

    return seed_model

"""seed_model[direction]: the seed-model base fine-tuned on the seed pairs (docs/method.md, Models).

The backward model p(x|y) learns from seed pairs reversed: the response inside the
backtranslation prompt as input, the instruction as target. The forward model p(y|x)
learns from the seed pairs as they are. Generation stages read these checkpoints. Their
base is ``models.seed_base`` (the paper: Llama-2-70B in every experiment) and their schedule
``seed_training``.
"""

import dagster as dg
import polars as pl

from bft_assets.instance import SEED_EXAMPLES, SEED_MODEL, Instance
from bft_assets.prompts import BACKTRANSLATE
from bft_assets.stage import StageRun, stage_asset
from bft_assets.tuning import (
    fine_tune,
    loss_check,
    probe_check,
    training_checks,
    training_metadata,
    training_version,
)
from bft_resources.trainer import TrainingExample

LOSS, LOADS = training_checks(SEED_MODEL)


def seed_training_examples(seed: pl.DataFrame, direction: str) -> list[TrainingExample]:
    """Backward: (backtranslation prompt around the response) -> instruction. Forward:
    instruction -> response."""
    pairs = zip(seed["instruction"], seed["response"], strict=True)
    if direction == "backward":
        return [TrainingExample(BACKTRANSLATE.render(response=r), i, "seed") for i, r in pairs]
    return [TrainingExample(i, r, "seed") for i, r in pairs]


def build_seed_model(inst: Instance) -> dg.AssetsDefinition:
    base, settings = inst.model("seed_base"), inst.decl.seed_training
    version = (
        f"{training_version(inst, base, settings, role='seed')};prompt={BACKTRANSLATE.version}"
    )

    @stage_asset(inst, SEED_MODEL, group="training", kinds={"huggingface", "pytorch"}, checks=(LOSS, LOADS),
                 code_version=version, partitions=inst.directions, deps=[inst.key(SEED_EXAMPLES)],
                 gpus=inst.trainer("seed").num_gpus)  # fmt: skip
    def seed_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The seed-model base fine-tuned on the seed pairs: `backward` learns p(instruction |
        response) to backtranslate web documents, `forward` learns p(response | instruction)
        to score the generated pairs. It keeps its last step's checkpoint."""
        run = StageRun(inst, context)
        direction = run.partition
        examples = seed_training_examples(run.storage.read(inst.table(SEED_EXAMPLES)), direction)
        # One model per direction: the generation stages read the last declared step's.
        last = settings.model_copy(update={"steps": [settings.max_steps]})
        parts = {
            last.max_steps: direction
        }  # <seed_model>/<direction>: what the generation stages load
        result, index, local = fine_tune(
            run, base, examples, last, direction, parts, {"direction": direction}, role="seed"
        )
        return run.report(
            pl.DataFrame({"direction": [direction]}), index[-1]["uri"], {},
            metadata={"direction": direction, "examples": len(examples), **training_metadata(result, index, base)},
            checks=[loss_check(LOSS.check_name, result), probe_check(LOADS.check_name, inst, local[last.max_steps])],
        )  # fmt: skip

    return seed_model

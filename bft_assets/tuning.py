"""What seed_model and finetuned_checkpoint share: the fine-tune itself (seen from a stage
run), the checks on a finished training run, its metadata, and the part of their code
version that says how they train."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from bft_assets.checkpoint_index import checkpoint_partition, publish_checkpoints
from bft_assets.instance import Instance, digest
from bft_assets.prompts import llama2_inst
from bft_assets.reporting import markdown_table
from bft_assets.stage import Check, StageRun
from bft_resources.engine import Chat, Sampling
from bft_resources.models import ModelRef
from bft_resources.trainer import TrainingExample, TrainingResult, TrainingSettings

TRAINING_VERSION = "sft-v2"
PROBE_PROMPT = "Give one tip for writing clear documentation."


def training_version(
    inst: Instance, base: ModelRef, *settings: object, role: str = "recipe"
) -> str:
    """What changes a trained model besides its data: the trainer, the settings, the base."""
    return f"{TRAINING_VERSION};{digest(inst.trainer(role), base.reference, *settings)}"


def loss_check(name: str, result: TrainingResult) -> dg.AssetCheckResult:
    finite = all(math.isfinite(x) for x in result.losses)
    return dg.AssetCheckResult(
        check_name=name,
        passed=finite and result.final_loss < result.first_loss,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
            "all_finite": finite,
        },
    )


def probe_check(name: str, inst: Instance, checkpoint: Path) -> dg.AssetCheckResult:
    """The saved checkpoint loads in the inference engine and answers a fixed prompt."""
    with inst.engine().load(ModelRef(model=str(checkpoint)), fallback=llama2_inst) as model:
        # A few tokens show that it answers; the check reads no more (a CPU pays per token).
        (reply,) = model.generate([Chat(PROBE_PROMPT)], Sampling(temperature=0.0, max_tokens=16))
    return dg.AssetCheckResult(
        check_name=name, passed=bool(reply.text.strip()),
        metadata={"prompt": PROBE_PROMPT, "reply": reply.text[:500]},
    )  # fmt: skip


def training_checks(prefix: str) -> tuple[Check, Check]:
    return (Check(f"{prefix}_loss_decreased", "Training loss is finite and lower at the end than at the start.", blocking=True),
            Check(f"{prefix}_checkpoint_generates", "The saved checkpoint loads back and answers a fixed prompt.",
                  blocking=True))  # fmt: skip


def run_parts(run: StageRun, name: str, settings: TrainingSettings) -> dict[int, str]:
    """Where each declared step's checkpoint of this run goes (``<name>.step<N>.<run>``)."""
    return {step: checkpoint_partition(name, step, run.context.run_id) for step in settings.steps}


def fine_tune(
    run: StageRun, base: ModelRef, examples: Sequence[TrainingExample], settings: TrainingSettings,
    name: str, parts: dict[int, str], manifest: dict[str, Any], role: str = "recipe",
) -> tuple[TrainingResult, list[dict], dict[int, Path]]:  # fmt: skip
    """Fine-tune ``base`` with the instance's trainer, each declared step's checkpoint into
    its part of the asset's folder, each published, and the run's index written for ``name``."""
    folders = {
        step: str(run.storage.checkpoint_dir(run.table, part)) for step, part in parts.items()
    }
    result = run.inst.trainer(role).fine_tune(
        base, examples, folders[settings.max_steps], settings, fallback=llama2_inst, log=run.log,
        context=run.context, extra_manifest={**manifest, "run_id": run.context.run_id}, checkpoint_dirs=folders,
    )  # fmt: skip
    index, local = publish_checkpoints(
        run.storage, run.table, name, parts, result, run.context.run_id
    )
    return result, index, local


def training_metadata(result: TrainingResult, index: list[dict], base: ModelRef) -> dict[str, Any]:
    every = max(1, len(result.losses) // 20)
    curve = [{"step": i + 1, "loss": round(x, 4), "lr": f"{result.learning_rates[i]:.2e}"}
             for i, x in enumerate(result.losses) if i % every == 0 or i == len(result.losses) - 1]  # fmt: skip
    return {
        "checkpoint": dg.MetadataValue.path(index[-1]["uri"]),
        "checkpoints": markdown_table(
            [{k: r[k] for k in ("step", "partition", "probe_loss")} for r in index]
        ),
        "steps": result.steps,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "loss_curve": markdown_table(curve),
        "train_seconds": round(result.seconds, 1),
        "train_tokens_per_second": round(result.tokens / result.seconds, 1)
        if result.seconds
        else 0.0,
        "truncated_examples": result.truncated_examples,
        "data_hash": result.manifest.get("data_hash", ""),
        "base_model": base.reference,
    }

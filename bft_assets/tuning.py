"""What seed_model and finetuned_checkpoint share: the checks on a finished training run,
its metadata, and the part of their code version that says how they train."""

import math

import dagster as dg

from bft_assets.instance import BftInstance, digest
from bft_assets.prompts import llama2_inst
from bft_assets.reporting import markdown_table
from bft_resources.engine import Chat, InferenceEngine, Sampling
from bft_resources.models import ModelResource
from bft_resources.trainer import TrainingResult

TRAINING_VERSION = "sft-v1"


def training_version(inst: BftInstance, recipe_settings: object) -> str:
    """What changes a trained model: the trainer, the training settings, the base model."""
    return f"{TRAINING_VERSION};{digest(inst.trainer, recipe_settings, inst.models.base)}"


PROBE_PROMPT = "Give one tip for writing clear documentation."


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


def probe_check(name: str, engine: InferenceEngine, checkpoint: str) -> dg.AssetCheckResult:
    """The saved checkpoint loads in the inference engine and answers a fixed prompt."""
    with engine.load(ModelResource(model=checkpoint), fallback=llama2_inst) as model:
        (reply,) = model.generate([Chat(PROBE_PROMPT)], Sampling(temperature=0.0, max_tokens=32))
    return dg.AssetCheckResult(
        check_name=name,
        passed=bool(reply.text.strip()),
        metadata={"prompt": PROBE_PROMPT, "reply": reply.text[:500]},
    )


def training_metadata(result: TrainingResult, checkpoint: str) -> dict:
    every = max(1, len(result.losses) // 20)
    curve = [{"step": i + 1, "loss": round(x, 4), "lr": f"{result.learning_rates[i]:.2e}"}
             for i, x in enumerate(result.losses) if i % every == 0 or i == len(result.losses) - 1]  # fmt: skip
    return {
        "checkpoint": dg.MetadataValue.path(checkpoint),
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
    }

"""Configuration from the environment: the variables a user sets, and their defaults.

A value comes through ``dagster.EnvVar`` when the variable is set (so the UI shows where it
came from and secrets never sit in the definitions), and from the default otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from bft_assets.demo import demo_eval_path, demo_seed_path
from bft_resources.models import SMOLLM2

DEFAULT_HOME = Path("~/.bft").expanduser()

# variable -> (default, what it sets)
SETTINGS: dict[str, tuple[str, str]] = {
    "BFT_STORAGE": (str(DEFAULT_HOME / "storage"), "Root of all tables and checkpoints: a folder or s3://bucket/prefix."),
    "BFT_SEED_URI": (str(demo_seed_path()), "Seed pairs: an oasst *.trees.jsonl, flat JSONL/Parquet, or a folder."),
    "BFT_CORPUS_URI": (str(DEFAULT_HOME / "demo" / "corpus"), "Folder or s3://bucket/prefix of Dolma gzip JSONL shards."),
    "BFT_BASE_MODEL": (SMOLLM2, "Base model: built-in short name, local folder or hub id."),
    "BFT_BACKWARD_MODEL": ("", "Backward model p(x|y) until seed_model trains one (default: BFT_BASE_MODEL)."),
    "BFT_FORWARD_MODEL": ("", "Forward model p(y|x) that scores pairs until seed_model trains one (default: BFT_BASE_MODEL)."),
    "BFT_ENGINE": ("transformers", "Inference backend: transformers (CPU/GPU), vllm (GPU, the gpu extra) or endpoint."),
    "BFT_REWRITER_MODEL": (SMOLLM2, "Aligned chat model that rewrites responses."),
    "BFT_JUDGE_MODEL": (SMOLLM2, "Judge model for pairwise evaluation (a model reference, or the served name)."),
    "BFT_JUDGE_URL": ("", "OpenAI-compatible base URL of the judge; unset: the judge runs locally."),
    "BFT_EVAL_URI": (str(demo_eval_path()), "Evaluation set: AlpacaEval JSON list or JSONL."),
    "BFT_INFERENCE_GPUS": ("1", "GPUs per generation/evaluation step: vLLM tensor parallelism and the step's GPU request."),
    "BFT_TRAINING_GPUS": ("1", "GPUs per training step: accelerate processes and the step's GPU request."),
    "BFT_EXECUTOR": ("multiprocess", "Where steps run: multiprocess (a process per step), in_process (all in the run's process), k8s (a pod per step) or ecs (a task per step)."),
}  # fmt: skip


# An empty default means "the base model's value".
_FALLS_BACK_TO_BASE = "BFT_BASE_MODEL"


def setting(name: str) -> str | dg.EnvVar:
    """``EnvVar(name)`` when the variable is set, else its default."""
    return dg.EnvVar(name) if os.environ.get(name) else resolved(name)


_OPTIONAL = {"BFT_JUDGE_URL"}


def resolved(name: str) -> str:
    """The value in force now (for code versions and commands outside the resource system)."""
    if name in _OPTIONAL:
        return os.environ.get(name, "")
    return os.environ.get(name) or SETTINGS[name][0] or resolved(_FALLS_BACK_TO_BASE)

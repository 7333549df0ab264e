"""Where a training run runs: the accelerate configs bft ships (one per kind of hardware)
and the ``accelerate launch`` command that starts the training worker with one of them.

The configs are accelerate's own YAML, read by accelerate's own loader; bft only picks one by
name and overrides what the trainer resource declares (process count, mixed precision)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Literal

Strategy = Literal["single_gpu", "ddp", "fsdp", "zero3", "zero3_offload"]
STRATEGIES: tuple[str, ...] = ("single_gpu", "ddp", "fsdp", "zero3", "zero3_offload")
# Strategies that shard the model state (parameters, gradients, optimizer) across processes.
SHARDED = frozenset({"fsdp", "zero3", "zero3_offload"})
WORKER_MODULE = "bft_resources.trainer.worker"


def config_path(strategy: str) -> Path:
    """The shipped accelerate config for a strategy, or a user's own YAML file by path."""
    if strategy in STRATEGIES:
        shipped = resources.files("bft_resources.trainer") / "accelerate_configs"
        return Path(str(shipped / f"{strategy}.yaml"))
    path = Path(strategy).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"accelerate config {strategy!r}: neither a shipped strategy ({', '.join(STRATEGIES)}) "
            "nor an existing file"
        )
    return path


def load_config(strategy: str):
    """The config as accelerate reads it (``ClusterConfig``); raises on an unknown field."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(config_path(strategy)))


def launch_arguments(strategy: str, num_processes: int, mixed_precision: str) -> list[str]:
    """``accelerate launch`` arguments (without the program) for a strategy."""
    args = ["--config_file", str(config_path(strategy)), "--num_processes", str(num_processes),
            "--mixed_precision", mixed_precision]  # fmt: skip
    if strategy == "ddp":
        args.append("--multi_gpu")
    return args


def launch_command(strategy: str, num_processes: int, mixed_precision: str) -> list[str]:
    """``accelerate launch`` run by this interpreter (a venv need not be on PATH)."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            *launch_arguments(strategy, num_processes, mixed_precision), "-m", WORKER_MODULE]  # fmt: skip


def validated_launch(strategy: str, num_processes: int, mixed_precision: str):
    """Parse and validate a launch as ``accelerate launch`` itself does, without starting it:
    the namespace it would launch with (``use_fsdp``, ``use_deepspeed``, ``num_processes``...)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(
        [*launch_arguments(strategy, num_processes, mixed_precision), "-m", WORKER_MODULE]
    )
    args, _, _ = _validate_launch_command(args)
    return args

"""The ``Trainer`` resource: how and where fine-tuning runs. The YAML's ``trainer`` resolves
into it; what is trained (schedule, batch, steps, protocol) is ``TrainingSettings``."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import ConfigDict, Field, field_validator, model_validator

from bft_resources.bounds import bounded, check_bounds
from bft_resources.models import ModelRef
from bft_resources.trainer.distributed import STRATEGIES, WORKER_MODULE, launch_command
from bft_resources.trainer.examples import Fallback, TrainingExample
from bft_resources.trainer.memory import Plan, estimate, model_shape, require_fit
from bft_resources.trainer.settings import TrainingSettings
from bft_resources.trainer.sft import (
    TrainingResult,
    context_length,
    result_from_message,
    train,
    uses_bf16,
)

# The caller's fallback rendering travels to a subprocess as a template with this slot.
MESSAGE_SLOT = "\x00message\x00"


class Trainer(dg.ConfigurableResource):
    """How fine-tuning runs: the method (full/LoRA), the micro batch and precision, and where:
    in the run's own process (CPU or one GPU), or as a subprocess through Dagster Pipes,
    launched by ``accelerate launch`` with one of bft's accelerate configs (DDP, FSDP,
    DeepSpeed ZeRO-3) over ``num_gpus`` processes. Whether to run the model's own code is the
    trained ``ModelRef``'s ``trust_remote_code``."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["full", "lora"] = Field(
        default="full", description="Full fine-tuning or LoRA (peft)."
    )
    merge_lora: bool = Field(
        default=True, description="Merge LoRA adapters into the saved checkpoint."
    )
    lora_r: int = bounded(16, ge=1, description="LoRA rank (method: lora).")
    lora_alpha: int = bounded(32, ge=1, description="LoRA scaling alpha (method: lora).")
    micro_batch_size: int = bounded(
        4,
        ge=1,
        description="Examples per forward pass and process; the declared batch comes from "
        "accumulation (batch = micro batch x processes x accumulation).",
    )
    max_seq_len: int | None = bounded(
        None,
        gt=0,
        description="Tokens per example (longer ones are cut, and counted; batches are padded "
        "to their longest example, never to this); default: the model's context_window, else "
        "its config's.",
    )
    log_every: int = bounded(
        10, ge=1, description="Log step, loss, learning rate and tokens/s every N steps."
    )
    num_gpus: int = bounded(
        1,
        ge=1,
        description="Processes to train with (GPUs; on a machine without CUDA, CPU processes over gloo).",
    )
    distributed: str = Field(
        default="auto",
        description="accelerate config: auto (single_gpu, or ddp over several), single_gpu, ddp, fsdp, "
        "zero3, zero3_offload, or a path to your own accelerate YAML.",
        examples=["fsdp", "zero3_offload", "/etc/bft/my_accelerate.yaml"],
    )
    launcher: Literal["auto", "in_process", "subprocess"] = Field(
        default="auto",
        description="auto: in-process on one device, a Pipes subprocess over several.",
    )
    bf16: bool | None = Field(
        default=None, description="bf16 weights and autocast; default: where the GPU supports it."
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations to save GPU memory; default: on a GPU, off on a CPU "
        "(where it only costs time).",
    )
    fused_lm_head: bool | None = Field(
        default=None,
        description="TRL's fused LM head (scores the vocabulary in tiles: less GPU memory with "
        "large vocabularies; ~40% slower per micro-batch on a CPU than the model's own loss); "
        "default: on a GPU.",
    )
    gpu_memory_gb: float | None = bounded(
        None,
        gt=0,
        description="Memory of one GPU for the fit check before training; default: read from the "
        "GPU (none on a CPU).",
    )

    @field_validator("distributed")
    @classmethod
    def _a_strategy(cls, value: str) -> str:
        if value != "auto" and value not in STRATEGIES and not value.endswith((".yaml", ".yml")):
            raise ValueError(
                f"distributed {value!r}: auto, {', '.join(STRATEGIES)} or a path to a .yaml file"
            )
        return value

    @model_validator(mode="after")
    def _within_bounds(self) -> Trainer:
        check_bounds(self)
        return self

    @property
    def strategy(self) -> str:
        if self.distributed != "auto":
            return self.distributed
        return "ddp" if self.num_gpus > 1 else "single_gpu"

    @property
    def in_process(self) -> bool:
        return self.launcher == "in_process" or (self.launcher == "auto" and self.num_gpus <= 1)

    def launch_command(self, mixed_precision: str) -> list[str]:
        if self.num_gpus > 1 or self.strategy not in ("single_gpu",):
            return launch_command(self.strategy, self.num_gpus, mixed_precision)
        return [sys.executable, "-m", WORKER_MODULE]

    def for_model(self, model: ModelRef) -> Trainer:
        """This trainer with the sequence length the model declares (its ``context_window``)
        where the trainer declares none."""
        if self.max_seq_len is not None or model.context_window is None:
            return self
        return Trainer(**{**self.model_dump(), "max_seq_len": model.context_window})

    def check_memory(self, model: ModelRef, log: Callable[[str], None]) -> None:
        """Log the memory estimate; refuse, before any weight is loaded, a run that cannot fit
        on the GPUs (a CPU run is estimated, not checked)."""
        import torch

        cuda = torch.cuda.is_available()
        on_cpu = not cuda and self.gpu_memory_gb is None
        model_dir = str(model.local_path())
        shape = model_shape(
            model_dir, lora_r=self.lora_r, trust_remote_code=model.trust_remote_code
        )
        # Estimated for the device it will run on: on a GPU bf16 unless turned off (a declared
        # GPU on a CPU-only machine is assumed to support it); on a CPU fp32 and no checkpointing.
        if on_cpu:
            bf16 = bool(self.bf16)
            checkpointing = bool(self.gradient_checkpointing)
        else:
            bf16 = (
                self.bf16 if self.bf16 is not None else (not cuda or torch.cuda.is_bf16_supported())
            )
            checkpointing = self.gradient_checkpointing is not False
        seq_len = (
            self.max_seq_len
            or model.context_window
            or _declared_context(model_dir, model.trust_remote_code)
        )
        strategy = self.strategy if self.strategy in STRATEGIES else "ddp"
        plan = Plan(self.method, strategy, self.num_gpus, self.micro_batch_size, seq_len, bf16=bf16,
                    gradient_checkpointing=checkpointing, device="cpu" if on_cpu else "gpu")  # fmt: skip
        found = estimate(shape, plan)
        gpu_gib = self.gpu_memory_gb
        if gpu_gib is None and cuda:
            gpu_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
        log(f"memory estimate: {found.describe()}"
            + (f" (GPU: {gpu_gib:.0f} GiB)" if gpu_gib else " (not checked)"))  # fmt: skip
        if gpu_gib is not None:
            require_fit(found, gpu_gib)

    def fine_tune(
        self,
        model: ModelRef,
        examples: Sequence[TrainingExample],
        output_dir: str,
        settings: TrainingSettings,
        *,
        fallback: Fallback | None = None,
        log: Callable[[str], None] = print,
        extra_manifest: dict[str, Any] | None = None,
        context: dg.AssetExecutionContext | None = None,
        checkpoint_dirs: Mapping[int, str] | None = None,
        trace_dir: str | None = None,
    ) -> TrainingResult:
        """Fine-tune ``model`` on ``examples`` as ``settings`` declare (see ``train``): in this
        process, or through Pipes in a subprocess when the launcher says so and a ``context``
        is given."""
        self.check_memory(model, log)
        run = self.for_model(model)
        model_dir = str(model.local_path())
        if self.in_process or context is None:
            return train(model_dir, examples, output_dir, settings, run, base_reference=model.reference,
                         fallback=fallback, log=log, trust_remote_code=model.trust_remote_code,
                         extra_manifest=extra_manifest, checkpoint_dirs=checkpoint_dirs,
                         trace_dir=trace_dir)  # fmt: skip
        # The subprocess gets the caller's fallback rendering as a template with a slot.
        template = fallback(MESSAGE_SLOT) if fallback is not None else None
        spec = {"model_dir": model_dir, "output_dir": output_dir, "settings": settings.model_dump(),
                "trainer": run.model_dump(), "base_reference": model.reference,
                "fallback_template": template, "trust_remote_code": model.trust_remote_code,
                "extra_manifest": extra_manifest or {},
                "checkpoint_dirs": {str(k): v for k, v in (checkpoint_dirs or {}).items()},
                "trace_dir": trace_dir}  # fmt: skip
        return run._fine_tune_in_subprocess(context, examples, spec)

    def _fine_tune_in_subprocess(
        self,
        context: dg.AssetExecutionContext,
        examples: Sequence[TrainingExample],
        spec: dict[str, Any],
    ) -> TrainingResult:
        import polars as pl

        with tempfile.TemporaryDirectory(prefix="bft-train-") as scratch:
            examples_path = Path(scratch) / "examples.parquet"
            pl.DataFrame([asdict(e) for e in examples]).write_parquet(examples_path)
            invocation = dg.PipesSubprocessClient().run(
                context=context,
                command=self.launch_command("bf16" if uses_bf16(self) else "no"),
                extras={**spec, "examples": str(examples_path)},
            )
            messages = invocation.get_custom_messages()
        if not messages:
            raise RuntimeError("the training subprocess ended without reporting a result")
        return result_from_message(messages[-1])


def _declared_context(model_dir: str, trust_remote_code: bool) -> int:
    """The context from the config alone where it says (a config without a tokenizer is
    enough to plan memory), else with the tokenizer's limit."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    try:
        return context_length(config, None)
    except ValueError:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        return context_length(config, tokenizer)

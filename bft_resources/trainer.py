"""Supervised fine-tuning of a causal LM on (prompt, response) pairs, with TRL's
``SFTTrainer`` on accelerate.

bft renders each pair the way its inference engines render a prompt (the chat template, or
the caller's fallback format for a base model without one), tokenizes it and marks the
response tokens; TRL builds the labels from that mask (loss on the response only), truncates,
batches, schedules, accumulates, shards the data across processes and saves checkpoints.
One launch serves a CPU, one GPU, DDP, FSDP or DeepSpeed (``bft_resources.distributed``).

A run saves a checkpoint at each declared step (the paper trains 7B models for 600, 900 and
1200 steps and reports the best); each becomes a Hugging Face folder (config, tokenizer with
its chat template, safetensors, LoRA merged unless asked otherwise) with ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from bft_resources.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from bft_resources.checkpoints import write_manifest
from bft_resources.distributed import STRATEGIES, launch_command
from bft_resources.engine.base import Chat
from bft_resources.engine.prompts import render
from bft_resources.memory import Plan, estimate, model_shape, require_fit

MESSAGE_SLOT = "\x00message\x00"
MANIFEST = CHECKPOINT_MANIFEST
PROBE_EXAMPLES = 8


@dataclass(frozen=True)
class TrainingExample:
    prompt: str  # the user message, finished (tags appended by the caller)
    response: str
    source: str = "unknown"


@dataclass(frozen=True)
class Hyperparameters:
    """METHOD.md step 4 (7B): cosine schedule, batch 32, weight decay 0.1, dropout 0.1 on
    every dropout the architecture has, lr 1e-5, checkpoints at 600, 900 and 1200 steps. What
    the paper leaves open is declared here, never implied: warmup (0), sequence length (the
    base model's context when ``None``), micro batch and precision (bf16 where supported)."""

    learning_rate: float = 1e-5
    steps: tuple[int, ...] = (600, 900, 1200)  # a checkpoint at each; training ends at the last
    batch_size: int = 32
    micro_batch_size: int = 4
    weight_decay: float = 0.1
    dropout: float = 0.1
    warmup_ratio: float = 0.0
    max_seq_len: int | None = None
    seed: int = 0
    method: Literal["full", "lora"] = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    merge_lora: bool = True
    bf16: bool | None = None  # None: where the GPU supports it
    gradient_checkpointing: bool | None = None  # None: on a GPU
    # TRL's fused LM head scores the vocabulary in tiles to save GPU memory (large vocabularies);
    # on a CPU it is ~40% slower per micro-batch than the model's own loss. None: on a GPU.
    fused_lm_head: bool | None = None

    def __post_init__(self) -> None:
        steps = tuple(sorted({int(s) for s in self.steps}))
        if not steps or steps[0] < 1:
            raise ValueError(f"steps {self.steps}: at least one positive optimizer step")
        object.__setattr__(self, "steps", steps)

    @property
    def max_steps(self) -> int:
        return self.steps[-1]

    def accumulation_steps(self, processes: int = 1) -> int:
        """Micro-batches per process per optimizer step, so that micro batch x processes x
        accumulation is the declared batch."""
        per_step = self.micro_batch_size * processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {processes} processes"
            )
        return self.batch_size // per_step


@dataclass
class TrainingResult:
    checkpoint: str  # the last step's
    steps: int
    losses: list[float]  # training loss per optimizer step
    learning_rates: list[float]
    seconds: float
    tokens: int
    truncated_examples: int
    # Loss on a fixed probe set of training examples, before the first step and after the
    # last (eval mode): per-step losses see different batches and are too noisy to compare.
    first_loss: float = math.nan
    final_loss: float = math.nan
    manifest: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> folder
    probe_losses: dict[int, float] = field(default_factory=dict)  # step -> probe loss
    dropped_examples: int = 0  # truncation left no response token


def data_hash(examples: Sequence[TrainingExample]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt, ex.response, ex.source]).encode())
    return digest.hexdigest()[:16]


def render_prompt(tokenizer, message: str, fallback: Callable[[str], str] | None) -> str:
    """The prompt of a training example, rendered as the inference engines render it."""
    return render(tokenizer, Chat(message), fallback)


def render_full(
    tokenizer, message: str, response: str, fallback: Callable[[str], str] | None
) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
    return f"{render_prompt(tokenizer, message, fallback)} {response}{tokenizer.eos_token or ''}"


def control_strings(tokenizer) -> list[str]:
    """The strings a tokenizer reads as control tokens (``<|im_start|>``, ``</s>``, ...)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def plain_text(text: str, controls: Sequence[str]) -> str:
    """Training text with control strings removed: a web page that carries
    ``<|im_start|>`` must not teach the model to open a turn in the middle of an answer.
    Only the chat template places control tokens."""
    for token in controls:
        text = text.replace(token, "")
    return text


def encode_example(
    tokenizer, example: TrainingExample, fallback: Callable[[str], str] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask): the mask is 0 on the rendered prompt (the instruction
    and its tag line) and 1 on the response and its end of turn, which TRL turns into
    response-only labels."""
    controls = control_strings(tokenizer)
    message, response = plain_text(example.prompt, controls), plain_text(example.response, controls)
    prompt = render_prompt(tokenizer, message, fallback)
    full = render_full(tokenizer, message, response, fallback)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside a conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def context_length(config, tokenizer) -> int:
    """The base model's context: its position embeddings, else the tokenizer's limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    raise ValueError("the base model declares no context length: set trainer.max_seq_len")


def apply_dropout(config, dropout: float) -> list[str]:
    """Set every dropout probability the architecture's config exposes (``attention_dropout``,
    ``hidden_dropout``, ``resid_pdrop``, ...) and name the ones set."""
    names = []
    for name, value in sorted(config.to_dict().items()):
        is_rate = name.endswith(("dropout", "pdrop", "dropout_prob", "dropout_rate"))
        if is_rate and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, name, dropout)
            names.append(name)
    return names


@dataclass
class Prepared:
    """An SFTTrainer ready to train, and what bft recorded while preparing it."""

    trainer: Any
    protocol: Any  # the step protocol's callback: losses, learning rates, probe losses
    truncated: int
    dropped: int
    max_seq_len: int
    dropout_set: list[str]
    bf16: bool
    gradient_checkpointing: bool
    processes: int
    accumulation: int
    scratch: str


def _probe_and_progress(
    log: Callable[[str], None], log_every: int, hp: Hyperparameters, is_main: bool
):
    from transformers import TrainerCallback

    class StepProtocol(TrainerCallback):
        """Log progress, and at each declared step evaluate the probe set and save."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.learning_rates: list[float] = []
            self.probe: dict[int, float] = {}
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in hp.steps:
                control.should_save = True
                control.should_evaluate = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.losses.append(float(logs["loss"]))
            self.learning_rates.append(float(logs.get("learning_rate", math.nan)))
            step = state.global_step
            if is_main and (step % log_every == 0 or step == hp.max_steps):
                elapsed = time.perf_counter() - self.started
                rate = state.num_input_tokens_seen / elapsed if elapsed else 0.0
                log(f"step {step}/{hp.max_steps} loss {self.losses[-1]:.4f} "
                    f"lr {self.learning_rates[-1]:.2e} {rate:.0f} tokens/s")  # fmt: skip

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics and state.global_step in hp.steps:
                self.probe[state.global_step] = float(metrics["eval_loss"])

    return StepProtocol()


def _sft_trainer_class(trace: Path | None, rank: int, index: dict[tuple[int, ...], int]):
    """``index``: an example's token ids -> its position, to name what a process trains on."""
    from transformers import Trainer
    from trl import SFTTrainer

    class BftSFTTrainer(SFTTrainer):
        """SFTTrainer that can write which examples each process trains on at each step."""

        bft_fused_lm_head: bool = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.bft_fused_lm_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # The model's own causal-LM loss over the same labels, as transformers' Trainer takes it.
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if trace is not None:
                ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
                seen = [index.get(tuple(i[: sum(m)]), -1) for i, m in zip(ids, mask, strict=True)]
                with open(trace / f"rank{rank}.jsonl", "a") as handle:
                    handle.write(
                        json.dumps({"step": self.state.global_step + 1, "examples": seen}) + "\n"
                    )
            return super().training_step(model, inputs, num_items_in_batch)

    return BftSFTTrainer


def uses_bf16(hp: Hyperparameters) -> bool:
    """bf16 as declared, else where this machine's GPU supports it."""
    import torch

    if hp.bf16 is not None:
        return hp.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _checkpointing_argument(config_class, enabled: bool) -> dict[str, bool]:
    # transformers renamed gradient_checkpointing to activation_checkpointing (5.2x); TRL's
    # config still sets the old name, so both are given where both exist.
    fields = config_class.__dataclass_fields__
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if n in fields]
    return dict.fromkeys(names, enabled)


def prepare(
    model_dir: str,
    examples: Sequence[TrainingExample],
    hp: Hyperparameters,
    *,
    fallback: Callable[[str], str] | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 1,
    trust_remote_code: bool = False,
    trace_dir: str | None = None,
    scratch_dir: str | None = None,
) -> Prepared:
    """Load the model and tokenizer, encode the examples and build TRL's SFTTrainer (which
    builds the labels, truncates and drops examples left without a response token)."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig

    if not examples:
        raise ValueError("no training examples")
    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    accumulation = hp.accumulation_steps(state.num_processes)
    bf16 = uses_bf16(hp)
    checkpointing = hp.gradient_checkpointing if hp.gradient_checkpointing is not None else cuda
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    dropout_set = apply_dropout(config, hp.dropout)
    max_len = hp.max_seq_len or context_length(config, tokenizer)

    encoded = [encode_example(tokenizer, ex, fallback) for ex in examples]
    truncated = sum(len(ids) > max_len for ids, _ in encoded)
    dropped = sum(1 not in mask[:max_len] for _, mask in encoded)
    if dropped == len(encoded):
        raise ValueError(f"every example lost its response to max_seq_len={max_len}")
    if dropped and state.is_main_process:
        log(f"{dropped} of {len(encoded)} examples have no response token within "
            f"max_seq_len={max_len} and are left out of training")  # fmt: skip
    dataset = Dataset.from_dict(
        {"input_ids": [ids for ids, _ in encoded], "completion_mask": [m for _, m in encoded]}
    )

    # One folder for every process (the Trainer's output_dir), where the main process saves.
    scratch = scratch_dir or tempfile.mkdtemp(prefix="bft-sft-")
    args = SFTConfig(
        output_dir=scratch,
        max_steps=hp.max_steps,
        per_device_train_batch_size=hp.micro_batch_size,
        per_device_eval_batch_size=hp.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=hp.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        max_length=max_len,
        completion_only_loss=True,
        bf16=bf16,
        **_checkpointing_argument(SFTConfig, checkpointing),
        use_cpu=not cuda,
        seed=hp.seed,
        logging_steps=1,
        save_strategy="no",  # the step protocol saves at the declared steps
        save_only_model=True,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
    )
    # Loaded after the config: under DeepSpeed ZeRO-3 creating it registers zero.Init, so each
    # process loads only its shard (FSDP's rank-0 loading is read from accelerate's env).
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.bfloat16 if bf16 else torch.float32,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    peft_config = None
    if hp.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    kept = [i for i, (_, mask) in enumerate(encoded) if 1 in mask[:max_len]]
    probe = dataset.select(kept[:PROBE_EXAMPLES])
    # Only a trace needs the example index (a tuple of token ids per example).
    index = (
        {tuple(ids[:max_len]): i for i, (ids, _) in reversed(list(enumerate(encoded)))}
        if trace_dir
        else {}
    )
    trainer_class = _sft_trainer_class(
        Path(trace_dir) if trace_dir else None, state.process_index, index
    )
    protocol = _probe_and_progress(log, log_every, hp, state.is_main_process)
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, eval_dataset=probe,
        processing_class=tokenizer, peft_config=peft_config,
        callbacks=[protocol],
    )  # fmt: skip
    # Progress goes to the run log, once, from the main process (not printed by every one).
    trainer.remove_callback(PrinterCallback)
    trainer.bft_fused_lm_head = hp.fused_lm_head if hp.fused_lm_head is not None else cuda
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
    return Prepared(trainer, protocol, truncated, dropped, max_len, dropout_set, bf16,
                    checkpointing, state.num_processes, accumulation, scratch)  # fmt: skip


def train(
    model_dir: str,
    examples: Sequence[TrainingExample],
    output_dir: str,
    hp: Hyperparameters,
    *,
    base_reference: str,
    fallback: Callable[[str], str] | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 1,
    trust_remote_code: bool = False,
    extra_manifest: dict[str, Any] | None = None,
    checkpoint_dirs: Mapping[int, str] | None = None,
    trace_dir: str | None = None,
) -> TrainingResult:
    """Fine-tune ``model_dir`` on ``examples``. The last step's checkpoint goes to
    ``output_dir``, each other declared step's to ``checkpoint_dirs[step]`` (each written to a
    staging folder and renamed into place, so a crash leaves no half model)."""
    if not examples:
        raise ValueError("no training examples")
    targets = {int(k): v for k, v in (checkpoint_dirs or {}).items()}
    targets[hp.max_steps] = output_dir
    missing = sorted(set(hp.steps) - set(targets))
    if missing:
        raise ValueError(f"no checkpoint folder for steps {missing}")
    final = Path(output_dir)
    prepared = prepare(model_dir, examples, hp, fallback=fallback, log=log, log_every=log_every,
                       trust_remote_code=trust_remote_code, trace_dir=trace_dir,
                       scratch_dir=str(final.with_name(f".{final.name}.trainer")))  # fmt: skip
    trainer, protocol = prepared.trainer, prepared.protocol
    try:
        first_loss = float(trainer.evaluate()["eval_loss"])
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        tokens = int(trainer.state.num_input_tokens_seen)
        final_loss = protocol.probe.get(hp.max_steps, math.nan)
        if trainer.is_world_process_zero():
            log(f"probe loss {first_loss:.4f} -> {final_loss:.4f} over {hp.max_steps} steps "
                f"in {seconds:.0f} s")  # fmt: skip
        result = TrainingResult(output_dir, hp.max_steps, protocol.losses, protocol.learning_rates, seconds, tokens,
                                prepared.truncated, first_loss, final_loss, probe_losses=dict(protocol.probe),
                                dropped_examples=prepared.dropped)  # fmt: skip
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            sources: dict[str, int] = {}
            for ex in examples:
                sources[ex.source] = sources.get(ex.source, 0) + 1
            common = {
                "base_model": base_reference,
                "data_hash": data_hash(examples),
                "rows": len(examples),
                "rows_by_source": sources,
                "truncated_examples": prepared.truncated,
                "dropped_examples": prepared.dropped,
                "hyperparameters": {**asdict(hp), "steps": list(hp.steps), "max_seq_len": prepared.max_seq_len,
                                    "bf16": prepared.bf16, "gradient_checkpointing": prepared.gradient_checkpointing,
                                    "processes": prepared.processes, "accumulation_steps": prepared.accumulation,
                                    "scheduler": "cosine", "optimizer": trainer.args.optim},
                "dropout_set": prepared.dropout_set,
                "first_loss": first_loss,
                "wall_seconds": seconds,
                "tokens": tokens,
                "tokens_per_second": tokens / seconds if seconds else 0.0,
                "lora_adapter_only": hp.method == "lora" and not hp.merge_lora,
                "trainer": _versions(),
                **(extra_manifest or {}),
            }  # fmt: skip
            for step in hp.steps:
                manifest = {**common, "step": step, "steps": list(hp.steps),
                            "losses": protocol.losses[:step], "learning_rates": protocol.learning_rates[:step],
                            "probe_loss": protocol.probe.get(step, math.nan), "final_loss": protocol.probe.get(step, math.nan)}  # fmt: skip
                saved = Path(prepared.scratch) / f"checkpoint-{step}"
                written = _finish_checkpoint(saved, Path(targets[step]), model_dir, hp, trust_remote_code, manifest,
                                             prepared.trainer.processing_class)  # fmt: skip
                result.checkpoints[step] = str(targets[step])
                if step == hp.max_steps:
                    result.manifest = written
        trainer.accelerator.wait_for_everyone()
        return result
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(prepared.scratch, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("trl", "transformers", "accelerate", "torch")}


# What the Trainer writes into a checkpoint for resuming, not for serving.
_TRAINER_STATE = (
    "training_args.bin",
    "trainer_state.json",
    "rng_state",
    "optimizer.",
    "scheduler.",
    "scaler.",
)


def _finish_checkpoint(
    saved: Path, target: Path, model_dir: str, hp: Hyperparameters, trust_remote_code: bool,
    manifest: dict[str, Any], tokenizer,
) -> dict[str, Any]:  # fmt: skip
    """Turn the Trainer's ``checkpoint-N`` into a servable folder (LoRA merged unless kept
    apart), with the tokenizer and the manifest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    if hp.method == "lora" and hp.merge_lora:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if manifest["hyperparameters"]["bf16"] else torch.float32,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        merged = PeftModel.from_pretrained(base, str(saved)).merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
    else:
        staging.mkdir(parents=True)
        for item in saved.iterdir():
            if item.is_file() and not item.name.startswith(_TRAINER_STATE):
                shutil.copy2(item, staging / item.name)
    tokenizer.save_pretrained(staging)
    written = write_manifest(staging, manifest)
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return written


class Trainer(dg.ConfigurableResource):
    """How fine-tuning runs: the method (full/LoRA) and where: in the run's own process (CPU or
    one GPU), or as a subprocess through Dagster Pipes, launched by ``accelerate launch`` with
    one of bft's accelerate configs (DDP, FSDP, DeepSpeed ZeRO-3) over ``num_gpus`` processes."""

    method: Literal["full", "lora"] = Field(
        default="full", description="Full fine-tuning or LoRA (peft)."
    )
    merge_lora: bool = Field(
        default=True, description="Merge LoRA adapters into the saved checkpoint."
    )
    micro_batch_size: int = Field(
        default=4,
        description="Examples per forward pass and process; batch 32 comes from accumulation.",
    )
    max_seq_len: int | None = Field(
        default=None,
        description="Tokens per example (longer ones are cut, and counted); default: the base model's context.",
    )
    log_every: int = Field(
        default=10, description="Log step, loss, learning rate and tokens/s every N steps."
    )
    num_gpus: int = Field(
        default=1,
        description="Processes to train with (GPUs; on a machine without CUDA, CPU processes over gloo).",
    )
    distributed: str = Field(
        default="auto",
        description="accelerate config: auto (single_gpu, or ddp over several), single_gpu, ddp, fsdp, zero3, "
        "zero3_offload, or a path to your own accelerate YAML.",
    )
    launcher: Literal["auto", "in_process", "subprocess"] = Field(
        default="auto",
        description="auto: in-process on one device, a Pipes subprocess over several.",
    )
    bf16: bool | None = Field(default=None, description="bf16 weights and autocast; default: where the GPU supports it.")  # fmt: skip
    gradient_checkpointing: bool | None = Field(default=None, description="Recompute activations; default: on a GPU.")  # fmt: skip
    gpu_memory_gb: float | None = Field(
        default=None,
        description="Memory of one GPU for the fit check before training; default: read from the GPU (none on CPU).",
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model.")

    def hyperparameters(self, **values: Any) -> Hyperparameters:
        return Hyperparameters(method=self.method, merge_lora=self.merge_lora, micro_batch_size=self.micro_batch_size,
                               max_seq_len=self.max_seq_len, bf16=self.bf16,
                               gradient_checkpointing=self.gradient_checkpointing, **values)  # fmt: skip

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
        return [sys.executable, "-m", "bft_resources.train_worker"]

    def check_memory(self, model_dir: str, hp: Hyperparameters, log: Callable[[str], None]) -> None:
        """Log the memory estimate; refuse, before any weight is loaded, a run that cannot fit."""
        import torch

        cuda = torch.cuda.is_available()
        shape = model_shape(model_dir, lora_r=hp.lora_r, trust_remote_code=self.trust_remote_code)
        # Estimated for the GPU it will run on: bf16 unless turned off (a declared GPU on a
        # CPU-only machine is assumed to support it).
        bf16 = hp.bf16 if hp.bf16 is not None else (not cuda or torch.cuda.is_bf16_supported())
        seq_len = hp.max_seq_len or _declared_context(model_dir, self.trust_remote_code)
        strategy = self.strategy if self.strategy in STRATEGIES else "ddp"
        plan = Plan(hp.method, strategy, max(1, self.num_gpus), hp.micro_batch_size, seq_len, bf16=bf16,
                    gradient_checkpointing=hp.gradient_checkpointing is not False)  # fmt: skip
        found = estimate(shape, plan)
        gpu_gib = self.gpu_memory_gb
        if gpu_gib is None and cuda:
            gpu_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
        log(f"memory estimate: {found.describe()}"
            + (f" (GPU: {gpu_gib:.0f} GiB)" if gpu_gib else " (no GPU: not checked)"))  # fmt: skip
        if gpu_gib is not None:
            require_fit(found, gpu_gib)

    def fine_tune(
        self,
        model_dir: str,
        examples: Sequence[TrainingExample],
        output_dir: str,
        hp: Hyperparameters,
        *,
        base_reference: str,
        fallback: Callable[[str], str] | None = None,
        log: Callable[[str], None] = print,
        extra_manifest: dict[str, Any] | None = None,
        context: dg.AssetExecutionContext | None = None,
        checkpoint_dirs: Mapping[int, str] | None = None,
        trace_dir: str | None = None,
    ) -> TrainingResult:
        self.check_memory(model_dir, hp, log)
        if self.in_process or context is None:
            return train(model_dir, examples, output_dir, hp, base_reference=base_reference, fallback=fallback,
                         log=log, log_every=self.log_every, trust_remote_code=self.trust_remote_code,
                         extra_manifest=extra_manifest, checkpoint_dirs=checkpoint_dirs,
                         trace_dir=trace_dir)  # fmt: skip
        # The subprocess gets the caller's fallback rendering as a template with a slot.
        template = fallback(MESSAGE_SLOT) if fallback is not None else None
        spec = {"model_dir": model_dir, "output_dir": output_dir, "hyperparameters": asdict(hp),
                "base_reference": base_reference, "fallback_template": template, "log_every": self.log_every,
                "trust_remote_code": self.trust_remote_code, "extra_manifest": extra_manifest or {},
                "checkpoint_dirs": {str(k): v for k, v in (checkpoint_dirs or {}).items()},
                "trace_dir": trace_dir}  # fmt: skip
        return self._fine_tune_in_subprocess(context, examples, spec, hp)

    def _fine_tune_in_subprocess(
        self,
        context: dg.AssetExecutionContext,
        examples: Sequence[TrainingExample],
        spec: dict[str, Any],
        hp: Hyperparameters,
    ) -> TrainingResult:
        import polars as pl

        with tempfile.TemporaryDirectory(prefix="bft-train-") as scratch:
            examples_path = Path(scratch) / "examples.parquet"
            pl.DataFrame([asdict(e) for e in examples]).write_parquet(examples_path)
            invocation = dg.PipesSubprocessClient().run(
                context=context,
                command=self.launch_command("bf16" if uses_bf16(hp) else "no"),
                extras={**spec, "examples": str(examples_path)},
            )
            messages = invocation.get_custom_messages()
        if not messages:
            raise RuntimeError("the training subprocess ended without reporting a result")
        return result_from_message(messages[-1])


def result_from_message(message: dict[str, Any]) -> TrainingResult:
    """A TrainingResult back from JSON (whose object keys are strings)."""
    result = TrainingResult(**message)
    result.checkpoints = {int(k): v for k, v in result.checkpoints.items()}
    result.probe_losses = {int(k): v for k, v in result.probe_losses.items()}
    return result


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

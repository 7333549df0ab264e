"""Supervised fine-tuning of a causal LM on (prompt, response) pairs, with TRL's
``SFTTrainer`` on accelerate.

bft encodes each pair (``examples``: rendered as the engines render a prompt, the response
tokens marked); TRL builds the labels from that mask (loss on the response only), truncates
to ``max_seq_len``, pads each micro-batch to its longest example (its
``DataCollatorForLanguageModeling``; no padding to ``max_seq_len``, no packing), schedules,
accumulates, shards the data across processes and saves. One launch serves a CPU, one GPU,
DDP, FSDP or DeepSpeed (``distributed``).

The training settings (``TrainingSettings``) say what is trained; the ``Trainer`` resource
says how it runs (micro batch, method, LoRA, precision, checkpointing, fused head, sequence
length, logging). ``settings.protocol`` says how several step counts are trained: one run per
count, each with its own cosine schedule (``separate_runs``), or one run to the last count
saving at each (``checkpoints``). Every saved step becomes a Hugging Face folder (config,
tokenizer with its chat template, safetensors, LoRA merged unless asked otherwise) with
``manifest.json``; a probe set is evaluated before the first step and at each saved step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bft_resources.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from bft_resources.checkpoints import write_manifest
from bft_resources.models import quiet_progress_bars
from bft_resources.trainer.examples import Fallback, TrainingExample, data_hash, encode_example
from bft_resources.trainer.settings import TrainingSettings

if TYPE_CHECKING:
    from bft_resources.trainer.resource import Trainer

MANIFEST = CHECKPOINT_MANIFEST
# Training examples whose loss is measured before the first step and at each saved step (eval
# mode, no dropout), for the loss check: per-step losses see different batches and are too
# noisy to compare. At most one micro-batch (one forward pass, a small share of a step), and
# at most 4: a micro batch of 2 probes 2, so a demo's 3-step run is not mostly probing.
PROBE_EXAMPLES = 4

Log = Callable[[str], None]


@dataclass
class TrainingResult:
    checkpoint: str  # the last step's
    steps: int
    losses: list[float]  # training loss per optimizer step (the longest run's)
    learning_rates: list[float]
    seconds: float  # every run together
    tokens: int
    truncated_examples: int
    # Loss on the probe set before the first step, and at the last step.
    first_loss: float = math.nan
    final_loss: float = math.nan
    manifest: dict[str, Any] = field(default_factory=dict)  # the last step's
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> folder
    probe_losses: dict[int, float] = field(default_factory=dict)  # step -> probe loss
    dropped_examples: int = 0  # truncation left no response token
    protocol: str = "checkpoints"


def result_from_message(message: dict[str, Any]) -> TrainingResult:
    """A TrainingResult back from JSON (whose object keys are strings)."""
    result = TrainingResult(**message)
    result.checkpoints = {int(k): v for k, v in result.checkpoints.items()}
    result.probe_losses = {int(k): v for k, v in result.probe_losses.items()}
    return result


def accumulation_steps(settings: TrainingSettings, trainer: Trainer, processes: int = 1) -> int:
    """Micro-batches per process per optimizer step, so that micro batch x processes x
    accumulation is the declared batch."""
    per_step = trainer.micro_batch_size * processes
    if settings.batch_size % per_step:
        across = f" x {processes} processes" if processes > 1 else ""
        raise ValueError(
            f"batch_size {settings.batch_size} is not a multiple of micro_batch_size "
            f"{trainer.micro_batch_size}{across}"
        )
    return settings.batch_size // per_step


def uses_bf16(trainer: Trainer) -> bool:
    """bf16 as declared, else where this machine's GPU supports it."""
    import torch

    if trainer.bf16 is not None:
        return trainer.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


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
    """An SFTTrainer ready to train one run, and what bft recorded while preparing it."""

    trainer: Any
    protocol: Any  # the step protocol's callback: losses, learning rates, probe losses
    truncated: int
    dropped: int
    max_seq_len: int
    dropout_set: list[str]
    bf16: bool
    gradient_checkpointing: bool
    fused_lm_head: bool
    processes: int
    accumulation: int
    scratch: str


def _step_protocol(log: Log, log_every: int, settings: TrainingSettings, is_main: bool):
    from transformers import TrainerCallback

    class StepProtocol(TrainerCallback):
        """Log progress, and at each step the run saves, evaluate the probe set and save."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.learning_rates: list[float] = []
            self.probe: dict[int, float] = {}
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in settings.steps:
                control.should_save = True
                control.should_evaluate = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.losses.append(float(logs["loss"]))
            self.learning_rates.append(float(logs.get("learning_rate", math.nan)))
            step = state.global_step
            if is_main and (step % log_every == 0 or step == settings.max_steps):
                elapsed = time.perf_counter() - self.started
                rate = state.num_input_tokens_seen / elapsed if elapsed else 0.0
                log(f"step {step}/{settings.max_steps} loss {self.losses[-1]:.4f} "
                    f"lr {self.learning_rates[-1]:.2e} {rate:.0f} tokens/s")  # fmt: skip

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics and state.global_step in settings.steps:
                self.probe[state.global_step] = float(metrics["eval_loss"])

    return StepProtocol()


def _sft_trainer_class(trace: Path | None, rank: int, index: dict[tuple[int, ...], int]):
    """``index``: an example's token ids -> its position, to name what a process trains on."""
    from transformers import Trainer as HfTrainer
    from trl import SFTTrainer

    class BftSFTTrainer(SFTTrainer):
        """SFTTrainer that can write which examples each process trains on at each step."""

        bft_fused_lm_head: bool = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.bft_fused_lm_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # The model's own causal-LM loss over the same labels, as transformers' Trainer
            # takes it (on a CPU, TRL's tiled head and its entropy metrics cost ~40% a step).
            return HfTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if trace is not None:
                ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
                seen = [index.get(tuple(i[: sum(m)]), -1) for i, m in zip(ids, mask, strict=True)]
                with open(trace / f"rank{rank}.jsonl", "a") as handle:
                    handle.write(
                        json.dumps({"step": self.state.global_step + 1, "examples": seen}) + "\n"
                    )
            return super().training_step(model, inputs, num_items_in_batch)

        def create_model_card(self, *args, **kwargs) -> None:
            """bft writes its own manifest; TRL's card is not written at each save."""

    return BftSFTTrainer


def _checkpointing_argument(config_class, enabled: bool) -> dict[str, bool]:
    # transformers renamed gradient_checkpointing to activation_checkpointing (5.2x); TRL's
    # config still sets the old name, so both are given where both exist.
    fields = config_class.__dataclass_fields__
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if n in fields]
    return dict.fromkeys(names, enabled)


def prepare(
    model_dir: str,
    examples: Sequence[TrainingExample],
    settings: TrainingSettings,
    trainer: Trainer,
    *,
    fallback: Fallback | None = None,
    log: Log = print,
    trust_remote_code: bool = False,
    trace_dir: str | None = None,
    scratch_dir: str | None = None,
) -> Prepared:
    """Load the model and tokenizer, encode the examples and build TRL's SFTTrainer for ONE
    run to ``settings.max_steps``, saving at each of ``settings.steps`` (``train`` splits the
    protocol into runs). TRL builds the labels, truncates and drops examples left without a
    response token."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig

    if not examples:
        raise ValueError("no training examples")
    quiet_progress_bars()
    disable_progress_bars()  # TRL's dataset passes: bft counts what they drop and truncate itself
    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    accumulation = accumulation_steps(settings, trainer, state.num_processes)
    bf16 = uses_bf16(trainer)
    # Recomputing activations saves GPU memory; a CPU has the RAM and would only pay the time.
    checkpointing = (
        trainer.gradient_checkpointing if trainer.gradient_checkpointing is not None else cuda
    )
    fused = trainer.fused_lm_head if trainer.fused_lm_head is not None else cuda
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    dropout_set = apply_dropout(config, settings.dropout)
    max_len = trainer.max_seq_len or context_length(config, tokenizer)

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
        max_steps=settings.max_steps,
        per_device_train_batch_size=trainer.micro_batch_size,
        per_device_eval_batch_size=trainer.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_ratio,  # below 1: a share of max_steps
        weight_decay=settings.weight_decay,
        max_length=max_len,  # truncation only: batches are padded to their longest example
        pad_to_multiple_of=None,
        packing=False,
        completion_only_loss=True,
        bf16=bf16,
        **_checkpointing_argument(SFTConfig, checkpointing),
        use_cpu=not cuda,
        seed=settings.seed,
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
    if trainer.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=trainer.lora_r, lora_alpha=trainer.lora_alpha, lora_dropout=settings.dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    kept = [i for i, (_, mask) in enumerate(encoded) if 1 in mask[:max_len]]
    probe = dataset.select(kept[: min(PROBE_EXAMPLES, trainer.micro_batch_size)])
    # Only a trace needs the example index (a tuple of token ids per example).
    index = (
        {tuple(ids[:max_len]): i for i, (ids, _) in reversed(list(enumerate(encoded)))}
        if trace_dir
        else {}
    )
    trainer_class = _sft_trainer_class(
        Path(trace_dir) if trace_dir else None, state.process_index, index
    )
    protocol = _step_protocol(log, trainer.log_every, settings, state.is_main_process)
    sft = trainer_class(
        model=model, args=args, train_dataset=dataset, eval_dataset=probe,
        processing_class=tokenizer, peft_config=peft_config, callbacks=[protocol],
    )  # fmt: skip
    # Progress goes to the run log, once, from the main process (not printed by every one).
    sft.remove_callback(PrinterCallback)
    sft.bft_fused_lm_head = fused
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
    return Prepared(sft, protocol, truncated, dropped, max_len, dropout_set, bf16, checkpointing,
                    fused, state.num_processes, accumulation, scratch)  # fmt: skip


def train(
    model_dir: str,
    examples: Sequence[TrainingExample],
    output_dir: str,
    settings: TrainingSettings,
    trainer: Trainer,
    *,
    base_reference: str,
    fallback: Fallback | None = None,
    log: Log = print,
    trust_remote_code: bool = False,
    extra_manifest: dict[str, Any] | None = None,
    checkpoint_dirs: Mapping[int, str] | None = None,
    trace_dir: str | None = None,
) -> TrainingResult:
    """Fine-tune ``model_dir`` on ``examples`` as ``settings`` declare, run as ``trainer``
    says. The last step's checkpoint goes to ``output_dir``, each other declared step's to
    ``checkpoint_dirs[step]`` (each written to a staging folder and renamed into place, so a
    crash leaves no half model).

    ``settings.protocol``: ``separate_runs`` trains one run per declared step, shortest first,
    each from the base model with its own cosine schedule ending at its step (the paper's
    literal reading of "we fine-tune for {600, 900, 1200} steps"); ``checkpoints`` trains one
    run to the last step and saves at each declared step (this project's cheaper reading: the
    earlier checkpoints are cut mid-schedule). Either way the result has a checkpoint and a
    probe loss for every step, and the longest run's losses and learning rates."""
    if not examples:
        raise ValueError("no training examples")
    targets = {int(k): v for k, v in (checkpoint_dirs or {}).items()}
    targets[settings.max_steps] = output_dir
    missing = sorted(set(settings.steps) - set(targets))
    if missing:
        raise ValueError(f"no checkpoint folder for steps {missing}")
    runs = settings.runs()
    if len(runs) > 1:
        log(f"{settings.protocol}: {len(runs)} runs of {', '.join(map(str, settings.steps))} steps, "
            "each with its own cosine schedule")  # fmt: skip
    results: list[TrainingResult] = []
    for run in runs:
        first = results[0].first_loss if results else None  # the base model's, measured once
        # Each run's trace in its own folder: every run starts again at step 1.
        trace = trace_dir if trace_dir is None or len(runs) == 1 else str(Path(trace_dir) / f"steps{run.max_steps}")  # fmt: skip
        results.append(_train_run(model_dir, examples, targets, settings, run, trainer, base_reference=base_reference,
                                  fallback=fallback, log=log, trust_remote_code=trust_remote_code,
                                  extra_manifest=extra_manifest, trace_dir=trace, first_loss=first))  # fmt: skip
        if len(runs) > 1:
            _release_memory()
    last = results[-1]
    last.seconds = sum(r.seconds for r in results)
    last.tokens = sum(r.tokens for r in results)
    last.first_loss = results[0].first_loss
    for r in results[:-1]:
        last.checkpoints.update(r.checkpoints)
        last.probe_losses.update(r.probe_losses)
    last.checkpoints = dict(sorted(last.checkpoints.items()))
    last.probe_losses = dict(sorted(last.probe_losses.items()))
    return last


def _release_memory() -> None:
    """Free a finished run's model and optimizer before the next run loads its own (the
    SFTTrainer and its callbacks hold reference cycles)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_run(
    model_dir: str, examples: Sequence[TrainingExample], targets: Mapping[int, str],
    declared: TrainingSettings, run: TrainingSettings, trainer: Trainer, *, base_reference: str,
    fallback: Fallback | None, log: Log, trust_remote_code: bool, extra_manifest: dict[str, Any] | None,
    trace_dir: str | None, first_loss: float | None,
) -> TrainingResult:  # fmt: skip
    """One training run to ``run.max_steps``, saving each of ``run.steps`` into its target.
    ``first_loss``: the probe loss before training where an earlier run measured it."""
    final = Path(targets[run.max_steps])
    prepared = prepare(model_dir, examples, run, trainer, fallback=fallback, log=log,
                       trust_remote_code=trust_remote_code, trace_dir=trace_dir,
                       scratch_dir=str(final.with_name(f".{final.name}.trainer")))  # fmt: skip
    sft, protocol = prepared.trainer, prepared.protocol
    try:
        if first_loss is None:
            first_loss = float(sft.evaluate()["eval_loss"])
        started = time.perf_counter()
        sft.train()
        seconds = time.perf_counter() - started
        tokens = int(sft.state.num_input_tokens_seen)
        final_loss = protocol.probe.get(run.max_steps, math.nan)
        if sft.is_world_process_zero():
            log(f"probe loss {first_loss:.4f} -> {final_loss:.4f} over {run.max_steps} steps "
                f"in {seconds:.0f} s")  # fmt: skip
        result = TrainingResult(str(final), run.max_steps, protocol.losses, protocol.learning_rates, seconds,
                                tokens, prepared.truncated, first_loss, final_loss,
                                probe_losses=dict(protocol.probe), dropped_examples=prepared.dropped,
                                protocol=declared.protocol)  # fmt: skip
        sft.accelerator.wait_for_everyone()
        if sft.is_world_process_zero():
            common = _manifest(examples, declared, trainer, prepared, base_reference, first_loss, seconds,
                               tokens, extra_manifest)  # fmt: skip
            for step in run.steps:
                manifest = {**common, "step": step, "run_steps": run.max_steps,
                            "losses": protocol.losses[:step], "learning_rates": protocol.learning_rates[:step],
                            "probe_loss": protocol.probe.get(step, math.nan),
                            "final_loss": protocol.probe.get(step, math.nan)}  # fmt: skip
                saved = Path(prepared.scratch) / f"checkpoint-{step}"
                written = _finish_checkpoint(saved, Path(targets[step]), model_dir, trainer, prepared.bf16,
                                             trust_remote_code, manifest, sft.processing_class)  # fmt: skip
                result.checkpoints[step] = str(targets[step])
                if step == run.max_steps:
                    result.manifest = written
        sft.accelerator.wait_for_everyone()
        return result
    finally:
        if sft.is_world_process_zero():
            shutil.rmtree(prepared.scratch, ignore_errors=True)


def _manifest(
    examples: Sequence[TrainingExample], settings: TrainingSettings, trainer: Trainer, prepared: Prepared,
    base_reference: str, first_loss: float, seconds: float, tokens: int, extra: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """What every checkpoint of a run records: the data, the declared settings, how the run
    ran, and its cost."""
    sources: dict[str, int] = {}
    for ex in examples:
        sources[ex.source] = sources.get(ex.source, 0) + 1
    # The declared settings, and the run knobs as this run resolved them.
    ran = {"method": trainer.method, "lora_r": trainer.lora_r, "lora_alpha": trainer.lora_alpha,
           "merge_lora": trainer.merge_lora, "micro_batch_size": trainer.micro_batch_size,
           "max_seq_len": prepared.max_seq_len, "bf16": prepared.bf16,
           "gradient_checkpointing": prepared.gradient_checkpointing, "fused_lm_head": prepared.fused_lm_head,
           "processes": prepared.processes, "accumulation_steps": prepared.accumulation,
           "scheduler": "cosine", "optimizer": prepared.trainer.args.optim}  # fmt: skip
    return {
        "base_model": base_reference,
        "data_hash": data_hash(examples),
        "rows": len(examples),
        "rows_by_source": sources,
        "truncated_examples": prepared.truncated,
        "dropped_examples": prepared.dropped,
        "protocol": settings.protocol,
        "steps": list(settings.steps),
        "hyperparameters": {**settings.model_dump(), **ran},
        "dropout_set": prepared.dropout_set,
        "first_loss": first_loss,
        "wall_seconds": seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "lora_adapter_only": trainer.method == "lora" and not trainer.merge_lora,
        "trainer": _versions(),
        **(extra or {}),
    }


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
    saved: Path, target: Path, model_dir: str, trainer: Trainer, bf16: bool, trust_remote_code: bool,
    manifest: dict[str, Any], tokenizer,
) -> dict[str, Any]:  # fmt: skip
    """Turn the Trainer's ``checkpoint-N`` into a servable folder (LoRA merged unless kept
    apart), with the tokenizer and the manifest. The saved files are moved, not copied: the
    Trainer's folder is removed after the run."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    if trainer.method == "lora" and trainer.merge_lora:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, trust_remote_code=trust_remote_code
        )  # fmt: skip
        merged = PeftModel.from_pretrained(base, str(saved)).merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
    else:
        staging.mkdir(parents=True)
        for item in saved.iterdir():
            if item.is_file() and not item.name.startswith(_TRAINER_STATE):
                shutil.move(item, staging / item.name)
    tokenizer.save_pretrained(staging)
    written = write_manifest(staging, manifest)
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return written

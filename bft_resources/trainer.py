"""Supervised fine-tuning of a causal LM on (prompt, response) pairs.

Each pair is rendered with the model's chat template; the loss covers the response tokens
only (the prompt's labels are -100). Full fine-tuning or LoRA (peft, merged into the saved
checkpoint unless asked otherwise). The loop runs under ``accelerate`` so the same code
trains in-process on a CPU or one GPU and, launched by ``accelerate launch`` /
``torchrun``, over several GPUs. The result is a Hugging Face folder (config, tokenizer with
its chat template, safetensors) that both inference backends load, with ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from bft_resources.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from bft_resources.checkpoints import write_manifest
from bft_resources.engine.base import Chat
from bft_resources.engine.prompts import render

IGNORE_INDEX = -100
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
    """METHOD.md step 4 defaults (7B): cosine schedule, batch 32, weight decay 0.1,
    dropout 0.1, lr 1e-5."""

    learning_rate: float = 1e-5
    max_steps: int = 600
    batch_size: int = 32
    micro_batch_size: int = 4
    weight_decay: float = 0.1
    dropout: float = 0.1
    warmup_ratio: float = 0.0  # the paper names no warmup; a declared departure only
    max_seq_len: int = 1024
    seed: int = 0
    method: Literal["full", "lora"] = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    merge_lora: bool = True

    @property
    def accumulation_steps(self) -> int:
        return max(1, self.batch_size // self.micro_batch_size)


@dataclass
class TrainingResult:
    checkpoint: str
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
    tokenizer, example: TrainingExample, max_len: int, fallback: Callable[[str], str] | None = None
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are -100 on the prompt, the token ids on the
    response (and its end-of-turn), so the loss is on response tokens only."""
    controls = control_strings(tokenizer)
    message, response = plain_text(example.prompt, controls), plain_text(example.response, controls)
    prompt = render_prompt(tokenizer, message, fallback)
    full = render_full(tokenizer, message, response, fallback)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside a conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    truncated = len(input_ids) > max_len
    return input_ids[:max_len], labels[:max_len], truncated


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _apply_dropout(config, dropout: float) -> None:
    for name in (
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "dropout",
    ):
        if hasattr(config, name):
            setattr(config, name, dropout)


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
) -> TrainingResult:
    """Fine-tune ``model_dir`` on ``examples`` and save a checkpoint at ``output_dir``
    (written to a staging folder and renamed into place, so a crash leaves no half model)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        get_cosine_schedule_with_warmup,
    )

    if not examples:
        raise ValueError("no training examples")
    set_seed(hp.seed)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(
        gradient_accumulation_steps=hp.accumulation_steps,
        mixed_precision="bf16" if use_bf16 else "no",
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    _apply_dropout(config, hp.dropout)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    if hp.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.dropout,
                       target_modules="all-linear", task_type="CAUSAL_LM"),
        )  # fmt: skip
    encoded = [encode_example(tokenizer, ex, hp.max_seq_len, fallback) for ex in examples]
    truncated = sum(t for _, _, t in encoded)
    data = [(ids, labels) for ids, labels, _ in encoded if any(x != IGNORE_INDEX for x in labels)]
    if not data:
        raise ValueError(f"every example lost its response to max_seq_len={hp.max_seq_len}")

    no_decay = ("bias", "norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and not any(k in n.lower() for k in no_decay)],
         "weight_decay": hp.weight_decay},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and any(k in n.lower() for k in no_decay)],
         "weight_decay": 0.0},
    ]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(hp.warmup_ratio * hp.max_steps), hp.max_steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()

    probe = [
        _collate(data[i : i + hp.micro_batch_size], pad_id)
        for i in range(0, min(len(data), PROBE_EXAMPLES), hp.micro_batch_size)
    ]

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                float(model(**{k: v.to(accelerator.device) for k, v in b.items()}).loss)
                for b in probe
            ]
        model.train()
        return sum(losses) / len(losses)

    first_loss = probe_loss()
    rng = random.Random(hp.seed)
    order: list[int] = []
    losses: list[float] = []
    learning_rates: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for step in range(1, hp.max_steps + 1):
        step_loss = 0.0
        for _ in range(hp.accumulation_steps):
            if len(order) < hp.micro_batch_size:
                epoch = list(range(len(data)))
                rng.shuffle(epoch)
                order += epoch
            batch = _collate([data[order.pop(0)] for _ in range(hp.micro_batch_size)], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step_loss += float(loss.detach()) / hp.accumulation_steps
        losses.append(step_loss)
        learning_rates.append(float(scheduler.get_last_lr()[0]))
        if step % log_every == 0 or step == hp.max_steps:
            elapsed = time.perf_counter() - started
            log(f"step {step}/{hp.max_steps} loss {step_loss:.4f} lr {learning_rates[-1]:.2e} "
                f"{tokens / elapsed:.0f} tokens/s")  # fmt: skip
    seconds = time.perf_counter() - started
    final_loss = probe_loss()
    log(
        f"probe loss {first_loss:.4f} -> {final_loss:.4f} over {hp.max_steps} steps in {seconds:.0f} s"
    )

    result = TrainingResult(
        output_dir,
        hp.max_steps,
        losses,
        learning_rates,
        seconds,
        tokens,
        truncated,
        first_loss,
        final_loss,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if hp.method == "lora" and hp.merge_lora:
            model = model.merge_and_unload()
        sources: dict[str, int] = {}
        for ex in examples:
            sources[ex.source] = sources.get(ex.source, 0) + 1
        result.manifest = {
            "base_model": base_reference,
            "data_hash": data_hash(examples),
            "rows": len(examples),
            "rows_by_source": sources,
            "truncated_examples": truncated,
            "hyperparameters": asdict(hp),
            "losses": losses,
            "learning_rates": learning_rates,
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
            "wall_seconds": seconds,
            "tokens": tokens,
            "lora_adapter_only": hp.method == "lora" and not hp.merge_lora,
            **(extra_manifest or {}),
        }
        _save(model, tokenizer, Path(output_dir), result.manifest)
    return result


def _save(model, tokenizer, target: Path, manifest: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest.update(write_manifest(staging, manifest))
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


class Trainer(dg.ConfigurableResource):
    """How fine-tuning runs: the method (full/LoRA) and where: in the run's own process (CPU or
    one GPU), or as a subprocess through Dagster Pipes, launched by ``accelerate launch`` over
    ``num_gpus`` GPUs when there are several."""

    method: Literal["full", "lora"] = Field(
        default="full", description="Full fine-tuning or LoRA (peft)."
    )
    merge_lora: bool = Field(
        default=True, description="Merge LoRA adapters into the saved checkpoint."
    )
    micro_batch_size: int = Field(
        default=4, description="Examples per forward pass; batch 32 comes from accumulation."
    )
    max_seq_len: int = Field(
        default=1024, description="Tokens per example; longer ones are cut (and counted)."
    )
    log_every: int = Field(
        default=10, description="Log step, loss, learning rate and tokens/s every N steps."
    )
    num_gpus: int = Field(
        default=1, description="GPUs to train on; more than one launches `accelerate launch`."
    )
    launcher: Literal["auto", "in_process", "subprocess"] = Field(
        default="auto",
        description="auto: in-process on one device, a Pipes subprocess over several GPUs.",
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model.")

    def hyperparameters(self, **values: Any) -> Hyperparameters:
        return Hyperparameters(method=self.method, merge_lora=self.merge_lora, micro_batch_size=self.micro_batch_size,
                               max_seq_len=self.max_seq_len, **values)  # fmt: skip

    @property
    def in_process(self) -> bool:
        return self.launcher == "in_process" or (self.launcher == "auto" and self.num_gpus <= 1)

    def launch_command(self) -> list[str]:
        if self.num_gpus > 1:
            return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(self.num_gpus),
                    "-m", "bft_resources.train_worker"]  # fmt: skip
        return [sys.executable, "-m", "bft_resources.train_worker"]

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
    ) -> TrainingResult:
        if self.in_process or context is None:
            return train(model_dir, examples, output_dir, hp, base_reference=base_reference, fallback=fallback,
                         log=log, log_every=self.log_every, trust_remote_code=self.trust_remote_code,
                         extra_manifest=extra_manifest)  # fmt: skip
        # The subprocess gets the caller's fallback rendering as a template with a slot.
        template = fallback(MESSAGE_SLOT) if fallback is not None else None
        spec = {"model_dir": model_dir, "output_dir": output_dir, "hyperparameters": asdict(hp),
                "base_reference": base_reference, "fallback_template": template, "log_every": self.log_every,
                "trust_remote_code": self.trust_remote_code, "extra_manifest": extra_manifest or {}}  # fmt: skip
        return self._fine_tune_in_subprocess(context, examples, spec)

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
                command=self.launch_command(),
                extras={**spec, "examples": str(examples_path)},
            )
            messages = invocation.get_custom_messages()
        if not messages:
            raise RuntimeError("the training subprocess ended without reporting a result")
        return TrainingResult(**messages[-1])

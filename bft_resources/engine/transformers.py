"""The transformers backend: batched ``generate`` on CPU or a GPU without vLLM.

Prompts are sorted by length and cut into batches of similar lengths, so left padding
wastes little compute; each batch is one ``generate`` call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Literal

from pydantic import Field

from bft_resources.bounds import bounded
from bft_resources.engine.base import (
    Chat,
    Engine,
    FallbackFormat,
    Generation,
    LoadedModel,
    Log,
    Sampling,
    per_chat,
    same_but_length,
)
from bft_resources.engine.rendering import option_token_ids, prompts_token_ids, special_strings
from bft_resources.models import ModelRef, load_tokenizer, quiet_progress_bars

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class TransformersEngine(Engine):
    """Batched ``generate`` with transformers, on a CPU or one GPU."""

    backend: Literal["transformers"] = "transformers"
    batch_size: int = bounded(8, ge=1, description="Prompts per generate call.")
    device: str = Field(default="auto", description="cpu, cuda, cuda:1 ... or auto (a GPU if there is one).")  # fmt: skip
    dtype: Dtype = Field(
        default="auto",
        description="auto: bf16 on GPUs and CPUs that compute it natively, else fp16 (GPU) / fp32 (CPU).",
    )

    @property
    def gpus(self) -> int:
        return 0 if self.device == "cpu" else 1

    def describe(self) -> str:
        return f"transformers ({self.device}, {self.dtype}, batch {self.batch_size})"

    def _open(self, model: ModelRef, fallback: FallbackFormat | None, log: Log) -> LoadedModel:
        # The whole reference, revision and storage included, decides what is loaded.
        return TransformersModel(
            str(model.local_path()), model.reference, self.device, self.dtype, self.batch_size,
            model.trust_remote_code, fallback, model.context_window,
        )  # fmt: skip


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 inference is
    2-3x faster than fp32; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def pick_dtype(requested: str, device: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stops if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


class TransformersModel(LoadedModel):
    def __init__(
        self,
        path: str,
        reference: str,
        device: str,
        dtype: str,
        batch_size: int,
        trust_remote_code: bool,
        fallback: FallbackFormat | None,
        context_window: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        quiet_progress_bars()
        self.reference = reference
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.fallback = fallback
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(dtype, self.device), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self._torch = torch
        self._context = context_window or getattr(
            self.model.config, "max_position_embeddings", None
        )
        # Only the next token's logits are read: the head over every prompt position is ~20%
        # of a small model's prefill and a [batch, length, vocabulary] tensor nobody reads.
        takes = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if takes else {}

    def special_tokens(self) -> list[str]:
        return special_strings(self.tokenizer)

    @property
    def context_window(self) -> int | None:
        return self._context

    def prompt_tokens(self, chats: Sequence[Chat]) -> list[int]:
        return [len(ids) for ids in prompts_token_ids(self.tokenizer, chats, self.fallback)]

    def _encode(self, ids: list[list[int]]):
        """A left-padded batch of prompt ids (see engine.prompts: the same ids vLLM gets)."""
        return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True).to(
            self.device
        )

    def generate(
        self, chats: Sequence[Chat], sampling: Sampling | Sequence[Sampling]
    ) -> list[Generation]:
        if not chats:  # a stage with nothing to do still asks, for its output's columns
            return []
        samplings = per_chat(sampling, len(chats))
        prompts = prompts_token_ids(self.tokenizer, chats, self.fallback)
        lengths = [len(ids) for ids in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        for batch_no, batch in enumerate(length_sorted_batches(lengths, self.batch_size)):
            caps = [samplings[i].max_tokens for i in batch]
            shared = same_but_length([samplings[i] for i in batch])
            if shared.seed is not None:
                self._torch.manual_seed(shared.seed + batch_no)
            generated = self._generate_batch([prompts[i] for i in batch], shared, caps)
            for index, generation in zip(batch, generated, strict=True):
                results[index] = generation
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, prompts: list[list[int]], sampling: Sampling, caps: list[int]
    ) -> list[Generation]:
        """One generate call; each row is cut to its own cap (the call runs to the longest)."""
        inputs = self._encode(prompts)
        sample = sampling.temperature > 0
        kwargs = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        with self._torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=sample,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        width = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        eos = set(self._eos_ids())
        generations = []
        for i in range(len(prompts)):
            texts, reasons, produced = [], [], 0
            for j in range(sampling.n):
                new = output[i * sampling.n + j, width:].tolist()
                used = _trim_after_eos(new, eos, self.tokenizer.pad_token_id)[: caps[i]]
                produced += len(used)
                text, stopped = cut_at_stop(
                    self.tokenizer.decode(used, skip_special_tokens=True), sampling.stop
                )
                texts.append(text)
                reasons.append("stop" if stopped or len(used) < caps[i] else "length")
            generations.append(
                Generation(tuple(texts), int(prompt_tokens[i]), produced, tuple(reasons))
            )
        return generations

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in ids if i is not None] + [self.tokenizer.eos_token_id]

    def option_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float]]:
        if not chats:
            return []
        prompts = prompts_token_ids(self.tokenizer, chats, self.fallback)
        variants = option_token_ids(self.tokenizer, options)
        lengths = [len(p) for p in prompts]
        out: list[dict[str, float]] = [{}] * len(prompts)
        for batch in length_sorted_batches(lengths, self.batch_size):
            inputs = self._encode([prompts[i] for i in batch])
            with self._torch.inference_mode():
                logits = self.model(**inputs, **self._last_logits_only).logits[:, -1, :].float()
            logprobs = self._torch.log_softmax(logits, dim=-1)
            for row, index in enumerate(batch):
                out[index] = {
                    option: float(self._torch.logsumexp(logprobs[row, ids], dim=0))
                    if ids
                    else -math.inf
                    for option, ids in variants.items()
                }
        return out

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _trim_after_eos(tokens: list[int], eos: set[int], pad: int | None) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos or token == pad:
            return tokens[:position]
    return tokens

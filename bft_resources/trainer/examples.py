"""Training pairs as the model sees them: rendered as the inference engines render a prompt
(the chat template, or the caller's fallback format for a base model without one), cleaned
of control strings, tokenized, and masked so that the loss covers the response only.

Masking the prompt is this project's choice (Humpback's code masks it; the paper does not
say): the mask is 0 on the rendered prompt, its instruction and tag line, and 1 on the
response and its end of turn."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bft_resources.engine.base import Chat
from bft_resources.engine.rendering import render, special_strings, strip_special

Fallback = Callable[[str], str]


@dataclass(frozen=True)
class TrainingExample:
    prompt: str  # the user message, finished (tags appended by the caller)
    response: str
    source: str = "unknown"


def data_hash(examples: Sequence[TrainingExample]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt, ex.response, ex.source]).encode())
    return digest.hexdigest()[:16]


def render_prompt(tokenizer, message: str, fallback: Fallback | None) -> str:
    """The prompt of a training example, rendered as the inference engines render it."""
    return render(tokenizer, Chat(message), fallback)


def render_full(tokenizer, message: str, response: str, fallback: Fallback | None) -> str:
    """The whole example: prompt, response and end of turn."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}, {"role": "assistant", "content": response}],
            tokenize=False,
        )
    return f"{render_prompt(tokenizer, message, fallback)} {response}{tokenizer.eos_token or ''}"


def plain_text(text: str, controls: Sequence[str]) -> str:
    """Training text with control strings removed (``controls`` longest first, as
    ``special_strings`` gives them): a web page that carries ``<|im_start|>`` must not teach
    the model to open a turn in the middle of an answer. Only the chat template places
    control tokens. Removed until none is left (``strip_special``): one pass would let
    ``<|im_e<|im_end|>nd|>`` reassemble into ``<|im_end|>``."""
    return strip_special(text, controls)


def encode_example(
    tokenizer, example: TrainingExample, fallback: Fallback | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask): the mask is 0 on the rendered prompt and 1 on the
    response and its end of turn, which TRL turns into response-only labels."""
    controls = special_strings(tokenizer)
    message, response = plain_text(example.prompt, controls), plain_text(example.response, controls)
    prompt = render_prompt(tokenizer, message, fallback)
    full = render_full(tokenizer, message, response, fallback)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside a conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

"""How long a web document may be: it must fit, with its generation budget, every prompt it
travels through (docs/method.md, Data: ``len(tokens(text)) + prompt_overhead + max_new_tokens <=
context_window``, applied to backtranslation, scoring and rewriting alike).

A document of n tokens needs, in the base model's context window W:
- backtranslation: overhead + n + instruction budget;
- scoring: overhead + instruction + n + the scorer's reply (1 token in logprobs mode);
- rewriting: overhead + instruction + n + room for the rewrite: ``rewriting.min_room`` (the
  paper caps no rewrite; the rewrite then takes what is left of the window, row by row), or,
  with ``length_cap: ratio``, the ratio cap that follows the document (``rewrite_tokens(n)``).
The instruction is at most the backtranslation budget. Distillation sends no document.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from bft_assets.prompts import BACKTRANSLATE, REWRITE, SCORE, Prompt, llama2_inst
from bft_assets.specs import GenerationSpec
from bft_resources.engine import Chat
from bft_resources.engine.rendering import prompt_token_ids
from bft_resources.models import ModelRef

# Tokenizing a document inside a prompt can merge across its edges differently from the
# document alone: a few tokens of room keep "fits" true at the budget itself.
EDGE_SLACK = 8


def rewrite_tokens(document_tokens: int, generation: GenerationSpec) -> int:
    """ratio mode: the most tokens a rewrite of a document of this length may take."""
    spec = generation.rewriting
    return math.ceil(spec.rewrite_length_ratio * document_tokens) + spec.rewrite_extra_tokens


def rewrite_caps(prompt_tokens: list[int], document_tokens: list[int], window: int | None,
                 generation: GenerationSpec) -> list[int]:  # fmt: skip
    """Each row's rewrite cap: what its prompt leaves of the rewriter's window (context mode;
    distill's max_new_tokens where the window is unknown, an endpoint), or the ratio cap."""
    spec = generation.rewriting
    if spec.length_cap == "ratio":
        return [rewrite_tokens(n, generation) for n in document_tokens]
    if window is None:
        return [spec.max_new_tokens] * len(prompt_tokens)
    return [max(1, window - p) for p in prompt_tokens]


@dataclass(frozen=True)
class Budget:
    tokens: int  # the longest document that fits every prompt
    overheads: dict[str, int]  # tokens each prompt adds around its texts
    limits: dict[str, int]  # the longest document each prompt alone allows
    window: int = 0  # the context window they share

    @property
    def limiting(self) -> str:
        return min(self.limits, key=self.limits.__getitem__)

    def table(self):
        """Each prompt's overhead and the longest document it allows, as a Markdown table."""
        from bft_assets.reporting import markdown_table

        return markdown_table([{"prompt": p, "overhead_tokens": self.overheads[p], "longest_document": self.limits[p]}
                               for p in self.limits])  # fmt: skip


def _overhead(count, prompt: Prompt) -> int:
    return count(
        prompt.render(**dict.fromkeys((p.replace(" ", "_") for p in prompt.placeholders), ""))
    )


def document_budget(count, window: int, generation: GenerationSpec) -> Budget:
    """``count(message)`` is the token count of a rendered user message (chat template or
    fallback included) under the base model's tokenizer."""
    instruction = generation.backtranslation.max_new_tokens
    reply = 1 if generation.scoring.mode == "logprobs" else generation.scoring.max_new_tokens
    rewriting = generation.rewriting
    overheads = {"backtranslation": _overhead(count, BACKTRANSLATE), "scoring": _overhead(count, SCORE),
                 "rewriting": _overhead(count, REWRITE)}  # fmt: skip
    room = {name: window - o - EDGE_SLACK for name, o in overheads.items()}
    limits = {
        "backtranslation": room["backtranslation"] - instruction,
        "scoring": room["scoring"] - instruction - reply,
        # context: n + min_room <= room - instruction; ratio: n + ceil(r * n) + extra <= room - instruction
        "rewriting": room["rewriting"] - instruction - rewriting.min_room
        if rewriting.length_cap == "context"
        else math.floor((room["rewriting"] - instruction - rewriting.rewrite_extra_tokens - 1)
                        / (1 + rewriting.rewrite_length_ratio)),
    }  # fmt: skip
    return Budget(min(limits.values()), overheads, limits, window)


def message_tokens(model: ModelRef) -> Callable[[str], int]:
    """Tokens a user message takes once rendered for the base model (its chat template, or
    the paper's Llama-2 markers), exactly as the engines feed it."""
    tokenizer = model.tokenizer()
    return lambda message: len(prompt_token_ids(tokenizer, Chat(message), llama2_inst))

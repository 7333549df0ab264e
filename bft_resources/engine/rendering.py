"""The one way a chat becomes the token ids a model is fed, shared by every local backend
(and by the trainer, which renders training prompts the same way).

The chat template (or the caller's fallback format for a model without one) renders the
text; it is tokenized without special tokens, since the template places its own; and a BOS
is added once, only where the tokenizer adds one by default and the rendering did not already
start with it. vLLM receives these ids (``TokensPrompt``), so it never tokenizes a rendered
string a second time (which adds a BOS of its own: two with Llama-2-chat's template)."""

from collections.abc import Sequence
from functools import lru_cache

from bft_resources.engine.base import Chat, FallbackFormat


def render(tokenizer, chat: Chat, fallback: FallbackFormat | None) -> str:
    """The prompt text: the model's chat template, or the caller's fallback format."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            chat.messages(), tokenize=False, add_generation_prompt=True
        )
    elif fallback is not None:
        # A fallback format has no system slot: the system message opens the user's.
        text = fallback(f"{chat.system}\n\n{chat.user}" if chat.system else chat.user)
    else:
        raise ValueError("the model has no chat template and no fallback format was given")
    return text + chat.assistant_prefix


@lru_cache(maxsize=32)
def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def prompt_token_ids(tokenizer, chat: Chat, fallback: FallbackFormat | None) -> list[int]:
    """The ids a model is fed for ``chat`` (see the module's docstring)."""
    ids = list(tokenizer(render(tokenizer, chat, fallback), add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def prompts_token_ids(
    tokenizer, chats: Sequence[Chat], fallback: FallbackFormat | None
) -> list[list[int]]:
    return [prompt_token_ids(tokenizer, chat, fallback) for chat in chats]


def option_token_ids(tokenizer, options: Sequence[str]) -> dict[str, list[int]]:
    """Token ids whose text is an option, bare or after a space (single tokens only)."""
    ids: dict[str, list[int]] = {}
    for option in options:
        found = set()
        for variant in (option, " " + option):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                found.add(encoded[0])
        ids[option] = sorted(found)
    return ids


def special_strings(tokenizer) -> list[str]:
    """The strings a tokenizer reads as control tokens (``<|im_start|>``, ``</s>``, ...),
    longest first."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def strip_special(text: str, specials: Sequence[str]) -> str:
    """``text`` without the tokenizer's control strings, removed until none is left: one pass
    would let ``<|im_e<|im_start|>nd|>`` reassemble into ``<|im_end|>``."""
    while True:
        cleaned = text
        for token in specials:
            cleaned = cleaned.replace(token, "")
        if cleaned == text:
            return text
        text = cleaned

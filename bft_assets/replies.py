"""How the method reads what models write: the instruction a backward model wrote (and
whether it is degenerate), the score a forward model gave, the rewrite between [RES] and
[/RES]. Plain functions, tested on realistic replies with no engine at all."""

import math
import re
from collections import Counter
from collections.abc import Mapping

from bft_assets.prompts import VERDICT
from bft_assets.recipes import REWRITE_OK

# ---- instructions (backtranslated_pool) ------------------------------------------------------

EMPTY = "empty"
SAME_AS_FIRST_LINE = "same_as_first_line"
LONGER_THAN_RESPONSE = "longer_than_response"
REPEATED_NGRAMS = "repeated_ngrams"
INSTRUCTION_FLAGS = (EMPTY, SAME_AS_FIRST_LINE, LONGER_THAN_RESPONSE, REPEATED_NGRAMS)
_WORDS = re.compile(r"\w+")
_QUOTES = "\"'“”‘’`"


def clean_instruction(text: str) -> str:
    """The generated text as an instruction: trimmed, without wrapping or dangling quotes."""
    text = text.strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if text[:1] in _QUOTES and text.count(text[0]) == 1:
        text = text[1:].strip()
    return text


def instruction_flag(instruction: str, response: str) -> str | None:
    """Why a generated instruction is degenerate, or None when it looks usable."""
    if not instruction.strip():
        return EMPTY
    first_line = next((line.strip() for line in response.splitlines() if line.strip()), "")
    if instruction.strip().lower() == first_line.lower():
        return SAME_AS_FIRST_LINE
    if len(instruction) > len(response):
        return LONGER_THAN_RESPONSE
    words = _WORDS.findall(instruction.lower())
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and trigrams.most_common(1)[0][1] >= 3:
        return REPEATED_NGRAMS
    return None


# ---- scores (scored_pool) --------------------------------------------------------------------

_LABELLED = re.compile(VERDICT.pattern + r"(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?", re.I)
_TRAILING = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*[.!)\]*]*\s*$")
NO_SCORE = "no_score"
OUT_OF_RANGE = "out_of_range"


def parse_score(reply: str) -> tuple[int | None, str | None]:
    """(score, None) from a reply's last labelled score, else a number ending its last line;
    (None, reason) when there is no valid score."""
    labelled = [found.group(2) for found in _LABELLED.finditer(reply)]
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    trailing = _TRAILING.search(lines[-1]) if lines else None
    raw = labelled[-1] if labelled else (trailing.group(1) if trailing else None)
    if raw is None:
        return None, NO_SCORE
    value = float(raw)
    if value != int(value) or not 1 <= value <= 5:
        return None, OUT_OF_RANGE
    return int(value), None


def score_from_logprobs(logprobs: Mapping[str, float]) -> tuple[int | None, float | None]:
    """(argmax score, expected score) from the next-token log-probabilities of '1'..'5'."""
    probs = {int(k): math.exp(v) for k, v in logprobs.items() if v != -math.inf}
    total = sum(probs.values())
    if not total:
        return None, None
    expected = sum(k * p for k, p in probs.items()) / total
    return max(probs, key=probs.__getitem__), expected


# ---- rewrites (rewritten_dataset) ------------------------------------------------------------

RES_OPEN, RES_CLOSE = "[RES]", "[/RES]"
NOT_SELECTED = "not_selected"
NO_MARKERS = "no_markers"
UNCLOSED = "unclosed_marker"
TRUNCATED = "truncated"
CONTAINS_MARKERS = "contains_markers"
REWRITE_STATUSES = (
    REWRITE_OK,
    NOT_SELECTED,
    NO_MARKERS,
    UNCLOSED,
    TRUNCATED,
    EMPTY,
    CONTAINS_MARKERS,
)

_BETWEEN = re.compile(re.escape(RES_OPEN) + r"(.*?)" + re.escape(RES_CLOSE), re.S)
PROMPT_MARKERS = r"\[/?(?:INST|RES)\]|<<SYS>>|<\|im_(?:start|end)\|>"
_LEFTOVER = re.compile(PROMPT_MARKERS, re.I)


def extract_rewrite(
    reply: str, forced: bool, finish_reason: str = "stop"
) -> tuple[str | None, str]:
    """(rewrite, status): the text between [RES] and [/RES]. With ``forced`` the reply was
    opened with [RES] and stopped at [/RES], so the reply itself is the rewrite."""
    if forced:
        if finish_reason == "length":
            return None, TRUNCATED
        text = reply
    else:
        found = _BETWEEN.search(reply)
        if found is None and finish_reason == "length":
            return (
                None,
                TRUNCATED,
            )  # the cap ended the reply before [/RES]: say so, not "no markers"
        if found is None:
            return None, UNCLOSED if RES_OPEN in reply else NO_MARKERS
        text = found.group(1)
    text = text.strip()
    if not text:
        return None, EMPTY
    if _LEFTOVER.search(text):
        return None, CONTAINS_MARKERS
    return text, REWRITE_OK

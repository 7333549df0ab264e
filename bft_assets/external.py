"""Instruction datasets from outside the pipeline, trained and evaluated as recipes: the
paper's baselines (Alpaca-GPT4, ShareGPT, OpenOrca, Self-instruct, ClueWeb+filtering) at the
same sizes as the generated recipes (BFT Tables 1, 2 and 10; section 5 compares their
diversity and lengths).

Formats: ``alpaca`` (instruction, input, output: a non-empty input follows the instruction
after a blank line, as Alpaca's prompt places it), ``sharegpt`` (the first human turn of
``conversations`` and the reply after it), ``openorca`` (question, response; its system
prompt is left out, as the paper compares instruction/response pairs), ``pairs``
(instruction, response) and ``auto`` (by each record's fields). Every record read becomes a
pair or a drop with its reason.
"""

import hashlib
from collections.abc import Iterable
from typing import Any

import polars as pl

from bft_assets.filters import lone_surrogate_in
from bft_resources.records import UnreadableFile

BAD_JSON = "bad_json"
UNREADABLE_FILE = "unreadable_file"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
NO_FIRST_TURN = "no_first_turn"
EMPTY_TEXT = "empty_text"
BAD_UNICODE = "bad_unicode"
DUPLICATE_INSTRUCTION = "duplicate_instruction"
REASONS = (BAD_JSON, UNREADABLE_FILE, NOT_AN_OBJECT, UNKNOWN_FORMAT, MISSING_FIELD, NO_FIRST_TURN, EMPTY_TEXT,
           BAD_UNICODE, DUPLICATE_INSTRUCTION)  # fmt: skip

_FIELDS = {"alpaca": ("instruction", "output"), "openorca": ("question", "response"),
           "pairs": ("instruction", "response")}  # fmt: skip


def detect(record: dict[str, Any]) -> str | None:
    """The format a record is in, by its fields."""
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if "question" in record and "response" in record:
        return "openorca"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "pairs"
    return None


def _first_turn(conversation: list[Any]) -> tuple[Any, Any] | None:
    """ShareGPT's first human message and the reply that follows it."""
    turns = [t for t in conversation if isinstance(t, dict)]
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") in ("human", "user") and turns[i + 1].get("from") in (
            "gpt",
            "assistant",
            "chatgpt",
        ):
            return turn.get("value"), turns[i + 1].get("value")
    return None


def to_pair(record: Any, fmt: str) -> tuple[str, str] | tuple[None, str]:
    """(instruction, response) of one record, or (None, drop reason)."""
    if not isinstance(record, dict):
        return None, NOT_AN_OBJECT
    if lone_surrogate_in(record) is not None:
        return None, BAD_UNICODE
    fmt = detect(record) if fmt == "auto" else fmt
    if fmt is None:
        return None, UNKNOWN_FORMAT
    if fmt == "sharegpt":
        turn = _first_turn(record.get("conversations") or [])
        if turn is None:
            return None, NO_FIRST_TURN
        instruction, response = turn
    else:
        instruction, response = (record.get(f) for f in _FIELDS[fmt])
        extra = record.get("input") if fmt == "alpaca" else None
        if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
            instruction = f"{instruction}\n\n{extra}"
    if not isinstance(instruction, str) or not isinstance(response, str):
        return None, MISSING_FIELD
    if not instruction.strip() or not response.strip():
        return None, EMPTY_TEXT
    return instruction, response


def read_pairs(
    records: Iterable[tuple[str, Any]], fmt: str
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(pairs with a stable id, drops with where and why, records read); a repeated
    instruction is dropped (trained twice it would weigh twice)."""
    pairs, drops, seen, read = [], [], set(), 0
    for where, record in records:
        read += 1
        if isinstance(record, Exception):
            reason = UNREADABLE_FILE if isinstance(record, UnreadableFile) else BAD_JSON
            drops.append({"where": where, "reason": reason})
            continue
        instruction, response = to_pair(record, fmt)
        if instruction is None:
            drops.append({"where": where, "reason": response})
        elif instruction in seen:
            drops.append({"where": where, "reason": DUPLICATE_INSTRUCTION})
        else:
            seen.add(instruction)
            key = hashlib.blake2b(
                f"{instruction}\x00{response}".encode(), digest_size=12
            ).hexdigest()
            pairs.append(
                {
                    "id": f"ext:{key}",
                    "instruction": instruction,
                    "response": response,
                    "where": where,
                }
            )
    schema = dict.fromkeys(("id", "instruction", "response", "where"), pl.String)
    return (pl.DataFrame(pairs, schema=schema),
            pl.DataFrame(drops, schema={"where": pl.String, "reason": pl.String}), read)  # fmt: skip

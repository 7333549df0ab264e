"""Reading OpenAssistant seed records: from an oasst message tree, its first turn (a
prompter root and its English reply of rank 0, neither deleted nor synthetic; docs/method.md,
Data); from a flat record, its instruction and response fields. Every record becomes a pair
or a drop with a reason, whatever its JSON types or Unicode."""

import hashlib
from collections.abc import Iterable
from typing import Any

import polars as pl

from bft_assets.filters import lone_surrogate_in
from bft_resources.records import UnreadableFile

BAD_JSON = "bad_json"
NOT_A_PAIR = "not_a_pair"
ROOT_NOT_ENGLISH = "root_not_english"
ROOT_DELETED = "root_deleted"
ROOT_SYNTHETIC = "root_synthetic"
NO_RANK0_REPLY = "no_rank0_reply"
EMPTY_TEXT = "empty_text"
DUPLICATE_ID = "duplicate_id"
OVER_CAP = "over_cap"
UNREADABLE_FILE = "unreadable_file"
BAD_FIELD = "bad_field"
BAD_UNICODE = "bad_unicode"
SEED_DROP_REASONS = (
    BAD_JSON, NOT_A_PAIR, ROOT_NOT_ENGLISH, ROOT_DELETED, ROOT_SYNTHETIC, NO_RANK0_REPLY,
    EMPTY_TEXT, DUPLICATE_ID, OVER_CAP, UNREADABLE_FILE, BAD_FIELD, BAD_UNICODE,
)  # fmt: skip

_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_RESPONSE_KEYS = ("response", "output", "completion", "answer")


def _tree_pair(tree: dict[str, Any]) -> dict[str, str] | tuple[str, str]:
    """The first-turn pair of one oasst message tree, or why it has none."""
    root = tree["prompt"]
    if root.get("lang") != "en":
        return ROOT_NOT_ENGLISH
    if root.get("deleted"):
        return ROOT_DELETED
    if root.get("synthetic"):
        return ROOT_SYNTHETIC
    replies = root.get("replies") or []
    best = [
        r for r in (replies if isinstance(replies, list) else []) if isinstance(r, dict)
        and r.get("rank") == 0 and r.get("lang") == "en" and not r.get("deleted")
        and not r.get("synthetic") and r.get("role", "assistant") == "assistant"
    ]  # fmt: skip
    if not best:
        return NO_RANK0_REPLY
    texts = {"prompt.text": root.get("text", ""), "reply.text": best[0].get("text", "")}
    for field_name, value in texts.items():
        if not isinstance(value, str):
            return BAD_FIELD, f"{field_name} is a JSON {type(value).__name__}, not a string"
    return {
        "id": str(tree.get("message_tree_id") or root.get("message_id")),
        "instruction": texts["prompt.text"],
        "response": texts["reply.text"],
        "source": "oasst_tree",
    }


def _flat_pair(record: dict[str, Any]) -> dict[str, str] | str:
    instruction = next(
        (record[k] for k in _INSTRUCTION_KEYS if isinstance(record.get(k), str)), None
    )
    response = next((record[k] for k in _RESPONSE_KEYS if isinstance(record.get(k), str)), None)
    if instruction is None or response is None:
        return NOT_A_PAIR
    pair_id = (
        record.get("id")
        or hashlib.blake2b(f"{instruction}\x00{response}".encode(), digest_size=12).hexdigest()
    )
    return {
        "id": str(pair_id),
        "instruction": instruction,
        "response": response,
        "source": str(record.get("source") or "flat_pairs"),
    }


def to_pair(record: Any) -> dict[str, str] | tuple[str, str]:
    """A seed record (oasst tree or flat pair) to a pair, or (drop reason, detail)."""
    if not isinstance(record, dict):
        return NOT_A_PAIR, f"a JSON {type(record).__name__}, not an object"
    if (where := lone_surrogate_in(record)) is not None:
        return BAD_UNICODE, f"{where} holds a lone surrogate (valid JSON, not encodable text)"
    pair = _tree_pair(record) if isinstance(record.get("prompt"), dict) else _flat_pair(record)
    return (pair, "") if isinstance(pair, str) else pair


def select_seed_pairs(
    records: Iterable[tuple[str, Any]], max_examples: int
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(kept pairs, drops with reasons, records read): each record lands in one of the two."""
    read = 0
    kept: list[dict[str, str]] = []
    drops: list[dict[str, str]] = []
    seen: set[str] = set()
    for where, record in records:
        read += 1
        detail = str(record) if isinstance(record, Exception) else ""
        if isinstance(record, Exception):
            pair = UNREADABLE_FILE if isinstance(record, UnreadableFile) else BAD_JSON
        else:
            pair = to_pair(record)
            if isinstance(pair, tuple):
                pair, detail = pair
        if isinstance(pair, dict) and not (
            pair["instruction"].strip() and pair["response"].strip()
        ):
            pair = EMPTY_TEXT
        elif isinstance(pair, dict) and pair["id"] in seen:
            pair = DUPLICATE_ID
        elif isinstance(pair, dict) and len(kept) >= max_examples:
            pair = OVER_CAP
        if isinstance(pair, str):
            drops.append({"where": where, "reason": pair, "detail": detail})
            continue
        seen.add(pair["id"])
        kept.append({**pair, "where": where})
    pairs = pl.DataFrame(
        kept, schema=dict.fromkeys(("id", "instruction", "response", "source", "where"), pl.String)
    )
    rejects = pl.DataFrame(
        drops, schema={"where": pl.String, "reason": pl.String, "detail": pl.String}
    )
    return pairs, rejects, read

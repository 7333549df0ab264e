"""seed_examples: first-turn (instruction, response) pairs from OpenAssistant.

Reads the oasst export's message trees (``*.trees.jsonl``: one tree a line, a prompter root
with ``replies``) or flat pairs (JSONL or Parquet with instruction/response columns). From a
tree it keeps the root prompt and its reply of rank 0, English, neither deleted nor
synthetic (METHOD.md, Data); the first ``max_examples`` in file order are kept.
"""

import hashlib
from collections.abc import Iterable
from typing import Any

import dagster as dg
import polars as pl

from bft_assets.checks import accounting_check
from bft_assets.instance import SEED_EXAMPLES, BftInstance, digest
from bft_assets.reporting import counts_table, percentile_metadata, sample_rows, table_metadata
from bft_resources.quality import Rule, run_rules
from bft_resources.seed_source import UnreadableFile
from bft_resources.storage import table_name

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
SEED_DROP_REASONS = (
    BAD_JSON, NOT_A_PAIR, ROOT_NOT_ENGLISH, ROOT_DELETED, ROOT_SYNTHETIC, NO_RANK0_REPLY,
    EMPTY_TEXT, DUPLICATE_ID, OVER_CAP, UNREADABLE_FILE,
)  # fmt: skip

_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_RESPONSE_KEYS = ("response", "output", "completion", "answer")

CHECK_IDS_UNIQUE = "seed_examples_ids_unique"
CHECK_INSTRUCTION_NONEMPTY = "seed_examples_instruction_nonempty"
CHECK_RESPONSE_NONEMPTY = "seed_examples_response_nonempty"
CHECK_ACCOUNTED = "seed_examples_rows_accounted"
SEED_RULES = (
    Rule(
        CHECK_IDS_UNIQUE,
        "ExpectColumnValuesToBeUnique",
        {"column": "id"},
        blocking=True,
        description="Every seed pair has its own id.",
    ),
    Rule(
        CHECK_INSTRUCTION_NONEMPTY,
        "ExpectColumnValueLengthsToBeBetween",
        {"column": "instruction", "min_value": 1},
        blocking=True,
        description="No seed instruction is empty.",
    ),
    Rule(
        CHECK_RESPONSE_NONEMPTY,
        "ExpectColumnValueLengthsToBeBetween",
        {"column": "response", "min_value": 1},
        blocking=True,
        description="No seed response is empty.",
    ),
)


def _tree_pair(tree: dict[str, Any]) -> dict[str, str] | str:
    """The first-turn pair of one oasst message tree, or why it has none."""
    root = tree["prompt"]
    if root.get("lang") != "en":
        return ROOT_NOT_ENGLISH
    if root.get("deleted"):
        return ROOT_DELETED
    if root.get("synthetic"):
        return ROOT_SYNTHETIC
    best = [
        r for r in root.get("replies") or []
        if r.get("rank") == 0 and r.get("lang") == "en" and not r.get("deleted")
        and not r.get("synthetic") and r.get("role", "assistant") == "assistant"
    ]  # fmt: skip
    if not best:
        return NO_RANK0_REPLY
    reply = best[0]
    return {
        "id": str(tree.get("message_tree_id") or root.get("message_id")),
        "instruction": root.get("text") or "",
        "response": reply.get("text") or "",
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


def to_pair(record: Any) -> dict[str, str] | str:
    """A seed record (oasst tree or flat pair) to a pair, or a drop reason."""
    if not isinstance(record, dict):
        return NOT_A_PAIR
    if isinstance(record.get("prompt"), dict):
        return _tree_pair(record)
    return _flat_pair(record)


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


SEED_COLUMNS = {
    "id": "oasst message_tree_id, or a hash of the pair for flat files",
    "instruction": "The prompter's first message",
    "response": "The rank-0 assistant reply",
    "source": "oasst_tree, flat_pairs or the file's own source field",
    "where": "file:line the pair was read from",
}


def build_seed_examples(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(SEED_EXAMPLES)
    table = inst.table(SEED_EXAMPLES)

    @dg.asset(
        **inst.asset_args(SEED_EXAMPLES, {"polars"}, {"storage", "seed_source"}),
        group_name="seed",
        code_version=f"seed-v1;{digest(inst.seed)}",
        check_specs=[rule.spec(key) for rule in SEED_RULES]
        + [
            dg.AssetCheckSpec(
                CHECK_ACCOUNTED,
                asset=key,
                blocking=True,
                description="Records read == pairs kept + records dropped with a reason.",
            )
        ],
    )
    def seed_examples(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """First-turn English instruction/response pairs (rank-0 replies) from OpenAssistant
        message trees or flat pairs: the seed the backward and forward models learn from."""
        r = inst.bound(context)
        pairs, rejects, read = select_seed_pairs(r.seed_source.records(), inst.seed.max_examples)
        uri = r.storage.write(table, pairs)
        r.storage.write(table, rejects, suffix="rejects")
        drops = rejects["reason"].value_counts().rows() if rejects.height else []
        drops_by_reason = dict.fromkeys(SEED_DROP_REASONS, 0) | dict(drops)
        context.log.info(
            f"seed: {pairs.height} pairs kept of {read} records read from {r.seed_source.uri}"
        )
        lengths = pairs.select(
            pl.col("instruction").str.len_chars().alias("instruction_chars"),
            pl.col("response").str.len_chars().alias("response_chars"),
        )
        return dg.MaterializeResult(
            metadata={
                "rows": pairs.height,
                **table_metadata(pairs, SEED_COLUMNS),
                "records_read": read,
                "records_dropped": rejects.height,
                **{f"dropped_{k}": v for k, v in drops_by_reason.items()},
                "drops": counts_table(drops_by_reason),
                **percentile_metadata("instruction_chars", lengths["instruction_chars"]),
                **percentile_metadata("response_chars", lengths["response_chars"]),
                "sample": sample_rows(pairs, ["id", "instruction", "response"]),
                "path": dg.MetadataValue.path(uri),
                "rejects_path": dg.MetadataValue.path(
                    r.storage.uri(table_name(table, suffix="rejects"))
                ),
                "seed_uri": r.seed_source.uri,
            },
            check_results=[
                *run_rules(pairs, SEED_RULES),
                accounting_check(CHECK_ACCOUNTED, read, pairs.height, drops_by_reason),
            ],
        )

    return seed_examples

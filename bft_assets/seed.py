"""seed_examples: first-turn (instruction, response) pairs from OpenAssistant.

Reads the oasst export's message trees (``*.trees.jsonl``: one tree a line, a prompter root
with ``replies``) or flat pairs (JSONL or Parquet with instruction/response columns). From a
tree it keeps the root prompt and its reply of rank 0, English, neither deleted nor
synthetic (docs/method.md, Data); the first ``max_examples`` in file order are kept.
"""

import dagster as dg
import polars as pl

from bft_assets.checks import accounting_check
from bft_assets.instance import SEED_EXAMPLES, Instance, digest
from bft_assets.reporting import counts_table, files_table, percentile_metadata
from bft_assets.seed_records import select_seed_pairs
from bft_assets.specs import DEMO_DATA
from bft_assets.stage import Check, StageRun, stage_asset
from bft_resources.quality import Rule
from bft_resources.records import RecordFiles

SEED_RULES = (
    Rule("seed_examples_ids_unique", "ExpectColumnValuesToBeUnique", {"column": "id"}, blocking=True,
         description="Every seed pair has its own id."),
    Rule("seed_examples_instruction_nonempty", "ExpectColumnValueLengthsToBeBetween",
         {"column": "instruction", "min_value": 1}, blocking=True, description="No seed instruction is empty."),
    Rule("seed_examples_response_nonempty", "ExpectColumnValueLengthsToBeBetween",
         {"column": "response", "min_value": 1}, blocking=True, description="No seed response is empty."),
)  # fmt: skip
ACCOUNTED = Check("seed_examples_rows_accounted", "Records read == pairs kept + records dropped with a reason.",
                  blocking=True)  # fmt: skip


SEED_COLUMNS = {
    "id": "oasst message_tree_id, or a hash of the pair for flat files",
    "instruction": "The prompter's first message",
    "response": "The rank-0 assistant reply",
    "source": "oasst_tree, flat_pairs or the file's own source field",
    "where": "file:line the pair was read from",
}


def seed_source(inst: Instance) -> RecordFiles:
    from bft_assets.demo import demo_seed_path

    uri = inst.decl.seed.uri
    return RecordFiles(uri=str(demo_seed_path()) if uri == DEMO_DATA else uri)


def build_seed_examples(inst: Instance) -> dg.AssetsDefinition:
    @stage_asset(inst, SEED_EXAMPLES, group="seed", kinds={"polars"}, checks=(*SEED_RULES, ACCOUNTED),
                 code_version=f"seed-v1;{digest(inst.decl.seed)}")  # fmt: skip
    def seed_examples(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """First-turn English instruction/response pairs (rank-0 replies) from OpenAssistant
        message trees or flat pairs: the seed the backward and forward models learn from."""
        run, source = StageRun(inst, context), seed_source(inst)
        pairs, rejects, read = select_seed_pairs(source.records(), inst.decl.seed.max_examples)
        rejects_uri = run.write(rejects, suffix="rejects")
        drops = dict(rejects["reason"].value_counts().rows()) if rejects.height else {}
        run.log(f"seed: {pairs.height} pairs kept of {read} records read from {source.uri}")
        lengths = pairs.select(instruction_chars=pl.col("instruction").str.len_chars(),
                               response_chars=pl.col("response").str.len_chars())  # fmt: skip
        return run.finish(
            pairs, SEED_COLUMNS, rules=SEED_RULES, sample=["id", "instruction", "response"],
            metadata={"records_read": read, "records_dropped": rejects.height,
                      "drops": counts_table(drops, total=read),
                      **percentile_metadata("instruction_chars", lengths["instruction_chars"]),
                      **percentile_metadata("response_chars", lengths["response_chars"]),
                      "rejects_path": dg.MetadataValue.path(rejects_uri), "seed_uri": source.uri,
                      "files_skipped": files_table(source.skipped())},
            checks=[accounting_check(ACCOUNTED.check_name, read, pairs.height, drops)],
        )  # fmt: skip

    return seed_examples

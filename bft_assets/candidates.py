"""candidate_responses: the documents of a shard that can serve as answers (parsed, English,
deduplicated, within the token budget of every prompt they travel through), streamed from
the shard to Parquet a batch at a time; every dropped line goes to the `.rejects` sidecar
with its reason (the rules: ``bft_assets.filters``)."""

import time

import dagster as dg
import polars as pl
import pyarrow as pa

from bft_assets.budget import document_budget, message_tokens
from bft_assets.checks import accounting_check, rate_floor_check
from bft_assets.filters import (
    DROP_REASONS,
    CandidateFilter,
    Document,
    Drop,
    FilterSettings,
    numbered_batches,
)
from bft_assets.instance import CANDIDATE_RESPONSES, CORPUS_DOCUMENTS, Instance, digest
from bft_assets.prompts import BACKTRANSLATE
from bft_assets.reporting import counts_table, files_table, percentile_metadata
from bft_assets.stage import Check, StageRun, stage_asset
from bft_resources.quality import Rule, run_rules
from bft_resources.storage import table_name

FILTER_VERSION = "filters-v1"
_BATCH_LINES = 2048

CANDIDATE_SCHEMA = pa.schema([
    ("shard", pa.string()), ("line", pa.int64()), ("id", pa.string()), ("text", pa.string()),
    ("source", pa.string()), ("added", pa.string()), ("created", pa.string()),
    ("metadata", pa.string()), ("n_words", pa.int64()), ("n_tokens", pa.int64()),
    ("english_score", pa.float64()), ("text_hash", pa.string()),
])  # fmt: skip
REJECT_SCHEMA = pa.schema([
    ("shard", pa.string()), ("line", pa.int64()), ("id", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("excerpt", pa.string()),
])  # fmt: skip

RULES = (
    Rule("candidate_responses_ids_unique", "ExpectColumnValuesToBeUnique", {"column": "id"}, blocking=True,
         description="Document ids are unique within the shard."),
    Rule("candidate_responses_text_nonempty", "ExpectColumnValuesToBeBetween", {"column": "text_chars", "min_value": 1},
         blocking=True, description="No kept document has empty text."),
)  # fmt: skip
IN_BUDGET = Check("candidate_responses_tokens_in_budget", "Every kept document fits the context window in every prompt "
                  "it goes through (backtranslation, scoring, rewriting) with that prompt's generation budget.", blocking=True)  # fmt: skip
KNOWN_REASONS = Check("candidate_responses_known_drop_reasons", "Every rejected line carries one of the known drop reasons.")  # fmt: skip
KEEP_RATE = Check(
    "candidate_responses_keep_rate", "Share of lines kept is above the configured floor (WARN)."
)
ACCOUNTED = Check("candidate_responses_rows_accounted", "Lines read == documents kept + lines dropped with a reason.", blocking=True)  # fmt: skip


def kept_frame(shard: str, kept: list[tuple[Document, int]]) -> pl.DataFrame:
    rows = [{"shard": shard, "line": d.line, "id": d.id, "text": d.text, "source": d.source, "added": d.added,
             "created": d.created, "metadata": d.metadata, "n_words": d.n_words, "n_tokens": n,
             "english_score": d.english_score, "text_hash": d.text_hash} for d, n in kept]  # fmt: skip
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA))


def drop_frame(shard: str, drops: list[Drop]) -> pl.DataFrame:
    rows = [{"shard": shard, "line": d.line, "id": d.id, "reason": d.reason, "detail": d.detail,
             "excerpt": d.excerpt} for d in drops]  # fmt: skip
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))


COLUMNS = {
    "id": "Dolma document id",
    "text": "The document: a candidate response",
    "line": "Line number in the shard",
    "n_tokens": "Tokens under the base model's tokenizer",
    "english_score": "Share of common English function words",
    "text_hash": "blake2b of the text (exact-duplicate key)",
}


def build_candidate_responses(inst: Instance) -> dg.AssetsDefinition:
    filters = inst.decl.corpus
    base = inst.model("base")
    version = f"{FILTER_VERSION};prompt={BACKTRANSLATE.version};" + digest(
        filters.model_dump(exclude={"uri"}), inst.decl.generation, base.reference
    )

    @stage_asset(inst, CANDIDATE_RESPONSES, group="generation", kinds={"polars", "huggingface"}, code_version=version,
                 checks=(*RULES, IN_BUDGET, KNOWN_REASONS, KEEP_RATE, ACCOUNTED), partitions=inst.shards,
                 deps=[inst.key(CORPUS_DOCUMENTS)])  # fmt: skip
    def candidate_responses(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Web documents of one shard that can serve as answers: parsed, English, deduplicated
        and short enough for every prompt they go through. Dropped lines go to the `.rejects`
        sidecar with their reason."""
        run, corpus = StageRun(inst, context), inst.corpus()
        shard = corpus.shard(run.partition)
        fits = document_budget(message_tokens(base), base.context_length(), inst.decl.generation)
        settings = FilterSettings(filters.max_document_bytes, filters.min_words, filters.english_only,
                                  filters.min_english_score)  # fmt: skip
        rules, started = (
            CandidateFilter(settings, base.token_counter(), fits.tokens),
            time.perf_counter(),
        )
        with (run.storage.table_writer(run.table, run.partition, schema=CANDIDATE_SCHEMA) as kept_out,
              run.storage.table_writer(run.table, run.partition, "rejects", schema=REJECT_SCHEMA) as drop_out):  # fmt: skip
            for batch in numbered_batches(corpus.lines(shard), _BATCH_LINES):
                kept, drops = rules.process(batch)
                if kept:
                    kept_out.write(kept_frame(run.partition, kept))
                if drops:
                    drop_out.write(drop_frame(run.partition, drops))
                run.log(f"{run.partition}: read {rules.lines_read} lines, kept {kept_out.rows}")
        elapsed = time.perf_counter() - started
        # The checks read every column but the texts (their lengths stand in for them), so a
        # shard is never held in memory whole, here either.
        written = run.storage.scan(run.table, run.partition)
        table = written.select(
            "id", "n_tokens", text_chars=pl.col("text").str.len_chars()
        ).collect()
        rejects = run.storage.scan(run.table, run.partition, "rejects").select("reason").collect()
        over = table.filter(pl.col("n_tokens") > fits.tokens).height
        unknown = rejects.filter(~pl.col("reason").is_in(DROP_REASONS)).height
        return run.report(
            written, run.storage.uri(table_name(run.table, run.partition)), COLUMNS, rows=table.height,
            sample=["id", "n_tokens", "text"],
            metadata={"lines_read": rules.lines_read, "lines_dropped": rejects.height,
                      "drops": counts_table(rules.drops_by_reason, total=rules.lines_read),
                      "keep_rate": table.height / rules.lines_read if rules.lines_read else 0.0,
                      **percentile_metadata("n_tokens", table["n_tokens"]), "token_budget": fits.tokens,
                      "budget": fits.table(), "budget_limited_by": fits.limiting, "context_window": fits.window,
                      "shard_uri": dg.MetadataValue.path(shard.uri), "shard_bytes": shard.size_bytes,
                      "shard_hash": corpus.fingerprint(shard), "docs_per_second": rules.lines_read / elapsed if elapsed else 0.0,
                      "rejects_path": dg.MetadataValue.path(run.storage.uri(table_name(run.table, run.partition, "rejects"))),
                      "base_model": base.reference,
                      "corpus_files_skipped": files_table([(r.uri, r.reason) for r in corpus.skipped_files()])},
            checks=[*run_rules(table, RULES),
                    dg.AssetCheckResult(check_name=IN_BUDGET.check_name, passed=over == 0 and table.height > 0,
                                        metadata={"over_budget": over, "budget": fits.tokens,
                                                  "max_tokens": int(table["n_tokens"].max() or 0)}),
                    dg.AssetCheckResult(check_name=KNOWN_REASONS.check_name, passed=unknown == 0,
                                        severity=dg.AssetCheckSeverity.WARN, metadata={"unknown_reasons": unknown}),
                    rate_floor_check(KEEP_RATE.check_name, table.height, rules.lines_read, filters.min_keep_rate),
                    accounting_check(ACCOUNTED.check_name, rules.lines_read, table.height, rules.drops_by_reason)],
        )  # fmt: skip

    return candidate_responses

"""The web corpus: corpus_documents (shards, observed), shard discovery, candidate_responses."""

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import dagster as dg
import polars as pl
import pyarrow as pa

from bft_assets.budget import document_budget
from bft_assets.candidates import DROP_REASONS, CandidateFilter, Document, Drop, FilterSettings
from bft_assets.checks import accounting_check, rate_floor_check
from bft_assets.instance import (
    CANDIDATE_RESPONSES,
    CORPUS_DOCUMENTS,
    BftInstance,
    digest,
)
from bft_assets.policies import GPU_POOL, ONE_PARTITION_PER_RUN
from bft_assets.prompts import BACKTRANSLATE, llama2_inst
from bft_assets.reporting import counts_table, percentile_metadata, sample_rows, table_metadata
from bft_resources.corpus import CorpusSource
from bft_resources.engine import Chat
from bft_resources.engine.prompts import prompt_token_ids
from bft_resources.models import ModelResource
from bft_resources.quality import Rule, run_rules
from bft_resources.storage import table_name

SHARD_SENSOR = "corpus_shard_sensor"
_log = logging.getLogger(__name__)
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

CHECK_IDS = "candidate_responses_ids_unique"
CHECK_TEXT = "candidate_responses_text_nonempty"
CHECK_TOKENS = "candidate_responses_tokens_in_budget"
CHECK_REASONS = "candidate_responses_known_drop_reasons"
CHECK_KEEP_RATE = "candidate_responses_keep_rate"
CHECK_ACCOUNTED = "candidate_responses_rows_accounted"
CANDIDATE_RULES = (
    Rule(
        CHECK_IDS,
        "ExpectColumnValuesToBeUnique",
        {"column": "id"},
        blocking=True,
        description="Document ids are unique within the shard.",
    ),
    Rule(
        CHECK_TEXT,
        "ExpectColumnValuesToBeBetween",
        {"column": "text_chars", "min_value": 1},
        blocking=True,
        description="No kept document has empty text.",
    ),
)


def new_shard_keys(
    corpus: CorpusSource,
    instance: dg.DagsterInstance,
    partitions: str,
    warn: Callable[[str], None] = _log.warning,
) -> list[str]:
    """Shards under the corpus root that have no partition yet; files whose key is unsafe or
    collides are reported through ``warn`` and left out, the others still come."""
    shards, refused = corpus.survey()
    for problem in refused:
        warn(f"{problem.uri}: {problem.reason}")
    known = set(instance.get_dynamic_partitions(partitions))
    return [s.key for s in shards if s.key not in known]


def discover_shards(
    corpus: CorpusSource,
    instance: dg.DagsterInstance,
    partitions: str,
    warn: Callable[[str], None] = _log.warning,
) -> list[str]:
    """Add a dynamic partition for every shard not yet known; return the new keys."""
    new = new_shard_keys(corpus, instance, partitions, warn)
    if new:
        instance.add_dynamic_partitions(partitions, new)
        register_gpu_pool(instance)
    return new


def register_gpu_pool(instance: dg.DagsterInstance) -> None:
    """Give the gpu pool its default limit before the shards' runs are queued: a pool the
    instance has never seen is not counted when the queue first dequeues, which let two GPU
    runs start at once on a fresh instance."""
    if instance.global_op_concurrency_default_limit:
        instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)


def build_shard_sensor(inst: BftInstance) -> dg.SensorDefinition:
    @dg.sensor(
        name=inst.name(SHARD_SENSOR),
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={inst.resource_key("corpus")},
        description=f"Adds a {inst.shards.name} partition for every new shard file under {inst.corpus.uri}.",
    )
    def corpus_shard_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        corpus = inst.bound(context).corpus
        new = new_shard_keys(corpus, context.instance, inst.shards.name, context.log.warning)
        if not new:
            return dg.SensorResult(skip_reason="no new shards")
        context.log.info(f"new shards: {new}")
        register_gpu_pool(context.instance)
        return dg.SensorResult(dynamic_partitions_requests=[inst.shards.build_add_request(new)])

    return corpus_shard_sensor


def build_corpus_documents(inst: BftInstance) -> dg.AssetsDefinition:
    @dg.observable_source_asset(
        key=inst.key(CORPUS_DOCUMENTS),
        partitions_def=inst.shards,
        group_name="generation",
        owners=list(inst.owners),
        tags=dict(inst.tags),
        required_resource_keys={inst.resource_key("corpus")},
        description=f"Web documents in Dolma format (gzip JSONL shards under {inst.corpus.uri}), "
        "one partition per shard; the data version is the shard's content hash (ETag on S3).",
    )
    def corpus_documents(context: dg.AssetExecutionContext) -> dg.DataVersionsByPartition:
        corpus = inst.bound(context).corpus
        known = set(context.instance.get_dynamic_partitions(inst.shards.name))
        versions = {s.key: corpus.fingerprint(s) for s in corpus.list_shards() if s.key in known}
        context.log.info(f"observed {len(versions)} shards")
        return dg.DataVersionsByPartition(versions)

    return corpus_documents


def message_tokens(model: ModelResource) -> Callable[[str], int]:
    """Tokens a user message takes once rendered for the base model (its chat template, or
    the paper's Llama-2 markers), exactly as the engines feed it."""
    tokenizer = model.tokenizer()
    return lambda message: len(prompt_token_ids(tokenizer, Chat(message), llama2_inst))


def token_counter(model: ModelResource) -> Callable[[list[str]], list[int]]:
    """Token counts under the base model's tokenizer. A fast (Rust) tokenizer counts through
    `encode_batch_fast`, which skips the character offsets nobody reads here: the same
    counts, 1.6x faster than the transformers call."""
    tokenizer = model.tokenizer()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):

        def count(texts: list[str]) -> list[int]:
            with _tokenizer_threads():
                encoded = backend.encode_batch_fast(texts, add_special_tokens=False)
            return [len(e.ids) for e in encoded]

        return count
    return lambda texts: [
        len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]


@contextlib.contextmanager
def _tokenizer_threads() -> Iterator[None]:
    """Let the Rust tokenizer spread a batch over every core. TOKENIZERS_PARALLELISM is off
    elsewhere (Makefile, tests) to keep forked workers quiet; the library reads it on each
    call, and nothing forks inside this block."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _batches(lines: Iterable[bytes], size: int) -> Iterator[list[tuple[int, bytes]]]:
    numbered = enumerate(lines, start=1)
    while batch := list(islice(numbered, size)):
        yield batch


def _kept_frame(shard: str, kept: list[tuple[Document, int]]) -> pl.DataFrame:
    rows = [
        {
            "shard": shard,
            "line": d.line,
            "id": d.id,
            "text": d.text,
            "source": d.source,
            "added": d.added,
            "created": d.created,
            "metadata": d.metadata,
            "n_words": d.n_words,
            "n_tokens": n,
            "english_score": d.english_score,
            "text_hash": d.text_hash,
        }
        for d, n in kept
    ]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA))


def _drop_frame(shard: str, drops: list[Drop]) -> pl.DataFrame:
    rows = [
        {
            "shard": shard,
            "line": d.line,
            "id": d.id,
            "reason": d.reason,
            "detail": d.detail,
            "excerpt": d.excerpt,
        }
        for d in drops
    ]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))


CANDIDATE_COLUMNS = {
    "id": "Dolma document id",
    "text": "The document: a candidate response",
    "line": "Line number in the shard",
    "n_tokens": "Tokens under the base model's tokenizer",
    "english_score": "Share of common English function words",
    "text_hash": "blake2b of the text (exact-duplicate key)",
}


def build_candidate_responses(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(CANDIDATE_RESPONSES)
    stored = inst.table(CANDIDATE_RESPONSES)
    filters = inst.corpus

    @dg.asset(
        **inst.asset_args(
            CANDIDATE_RESPONSES, {"polars", "huggingface"}, {"corpus", "base_model", "storage"}
        ),
        partitions_def=inst.shards,
        deps=[inst.key(CORPUS_DOCUMENTS)],
        group_name="generation",
        code_version=f"{FILTER_VERSION};prompt={BACKTRANSLATE.version};"
        f"{digest(filters.model_dump(exclude={'uri'}), inst.generation, inst.models.base)}",
        backfill_policy=ONE_PARTITION_PER_RUN,
        check_specs=[rule.spec(key) for rule in CANDIDATE_RULES]
        + [
            dg.AssetCheckSpec(
                CHECK_TOKENS,
                asset=key,
                blocking=True,
                description="Every kept document fits the context window in every prompt it goes through (backtranslation, scoring, rewriting) with that prompt's generation budget.",
            ),
            dg.AssetCheckSpec(
                CHECK_REASONS,
                asset=key,
                description="Every rejected line carries one of the known drop reasons.",
            ),
            dg.AssetCheckSpec(
                CHECK_KEEP_RATE,
                asset=key,
                description="Share of lines kept is above the configured floor (WARN).",
            ),
            dg.AssetCheckSpec(
                CHECK_ACCOUNTED,
                asset=key,
                blocking=True,
                description="Lines read == documents kept + lines dropped with a reason.",
            ),
        ],
    )
    def candidate_responses(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Web documents of one shard that can serve as answers: parsed, English, deduplicated
        and short enough that the backtranslation prompt and its generation budget fit the
        base model's context window. Dropped lines go to the `.rejects` sidecar with their
        reason."""
        r = inst.bound(context)
        corpus, base_model, storage = r.corpus, r.base_model, r.storage
        shard_key = inst.partition(context)
        shard = corpus.shard(shard_key)
        window = base_model.context_length()
        fits = document_budget(message_tokens(base_model), window, inst.generation)
        budget = fits.tokens
        settings = FilterSettings(
            filters.max_document_bytes,
            filters.min_words,
            filters.english_only,
            filters.min_english_score,
        )
        rules = CandidateFilter(settings, token_counter(base_model), budget)
        started = time.perf_counter()
        with (
            storage.table_writer(stored, shard_key, schema=CANDIDATE_SCHEMA) as kept_out,
            storage.table_writer(stored, shard_key, "rejects", schema=REJECT_SCHEMA) as drop_out,
        ):
            for batch in _batches(corpus.lines(shard), _BATCH_LINES):
                kept, drops = rules.process(batch)
                if kept:
                    kept_out.write(_kept_frame(shard_key, kept))
                if drops:
                    drop_out.write(_drop_frame(shard_key, drops))
            context.log.info(f"{shard_key}: read {rules.lines_read} lines, kept {kept_out.rows}")
        elapsed = time.perf_counter() - started

        # The checks and metadata read every column but the texts (their lengths stand in for
        # them), so a shard is never held in memory whole, here either.
        written = storage.scan(stored, shard_key)
        table = written.select(
            "id", "n_tokens", text_chars=pl.col("text").str.len_chars()
        ).collect()
        rejects = storage.scan(stored, shard_key, "rejects").select("reason").collect()
        over_budget = table.filter(pl.col("n_tokens") > budget).height
        unknown = rejects.filter(~pl.col("reason").is_in(DROP_REASONS)).height
        return dg.MaterializeResult(
            metadata={
                "rows": table.height,
                **table_metadata(written, CANDIDATE_COLUMNS, rows=table.height),
                "lines_read": rules.lines_read,
                "lines_dropped": rejects.height,
                **{f"dropped_{k}": v for k, v in rules.drops_by_reason.items()},
                "drops": counts_table(rules.drops_by_reason),
                "keep_rate": table.height / rules.lines_read if rules.lines_read else 0.0,
                **percentile_metadata("n_tokens", table["n_tokens"]),
                "token_budget": budget,
                **{f"prompt_overhead_{k}": v for k, v in fits.overheads.items()},
                **{f"budget_{k}": v for k, v in fits.limits.items()},
                "budget_limited_by": fits.limiting,
                "context_window": window,
                "shard_uri": dg.MetadataValue.path(shard.uri),
                "shard_bytes": shard.size_bytes,
                "shard_hash": corpus.fingerprint(shard),
                "docs_per_second": rules.lines_read / elapsed if elapsed else 0.0,
                "sample": sample_rows(written.head(5).collect(), ["id", "n_tokens", "text"]),
                "path": dg.MetadataValue.path(storage.uri(table_name(stored, shard_key))),
                "rejects_path": dg.MetadataValue.path(
                    storage.uri(table_name(stored, shard_key, "rejects"))
                ),
                "base_model": base_model.reference,
            },
            check_results=[
                *run_rules(table, CANDIDATE_RULES),
                dg.AssetCheckResult(
                    check_name=CHECK_TOKENS,
                    passed=over_budget == 0 and table.height > 0,
                    metadata={
                        "over_budget": over_budget,
                        "budget": budget,
                        "max_tokens": int(table["n_tokens"].max() or 0),
                    },
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_REASONS,
                    passed=unknown == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"unknown_reasons": unknown},
                ),
                rate_floor_check(
                    CHECK_KEEP_RATE, table.height, rules.lines_read, filters.min_keep_rate
                ),
                accounting_check(
                    CHECK_ACCOUNTED, rules.lines_read, table.height, rules.drops_by_reason
                ),
            ],
        )

    return candidate_responses

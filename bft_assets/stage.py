"""The runner every stage uses (datatrove's ``PipelineStep`` idea): a stage declares its
passes, its rules and its metadata; the runner reads the partition, loads the model once,
runs each pass in resumable batches with a progress line per batch, writes the table,
clears the scratch and reports, with the metadata every stage shares.

    SCORE = Pass("score", call=score_batch, batch_rows=32, settings=str(sampling), unit="pairs")

    @stage_asset(inst, SCORED_POOL, group="generation", checks=SCORE_CHECKS, ...)
    def scored_pool(context):
        run = StageRun(inst, context)
        pool = run.read(BACKTRANSLATED_POOL)
        (scored,) = run.passes(inst.engine(), inst.stage_model("forward"), [(SCORE, pool)])
        return run.finish(join(pool, scored), COLUMNS, metadata, checks)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import polars as pl

from bft_assets.instance import Instance, digest
from bft_assets.policies import ONE_PARTITION_PER_RUN
from bft_assets.prompts import llama2_inst, neutralize
from bft_assets.reporting import sample_rows, table_metadata
from bft_resources.engine import Chat, Engine, Generation, LoadedModel, Sampling
from bft_resources.models import ModelRef
from bft_resources.quality import Rule, run_rules
from bft_resources.work import ResumableWork, WorkStats

# What an asset that loads a model shows in the UI.
MODEL_KINDS = {"polars", "huggingface", "pytorch"}
ROW_ID = "row_id"


@dataclass(frozen=True)
class Check:
    """A check a stage computes itself (counts, rates), declared beside its rules."""

    check_name: str
    description: str
    blocking: bool = False

    def spec(self, asset: dg.AssetKey) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(
            self.check_name, asset=asset, description=self.description, blocking=self.blocking
        )


@dataclass(frozen=True)
class Pass:
    """One kind of request a stage sends its model: ``call(model, batch)`` returns one row per
    input row, with ``row_id``, its outputs and, where it made or read text,
    ``prompt_tokens``/``completion_tokens``."""

    name: str
    call: Callable[[LoadedModel, pl.DataFrame], pl.DataFrame]
    batch_rows: int
    settings: str = ""  # what else decides the output (sampling, mode): part of its scratch key
    unit: str = "rows"
    # Whether the asset's code version keys its scratch too; a pass whose settings already
    # name all it depends on (a checkpoint's hash) keeps its work across unrelated edits.
    versioned: bool = True


def stage_asset(
    inst: Instance,
    asset: str,
    *,
    group: str,
    checks: Sequence[Rule | Check],
    code_version: str,
    kinds: set[str] = frozenset(),
    partitions: dg.PartitionsDefinition | None = None,
    deps: Sequence[dg.AssetKey | dg.AssetDep] = (),
    gpus: int | None = None,
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """``@dg.asset`` with what every stage of the instance declares: key, group, owners,
    tags and kinds (through the declaration's translation), automation, code version and
    check specs; and, for a stage that loads a model (``gpus`` given), the gpu pool, one
    partition per backfill run and the step's GPU request."""
    key = inst.key(asset)
    arguments = {
        **inst.asset_args(asset, set(kinds), group),
        "partitions_def": partitions,
        "deps": list(deps),
        "code_version": code_version,
        "check_specs": [check.spec(key) for check in checks],
        # A backfill of N partitions is N runs: a failure (an OOM, a preempted node) costs one.
        **({"backfill_policy": ONE_PARTITION_PER_RUN} if partitions is not None else {}),
    }
    if gpus is not None:
        arguments.update(inst.gpu_args(asset, gpus))
    return dg.asset(**arguments)


def generation_version(prompt_versions: str, *settings: object) -> str:
    """A generation stage's code version: its prompts' versions and a digest of the declared
    settings and model references that change its output."""
    return f"prompt={prompt_versions};settings={digest(*settings)}"


def sampling_of(spec: Any, stop: tuple[str, ...] = ()) -> Sampling:
    """A declared sampling block (temperature, top_p, max_new_tokens, seed) as engine Sampling."""
    return Sampling(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
                    seed=spec.seed, stop=stop)  # fmt: skip


def safe(model: LoadedModel) -> Callable[[str | None], str]:
    """``neutralize`` with this model's special tokens: text made safe inside a prompt."""
    special = model.special_tokens()
    return lambda text: neutralize(text or "", special)


def generations_frame(
    rows: pl.DataFrame, generations: Sequence[Generation], column: str
) -> pl.DataFrame:
    """row_id plus the generated text, its finish reason and token counts."""
    return pl.DataFrame(
        {
            ROW_ID: rows[ROW_ID],
            column: [g.text for g in generations],
            f"{column}_finish": [g.finish_reasons[0] if g.finish_reasons else "stop" for g in generations],
            "prompt_tokens": [g.prompt_tokens for g in generations],
            "completion_tokens": [g.completion_tokens for g in generations],
        },
        schema_overrides={"prompt_tokens": pl.Int64, "completion_tokens": pl.Int64,
                          column: pl.String, f"{column}_finish": pl.String},
    )  # fmt: skip


def generate(
    model: LoadedModel, rows: pl.DataFrame, messages: Sequence[str], sampling: Sampling | Sequence[Sampling],
    column: str, prefix: str = "",
) -> pl.DataFrame:  # fmt: skip
    """Generate one reply per finished user message; the frame ``generations_frame`` makes."""
    chats = [Chat(m, assistant_prefix=prefix) for m in messages]
    return generations_frame(rows, model.generate(chats, sampling), column)


class StageRun:
    """One materialization of a stage: its partition, the instance's storage, its passes'
    scratch and statistics, and the MaterializeResult at the end."""

    def __init__(self, inst: Instance, context: dg.AssetExecutionContext):
        self.inst = inst
        self.context = context
        self.asset = context.asset_key.path[-1]
        self.table = inst.table(self.asset)
        self.storage = inst.storage
        self.log = context.log.info
        # A backfill run carries its one partition as a range (start == end), not as a key.
        partitioned = context.has_partition_key or context.has_partition_key_range
        self.partition = inst.partition(context) if partitioned else None
        self.stats: dict[str, WorkStats] = {}
        self.served: str | None = None
        self._works: list[ResumableWork] = []

    def read(self, asset: str, suffix: str | None = None) -> pl.DataFrame:
        """This partition's table of an upstream asset (or the unpartitioned table)."""
        return self.storage.read(self.inst.table(asset), self.partition, suffix)

    def read_shards(self, asset: str) -> tuple[pl.DataFrame, list[str], list[str]]:
        """Every known shard's table of a per-shard asset as one frame (empty when none is
        materialized), with the shards read and the shards missing."""
        table = self.inst.table(asset)
        shards = self.context.instance.get_dynamic_partitions(self.inst.shards.name)
        present = [s for s in shards if self.storage.exists(table, s)]
        frames = [self.storage.read(table, s) for s in present]
        whole = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        return whole, present, sorted(set(shards) - set(present))

    @contextmanager
    def load(self, engine: Engine, model: ModelRef) -> Iterator[LoadedModel]:
        """The model, loaded once for this run (the paper's Llama-2 rendering for a model
        without a chat template), with a line in the log while it loads."""
        started = time.perf_counter()
        self.log(f"loading {model.reference} on {engine.describe()}")
        with engine.load(model, fallback=llama2_inst, log=self.log) as loaded:
            self.log(f"loaded {model.reference} in {time.perf_counter() - started:.1f} s")
            yield loaded
            self.served = loaded.reference  # an endpoint's: the model the server says answered

    def passes(
        self, engine: Engine, model: ModelRef, todo: Sequence[tuple[Pass, pl.DataFrame]]
    ) -> list[pl.DataFrame]:
        """Run each (pass, rows) on one load of the model; their outputs, in order."""
        with self.load(engine, model) as loaded:
            return [self.run_pass(loaded, p, rows, model.reference) for p, rows in todo]

    def run_pass(
        self, loaded: LoadedModel, step: Pass, rows: pl.DataFrame, model: str, tag: str = ""
    ) -> pl.DataFrame:
        """One pass over ``rows`` in resumable batches: finished batches survive a crash
        and a retry does only the rest. ``tag`` tells passes of one name apart (a step)."""
        label = f"{step.name} {tag}".strip()
        work = self.work(f"{step.name};{step.settings};{model};{tag}", versioned=step.versioned)
        out, stats = work.run(
            rows,
            lambda batch: step.call(loaded, batch),
            step.batch_rows,
            self.log,
            f"{label} {step.unit}",
        )
        self.stats[label] = stats
        return out

    def work(self, settings: str, versioned: bool = True) -> ResumableWork:
        """This partition's scratch for these settings (and this code version, unless not
        ``versioned``); cleared when the run finishes."""
        version = (
            self.context.assets_def.code_versions_by_key[self.context.asset_key]
            if versioned
            else ""
        )
        key = hashlib.sha256(f"{version};{settings}".encode()).hexdigest()[:16]
        folder = self.storage.scratch_dir(self.table, self.partition, key)
        work = ResumableWork(folder, ROW_ID, self.context.log.warning)
        self._works.append(work)
        return work

    def write(self, frame: pl.DataFrame, suffix: str | None = None) -> str:
        return self.storage.write(self.table, frame, partition=self.partition, suffix=suffix)

    def work_metadata(self) -> dict[str, Any]:
        """Rows done and reused, tokens and throughput of every pass, one row each."""
        from bft_assets.reporting import markdown_table

        if not self.stats:
            return {}
        rows = [{"pass": name, "rows": s.rows, "reused": s.reused_rows, "tokens_in": s.prompt_tokens,
                 "tokens_out": s.completion_tokens, "tokens_per_second": round(s.tokens_per_second, 1),
                 "seconds": round(s.seconds, 1)} for name, s in self.stats.items()]  # fmt: skip
        total = sum((s.seconds for s in self.stats.values()), 0.0)
        out_tokens = sum(s.completion_tokens for s in self.stats.values())
        return {"passes": markdown_table(rows), "rows_generated": sum(s.rows for s in self.stats.values()),
                "rows_reused": sum(s.reused_rows for s in self.stats.values()),
                "tokens_in": sum(s.prompt_tokens for s in self.stats.values()), "tokens_out": out_tokens,
                "tokens_per_second": round(out_tokens / total, 2) if total else 0.0,
                "wall_seconds": round(total, 2)}  # fmt: skip

    def finish(
        self,
        table: pl.DataFrame,
        columns: Mapping[str, str],
        metadata: Mapping[str, Any],
        checks: Sequence[dg.AssetCheckResult],
        rules: Sequence[Rule] = (),
        sample: Sequence[str] = (),
        suffix: str | None = None,
    ) -> dg.MaterializeResult:
        """Write the table, clear this run's scratch, and report (see ``report``)."""
        uri = self.write(table, suffix)
        for work in self._works:
            work.clear()
        return self.report(
            table, uri, columns, metadata, [*run_rules(table, rules), *checks], sample
        )

    def report(
        self,
        table: pl.DataFrame | pl.LazyFrame,
        uri: str,
        columns: Mapping[str, str],
        metadata: Mapping[str, Any],
        checks: Sequence[dg.AssetCheckResult],
        sample: Sequence[str] = (),
        rows: int | None = None,
    ) -> dg.MaterializeResult:
        """The column schema, row count, path, model, passes, a sample, the stage's own
        metadata and every check (a lazy table gives its schema unread; pass its rows)."""
        rows = table.height if isinstance(table, pl.DataFrame) else rows
        common: dict[str, Any] = {"rows": rows, **table_metadata(table, columns, rows=rows),
                                  "path": dg.MetadataValue.path(uri), **self.work_metadata()}  # fmt: skip
        if self.served is not None:
            common["model"] = self.served
        if sample:
            head = table.head(5) if isinstance(table, pl.DataFrame) else table.head(5).collect()
            common["sample"] = sample_rows(head, list(sample))
        return dg.MaterializeResult(metadata={**common, **metadata}, check_results=list(checks))

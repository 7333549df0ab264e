"""What the three generation stages share: sampling config, resumable work, metadata."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import dagster as dg
import polars as pl

from bft_assets.instance import BftInstance, digest
from bft_assets.prompts import neutralize
from bft_assets.reporting import percentile_metadata
from bft_assets.specs import SamplingSpec
from bft_resources.engine import Chat, Generation, LoadedModel, Sampling
from bft_resources.models import ModelResource
from bft_resources.storage import Storage
from bft_resources.work import ResumableWork, WorkStats


def sampling_of(spec: SamplingSpec, stop: tuple[str, ...] = ()) -> Sampling:
    return Sampling(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
                    seed=spec.seed, stop=stop)  # fmt: skip


def generation_stage(
    inst: BftInstance,
    asset: str,
    prompt_versions: str,
    settings: object,
    model: str,
    roles: set[str],
) -> dict:
    """Decorator arguments every per-shard generation stage shares: shard partitions, what
    every GPU step declares, and a code version made of what changes its output (prompt
    versions, declared settings, model reference), so changing any marks it stale."""
    return {
        **inst.asset_args(
            asset, {"polars", "huggingface", "pytorch"}, roles | {"engine", "storage"}
        ),
        "partitions_def": inst.shards,
        "group_name": "generation",
        **inst.gpu_args(inst.engine.tensor_parallel_size),
        "code_version": f"prompt={prompt_versions};settings={digest(settings, model)}",
    }


def stage_model(
    inst: BftInstance, direction: str, declared: ModelResource | None, storage: Storage | None
) -> ModelResource:
    """The model a generation stage loads: the declared model of its direction, or the
    trained seed_model checkpoint of that direction (this instance's or another's)."""
    if declared is not None:
        return declared
    source = inst.seed_model_key()
    assert source is not None and storage is not None
    table = "/".join(source.path)
    try:
        return ModelResource(model=str(storage.fetch_checkpoint(table, direction)))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}; or declare models.{direction} to use a model of your own"
        ) from exc


def work_for(
    storage: Storage, context: dg.AssetExecutionContext, asset: str, settings: str
) -> ResumableWork:
    """The scratch folder of this partition for these settings (code version, run config)."""
    key = hashlib.sha256(
        f"{context.assets_def.code_versions_by_key[context.asset_key]};{settings}".encode()
    )
    return ResumableWork(
        storage.scratch_dir(asset, context.partition_key, key.hexdigest()[:16]),
        "row_id",
        context.log.warning,
    )


def generate_column(
    model: LoadedModel,
    texts: list[str],
    sampling: Sampling,
    prefix: str = "",
) -> list[Generation]:
    """Generate for a column of finished user messages (already rendered from the prompts)."""
    return model.generate([Chat(t, assistant_prefix=prefix) for t in texts], sampling)


def generations_frame(
    rows: pl.DataFrame, generations: list[Generation], column: str
) -> pl.DataFrame:
    """row_id plus the generated text, its finish reason and token counts."""
    return pl.DataFrame(
        {
            "row_id": rows["row_id"],
            column: [g.text for g in generations],
            f"{column}_finish": [
                g.finish_reasons[0] if g.finish_reasons else "stop" for g in generations
            ],
            "prompt_tokens": [g.prompt_tokens for g in generations],
            "completion_tokens": [g.completion_tokens for g in generations],
        },
        schema_overrides={
            "prompt_tokens": pl.Int64,
            "completion_tokens": pl.Int64,
            column: pl.String,
            f"{column}_finish": pl.String,
        },
    )


def safe(model: LoadedModel) -> Callable[[str], str]:
    """``neutralize`` with this model's special tokens."""
    special = model.special_tokens()
    return lambda text: neutralize(text or "", special)


def work_metadata(stats: WorkStats, rows_in: int, rows_out: int) -> dict[str, float | int]:
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_generated": stats.rows,
        "rows_reused": stats.reused_rows,
        "tokens_in": stats.prompt_tokens,
        "tokens_out": stats.completion_tokens,
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "wall_seconds": round(stats.seconds, 2),
    }


def length_metadata(frame: pl.DataFrame, column: str) -> dict[str, float]:
    return percentile_metadata(f"{column}_chars", frame[column].cast(pl.String).str.len_chars())

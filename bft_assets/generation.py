"""What the three generation stages share: sampling config, resumable work, metadata."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Literal

import dagster as dg
import polars as pl
from pydantic import Field

from bft_assets.partitions import corpus_shards
from bft_assets.policies import gpu_step, inference_gpus
from bft_assets.prompts import neutralize
from bft_assets.reporting import percentile_metadata
from bft_assets.settings import resolved
from bft_resources.engine import Chat, Generation, LoadedModel, Sampling
from bft_resources.storage import Storage
from bft_resources.work import ResumableWork, WorkStats

# METHOD.md: every generation step samples with nucleus sampling at T=1.0, top_p=0.9.
PAPER_TEMPERATURE = 1.0
PAPER_TOP_P = 0.9


ModelSource = Literal["seed_model", "configured"]
MODEL_SOURCE_HELP = (
    "seed_model: the checkpoint seed_model trained for this stage's direction; "
    "configured: the model resource (BFT_BACKWARD_MODEL / BFT_FORWARD_MODEL)."
)


class SamplingConfig(dg.Config):
    temperature: float = Field(
        default=PAPER_TEMPERATURE, description="Sampling temperature (paper: 1.0)."
    )
    top_p: float = Field(default=PAPER_TOP_P, description="Nucleus sampling mass (paper: 0.9).")
    max_new_tokens: int = Field(default=256, description="Most tokens generated per reply.")
    seed: int = Field(default=0, description="Sampling seed (per batch).")
    batch_rows: int = Field(
        default=32, description="Rows per persisted batch (the unit of resumption)."
    )
    max_rows: int | None = Field(
        default=None, description="Process only the first N rows of the shard (demos, trials)."
    )

    def sampling(self, stop: tuple[str, ...] = ()) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens,
                        seed=self.seed, stop=stop)  # fmt: skip


def generation_stage(prompt_versions: str, sampling: Sampling, model_setting: str) -> dict:
    """Decorator arguments every per-shard generation stage shares: shard partitions, what
    every GPU step declares (``gpu_step``), and a code version made of what changes its
    output (prompt versions, sampling settings, model reference), so changing any marks it
    stale."""
    return {
        "partitions_def": corpus_shards,
        "group_name": "generation",
        "kinds": {"polars", "transformers"},
        **gpu_step(inference_gpus()),
        "code_version": f"prompt={prompt_versions};sampling={sampling.describe()};model={resolved(model_setting)}",
    }


def work_for(
    storage: Storage, context: dg.AssetExecutionContext, asset: str, settings: str
) -> ResumableWork:
    """The scratch folder of this partition for these settings (code version, run config)."""
    key = hashlib.sha256(
        f"{context.assets_def.code_versions_by_key[context.asset_key]};{settings}".encode()
    )
    return ResumableWork(
        storage.scratch_dir(asset, context.partition_key, key.hexdigest()[:16]), "row_id"
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

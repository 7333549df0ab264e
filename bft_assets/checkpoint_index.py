"""The index of a recipe's trained checkpoints: one folder per declared step, never
overwritten, and the run's index table (step, folder, manifest hash, probe loss) that
evaluation and export read."""

import hashlib
from pathlib import Path

import polars as pl

from bft_resources.storage import Storage
from bft_resources.trainer import MANIFEST, TrainingResult

INDEX_SUFFIX = "checkpoints"


def checkpoint_partition(recipe: str, step: int, run_id: str) -> str:
    """Where one step's checkpoint of one run lives: a new run writes new folders, so a
    checkpoint an evaluation refers to is never replaced under it."""
    return f"{recipe}.step{step}.{run_id[:8]}"


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def read_checkpoint_index(storage: Storage, table: str, recipe: str) -> pl.DataFrame:
    """The latest run's checkpoints of a recipe: step, storage partition, manifest hash."""
    if not storage.exists(table, recipe, INDEX_SUFFIX):
        raise FileNotFoundError(f"no checkpoint of {table}[{recipe}]: materialize it first")
    return storage.read(table, recipe, INDEX_SUFFIX).sort("step")


def verified_checkpoints(storage: Storage, table: str, recipe: str) -> dict[int, tuple[Path, str]]:
    """Each step's checkpoint folder (fetched and verified) with its manifest hash, checked
    against the hash its training run recorded."""
    found = {}
    for step, part, sha in (
        read_checkpoint_index(storage, table, recipe)
        .select("step", "partition", "manifest_sha256")
        .iter_rows()
    ):
        folder = storage.fetch_checkpoint(table, part)
        if manifest_sha256(folder) != sha:
            raise RuntimeError(f"{folder}: its manifest is not the one its training run recorded")
        found[step] = (folder, sha)
    return found


def publish_checkpoints(
    storage: Storage, table: str, recipe: str, parts: dict[int, str], result: TrainingResult, run_id: str
) -> tuple[list[dict], dict[int, Path]]:  # fmt: skip
    """Publish each step's checkpoint and record the run's index (what eval_scores reads);
    returns the index and each step's verified local folder."""
    index, local = [], {}
    for step, part in sorted(parts.items()):
        uri = storage.publish_checkpoint(table, part)
        local[step] = storage.fetch_checkpoint(table, part)
        index.append({"step": step, "partition": part, "uri": uri, "run_id": run_id,
                      "manifest_sha256": manifest_sha256(local[step]),
                      "probe_loss": result.probe_losses.get(step, float("nan"))})  # fmt: skip
    storage.write(table, pl.DataFrame(index), partition=recipe, suffix=INDEX_SUFFIX)
    return index, local

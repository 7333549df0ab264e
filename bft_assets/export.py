"""`bft export RECIPE DEST`: a recipe's training set and checkpoint, ready to use elsewhere.

Writes a Hugging Face ``datasets`` folder (``save_to_disk``), chat-format JSONL
(``messages``), Parquet, a dataset card (README.md: source counts, recipe, prompt versions,
models, licence notes), and the fine-tuned checkpoint, which
``vllm serve DEST/model`` and ``from_pretrained`` load as is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl

from bft_assets.checkpoint_index import read_checkpoint_index
from bft_assets.instance import FINETUNED_CHECKPOINT, Instance
from bft_assets.prompts import BACKTRANSLATE, JUDGE, REWRITE, SCORE, SEED_TAG, WEB_TAG
from bft_assets.recipes import chat_jsonl
from bft_resources.storage import Storage
from bft_resources.trainer import MANIFEST

LICENCE_NOTES = """\
- Seed pairs: OpenAssistant oasst1 is released under Apache-2.0 (the demo's seed pairs were
  written for bft).
- Generated responses derive from web documents: Dolma is released under ODC-BY, and each
  document keeps the terms of its source page; rewritten and distilled responses are model
  outputs, subject to the licence of the model that wrote them.
- Check both before redistributing or training a commercial model."""


def dataset_card(recipe: str, training_set: pl.DataFrame, manifest: dict) -> str:
    counts = dict(training_set["source"].value_counts().rows())
    hp = manifest.get("hyperparameters", {})
    return f"""---
license: other
task_categories: [text-generation]
tags: [instruction-tuning, backtranslation, bft]
---
# bft training set: {recipe}

Instruction-tuning data built by instruction back-and-forth translation (Nguyen et al. 2024)
with bft: recipe `{recipe}`.

| source | rows |
|---|---|
| seed (tagged "{SEED_TAG}") | {counts.get("seed", 0)} |
| generated (tagged "{WEB_TAG}") | {counts.get("generated", 0)} |

- Base model: `{manifest.get("base_model", "?")}`; generated size setting: {manifest.get("generated_size")}
- Data hash: `{manifest.get("data_hash", "?")}`
- Prompt versions: {BACKTRANSLATE.version}, {SCORE.version}, {REWRITE.version}, {JUDGE.version}
- Fine-tuning: lr {hp.get("learning_rate")}, {manifest.get("step")} steps, batch {hp.get("batch_size")},
  method {hp.get("method")}; final probe loss {manifest.get("final_loss")}

Files: `data/` (`datasets.load_from_disk`), `train.jsonl` (chat `messages`), `train.parquet`,
`model/` (the fine-tuned checkpoint: `vllm serve model`).

## Licences
{LICENCE_NOTES}
"""


def export_recipe(
    inst: Instance, storage: Storage, recipe: str, destination: Path
) -> dict[str, str]:
    """Write everything under ``destination``; returns what went where."""
    from datasets import Dataset

    inst.recipe(recipe)  # a clear error for a recipe the instance does not declare
    table = inst.table(FINETUNED_CHECKPOINT)
    if not storage.exists(table, recipe, "train"):
        raise FileNotFoundError(
            f"no training set for recipe {recipe!r}: materialize {table}[{recipe}]"
        )
    # The last declared step's checkpoint: eval_scores' metadata names the best one.
    last = read_checkpoint_index(storage, table, recipe).row(-1, named=True)
    checkpoint = storage.fetch_checkpoint(table, last["partition"])
    manifest_path = checkpoint / MANIFEST
    training_set = storage.read(table, recipe, "train")
    manifest = json.loads(manifest_path.read_text())

    destination.mkdir(parents=True, exist_ok=True)
    messages = [json.loads(line) for line in chat_jsonl(training_set).splitlines()]
    Dataset.from_list(messages).save_to_disk(str(destination / "data"))
    (destination / "train.jsonl").write_text(chat_jsonl(training_set), encoding="utf-8")
    training_set.write_parquet(destination / "train.parquet")
    (destination / "README.md").write_text(
        dataset_card(recipe, training_set, manifest), encoding="utf-8"
    )
    model_dir = destination / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(checkpoint, model_dir)
    return {"datasets": str(destination / "data"), "jsonl": str(destination / "train.jsonl"),
            "parquet": str(destination / "train.parquet"), "card": str(destination / "README.md"),
            "model": str(model_dir)}  # fmt: skip

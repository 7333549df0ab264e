"""`bft export`: a recipe's training set and model, in the formats other tools read."""

import json

import polars as pl
import pytest
from instances import declare

from bft_assets.checkpoint_index import checkpoint_partition, publish_checkpoints
from bft_assets.cli import main
from bft_assets.export import export_recipe
from bft_assets.instance import FINETUNED_CHECKPOINT
from bft_assets.prompts import SEED_TAG, WEB_TAG
from bft_resources.engine import Chat, Sampling, TransformersEngine
from bft_resources.storage import LocalStorage
from bft_resources.trainer import Trainer, TrainingExample, TrainingSettings, train

TRAINING_SET = pl.DataFrame({
    "id": ["s1", "g1"], "source": ["seed", "generated"], "instruction": ["Say hi.", "Explain gzip."],
    "prompt": [f"Say hi.\n{SEED_TAG}", f"Explain gzip.\n{WEB_TAG}"],
    "response": ["Hi!", "gzip compresses files with DEFLATE."], "recipe": ["filtering", "filtering"],
})  # fmt: skip


@pytest.fixture
def inst(tmp_path, tiny_tokenizer_model):
    return declare(tmp_path, tiny_tokenizer_model)


def train_recipe(storage, table, model, examples) -> None:
    """Train one step into the layout finetuned_checkpoint writes, index included."""
    part = checkpoint_partition("filtering", 1, "testrun0")
    result = train(str(model), examples, str(storage.checkpoint_dir(table, part)),
                   TrainingSettings(steps=[1], batch_size=2), Trainer(micro_batch_size=2), base_reference="tiny")  # fmt: skip
    publish_checkpoints(storage, table, "filtering", {1: part}, result, "testrun0")


@pytest.fixture
def exported_storage(tmp_path, tiny_tokenizer_model, inst):
    storage = LocalStorage(root=str(tmp_path / "storage"))
    table = inst.table(FINETUNED_CHECKPOINT)
    storage.write(table, TRAINING_SET, partition="filtering", suffix="train")
    examples = [
        TrainingExample(p, r, s)
        for p, r, s in TRAINING_SET.select("prompt", "response", "source").iter_rows()
    ]
    train_recipe(storage, table, tiny_tokenizer_model, examples)
    return storage


def test_export_writes_every_format_and_a_loadable_model(exported_storage, inst, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "export"
    written = export_recipe(inst, exported_storage, "filtering", out)
    dataset = load_from_disk(written["datasets"])
    assert dataset.num_rows == 2 and dataset[1]["messages"][0]["content"].endswith(WEB_TAG)
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [line["source"] for line in lines] == ["seed", "generated"]
    assert pl.read_parquet(out / "train.parquet").equals(TRAINING_SET)
    card = (out / "README.md").read_text()
    assert "recipe `filtering`" in card and "| seed (tagged" in card and "ODC-BY" in card
    with TransformersEngine(dtype="float32").load(written["model"]) as model:
        (reply,) = model.generate([Chat("Say hi.")], Sampling(temperature=0.0, max_tokens=4))
    assert reply.prompt_tokens > 0


def test_export_of_an_untrained_recipe_is_a_clear_error(tmp_path, inst):
    with pytest.raises(FileNotFoundError, match=r"materialize t/finetuned_checkpoint\[rewriting\]"):
        export_recipe(inst, LocalStorage(root=str(tmp_path)), "rewriting", tmp_path / "out")
    with pytest.raises(KeyError, match="no recipe 'nope'"):
        export_recipe(inst, LocalStorage(root=str(tmp_path)), "nope", tmp_path / "out")


def test_the_cli_exports_from_the_declared_demo_instance(
    tmp_path, monkeypatch, capsys, tiny_tokenizer_model
):
    monkeypatch.setenv("BFT_STORAGE", str(tmp_path / "storage"))  # read by the demo's defs.yaml
    demo = declare(tmp_path, tiny_tokenizer_model, prefix="demo")
    storage = LocalStorage(root=str(tmp_path / "storage"))
    storage.write(
        demo.table(FINETUNED_CHECKPOINT), TRAINING_SET, partition="filtering", suffix="train"
    )
    examples = [
        TrainingExample(p, r, s)
        for p, r, s in TRAINING_SET.select("prompt", "response", "source").iter_rows()
    ]
    train_recipe(storage, demo.table(FINETUNED_CHECKPOINT), tiny_tokenizer_model, examples)
    main(["export", "filtering", str(tmp_path / "cli-export"), "--instance", "demo"])
    assert "datasets:" in capsys.readouterr().out
    assert (tmp_path / "cli-export" / "model" / "manifest.json").exists()

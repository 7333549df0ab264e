"""The storage contract, on local disk and on a real S3-compatible server (moto)."""

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from bft_resources.checkpoints import write_manifest
from bft_resources.storage import (
    CHECKPOINT_MANIFEST,
    LocalStorage,
    S3Storage,
    Storage,
    storage_for,
)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> tuple[Storage, callable]:
    """A storage and a function listing what it holds (relative names, sorted)."""
    if request.param == "local":
        root = tmp_path / "root"
        storage = LocalStorage(root=str(root))
        return storage, lambda: sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
        )
    bucket = request.getfixturevalue("s3")
    storage = S3Storage(
        root=bucket.uri("runs/a"), s3=bucket.resource, cache_dir=str(tmp_path / "cache")
    )
    return storage, lambda: [k.removeprefix("runs/a/") for k in bucket.keys("runs/a/")]


def test_layout_is_asset_then_partition(backend):
    storage, listing = backend
    frame = pl.DataFrame({"id": ["a", "b"]})
    assert storage.write("seed_examples", frame) == storage.uri("seed_examples.parquet")
    storage.write("candidate_responses", frame, partition="s0", suffix="rejects")
    assert listing() == ["candidate_responses/s0.rejects.parquet", "seed_examples.parquet"]
    assert storage.read("seed_examples").equals(frame)


def test_streamed_batches_become_one_table(backend):
    storage, _ = backend
    with storage.table_writer("t", "p") as writer:
        for i in range(3):
            writer.write(pl.DataFrame({"n": [i, i], "text": [f"t{i}", "x"]}))
    assert storage.read("t", "p")["n"].to_list() == [0, 0, 1, 1, 2, 2]
    assert storage.scan("t", "p").select("n").collect()["n"].sum() == 6


def test_a_failed_write_leaves_the_old_table_and_no_debris(backend):
    storage, listing = backend
    storage.write("t", pl.DataFrame({"n": [1]}), partition="p")
    with pytest.raises(RuntimeError), storage.table_writer("t", "p") as writer:
        writer.write(pl.DataFrame({"n": [2, 3]}))
        raise RuntimeError("crash mid-write")
    assert storage.read("t", "p")["n"].to_list() == [1]
    assert listing() == ["t/p.parquet"]


def test_a_rewritten_table_reads_back_new(backend):
    storage, _ = backend
    storage.write("t", pl.DataFrame({"n": [1]}))
    assert storage.read("t")["n"].to_list() == [1]  # now cached locally (S3)
    storage.write("t", pl.DataFrame({"n": [2, 2]}))
    assert storage.read("t")["n"].to_list() == [2, 2]


def test_an_empty_table_keeps_its_schema(backend):
    storage, _ = backend
    schema = pa.schema([("id", pa.string()), ("n", pa.int64())])
    with storage.table_writer("t", "p", schema=schema):
        pass
    empty = storage.read("t", "p")
    assert empty.height == 0 and empty.schema == {"id": pl.String, "n": pl.Int64}


def test_reading_a_missing_table_says_what_to_materialize(backend):
    storage, _ = backend
    assert not storage.exists("candidate_responses", "s9")
    with pytest.raises(FileNotFoundError, match="materialize candidate_responses"):
        storage.read("candidate_responses", "s9")


def test_text_files_sit_beside_the_tables(backend):
    storage, listing = backend
    uri = storage.write_text("finetuned_checkpoint/r.train.jsonl", '{"a": 1}\n')
    assert uri == storage.uri("finetuned_checkpoint/r.train.jsonl")
    assert listing() == ["finetuned_checkpoint/r.train.jsonl"]


def _train_into(folder: Path, version: str, files: dict[str, str]) -> None:
    """Stands in for the trainer: a folder of files with the manifest inside."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    write_manifest(folder, {"version": version})


def test_checkpoints_publish_whole_and_fetch_back(backend):
    storage, listing = backend
    with pytest.raises(FileNotFoundError, match=r"materialize seed_model\[backward\] first"):
        storage.fetch_checkpoint("seed_model", "backward")
    _train_into(storage.checkpoint_dir("seed_model", "backward"), "v1",
                {"model-1.safetensors": "w1", "model-2.safetensors": "w2"})  # fmt: skip
    storage.publish_checkpoint("seed_model", "backward")
    assert json.loads((storage.fetch_checkpoint("seed_model", "backward") / CHECKPOINT_MANIFEST)
                      .read_text())["version"] == "v1"  # fmt: skip

    # A retrained checkpoint with fewer files replaces the old one entirely.
    staged = storage.checkpoint_dir("seed_model", "backward")
    shutil.rmtree(staged, ignore_errors=True)  # the trainer replaces the folder, as here
    _train_into(staged, "v2", {"model-1.safetensors": "w1b"})
    storage.publish_checkpoint("seed_model", "backward")
    fetched = storage.fetch_checkpoint("seed_model", "backward")
    assert sorted(p.name for p in fetched.iterdir() if not p.name.startswith(".")) == [
        CHECKPOINT_MANIFEST,
        "model-1.safetensors",
    ]
    assert (fetched / "model-1.safetensors").read_text() == "w1b"
    assert [n for n in listing() if n.startswith("seed_model/")] == [
        "seed_model/backward/manifest.json",
        "seed_model/backward/model-1.safetensors",
    ]


def test_a_second_machine_downloads_the_checkpoint_once(s3, tmp_path):
    writer = S3Storage(root=s3.uri("p"), s3=s3.resource, cache_dir=str(tmp_path / "a"))
    _train_into(writer.checkpoint_dir("finetuned_checkpoint", "filtering"), "v1", {"w": "1"})
    writer.publish_checkpoint("finetuned_checkpoint", "filtering")

    reader = S3Storage(root=s3.uri("p"), s3=s3.resource, cache_dir=str(tmp_path / "b"))
    first = reader.fetch_checkpoint("finetuned_checkpoint", "filtering")
    assert (first / "w").read_text() == "1" and first.is_relative_to(tmp_path / "b")
    stamp = (first / "w").stat().st_mtime_ns  # a second fetch must not download again
    again = reader.fetch_checkpoint("finetuned_checkpoint", "filtering")
    assert again == first and (again / "w").stat().st_mtime_ns == stamp

    _train_into(writer.checkpoint_dir("finetuned_checkpoint", "filtering"), "v2", {"w": "2"})
    writer.publish_checkpoint("finetuned_checkpoint", "filtering")
    assert (reader.fetch_checkpoint("finetuned_checkpoint", "filtering") / "w").read_text() == "2"


def test_a_checkpoint_without_its_manifest_is_not_there(s3, tmp_path):
    """An upload cut off before the manifest (the last object) is never read as a model."""
    storage = S3Storage(root=s3.uri("p"), s3=s3.resource, cache_dir=str(tmp_path / "c"))
    s3.resource.get_client().put_object(
        Bucket=s3.name, Key="p/seed_model/forward/model.safetensors", Body=b"half"
    )
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        storage.fetch_checkpoint("seed_model", "forward")


def test_the_root_picks_the_backend(tmp_path):
    assert isinstance(storage_for(str(tmp_path), None), LocalStorage)
    assert isinstance(storage_for("s3://b/p", None), S3Storage)
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage_for("gs://b/p", None)

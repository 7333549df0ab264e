"""The whole graph on S3: storage, corpus and model references on a real S3-compatible
server (moto), with resources built by the definitions from the environment, as a
deployment would build them."""

import json

import dagster as dg
import pytest
from instances import declare, node

from bft_assets.corpus import discover_shards
from bft_assets.demo import write_demo_corpus
from bft_assets.graph import build_instance_defs
from bft_resources.corpus import CorpusSource
from bft_resources.models import ModelRef, model_cache_dir
from bft_resources.storage import S3Storage

FAST_TRAINING = {"learning_rate": 3e-3, "steps": [2], "batch_size": 4, "dropout": 0.0}
GENERATION = {
    "backtranslation": {"max_new_tokens": 8},
    "scoring": {"mode": "logprobs"},
    "rewriting": {"max_new_tokens": 8},
}
EVAL = {"reference": "base_model", "max_new_tokens": 8, "mauve_texts": 3, "min_agreement": 0.0,
        "tags": ["assistant"]}  # fmt: skip


def _upload_folder(s3, folder, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return s3.uri(prefix)


def test_a_model_reference_on_s3_downloads_once_per_version(
    s3, tiny_tokenizer_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("BFT_MODEL_CACHE", str(tmp_path / "models"))
    uri = _upload_folder(s3, tiny_tokenizer_model, "models/tiny")
    model = ModelRef(model=uri).with_s3(s3.resource)
    first = model.local_path()
    assert first.is_relative_to(model_cache_dir())
    assert (first / "config.json").read_bytes() == (
        tiny_tokenizer_model / "config.json"
    ).read_bytes()
    assert model.tokenizer().encode("hello")  # a real tokenizer loads from the copy
    stamp = (first / "config.json").stat().st_mtime_ns
    assert model.local_path() == first and (first / "config.json").stat().st_mtime_ns == stamp

    config = json.loads((tiny_tokenizer_model / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "bft_note": "v2"}))
    s3.upload(tmp_path / "config.json", "models/tiny/config.json")
    second = model.local_path()
    assert second != first and "bft_note" in (second / "config.json").read_text()


@pytest.mark.slow
def test_the_whole_graph_runs_on_s3(s3, tiny_tokenizer_model, tmp_path, monkeypatch):
    write_demo_corpus(tmp_path / "corpus", shards=2, docs_per_shard=4)
    model_uri = _upload_folder(s3, tiny_tokenizer_model, "models/tiny")
    monkeypatch.setenv("BFT_MODEL_CACHE", str(tmp_path / "models"))
    corpus_uri = _upload_folder(s3, tmp_path / "corpus", "dolma")
    # Declared as a user would: every location on S3; credentials from boto3's chain.
    inst = declare(
        tmp_path, model_uri, storage=s3.uri("bft"), corpus={"uri": corpus_uri},
        s3={"endpoint_url": s3.resource.endpoint_url, "region_name": "us-east-1"},
        generation=GENERATION, training=FAST_TRAINING, eval=EVAL,
        recipes=[{"name": "filtering", "responses": "web", "min_score": 1, "generated_size": "all"}],
    )  # fmt: skip
    defs = build_instance_defs(inst)
    assert isinstance(inst.storage, S3Storage)  # the declared storage is the resource
    by_name = {a.key.path[-1]: a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}

    def run(selection: list[str], partition: str | None = None):
        job = dg.materialize(
            [by_name[name] for name in selection], instance=instance, partition_key=partition
        )
        assert job.success, selection
        return job

    with dg.instance_for_test() as instance:
        run(["seed_examples"])
        for direction in ("backward", "forward"):
            run(["seed_model"], direction)
        corpus = CorpusSource(uri=corpus_uri, s3=s3.resource)
        shards = discover_shards(corpus, instance, inst.shards.name)
        assert shards == ["stdlib-docs-0000", "stdlib-docs-0001"]
        stages = ["candidate_responses", "backtranslated_pool", "scored_pool", "rewritten_dataset"]
        for shard in shards:
            run(stages, shard)
        tuned = run(["finetuned_checkpoint"], "filtering")
        run(["eval_scores"], "filtering")
        logs = "\n".join(
            str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id)
        )

    keys = s3.keys("bft/t/")
    for shard in shards:
        for asset in stages:
            assert f"bft/t/{asset}/{shard}.parquet" in keys
        assert f"bft/t/candidate_responses/{shard}.rejects.parquet" in keys
    (tuned_folder,) = [k.split("/")[3] for k in keys if k.startswith("bft/t/finetuned_checkpoint/filtering.step2.")
                       and k.endswith("/manifest.json")]  # fmt: skip
    for checkpoint in (
        "seed_model/backward",
        "seed_model/forward",
        f"finetuned_checkpoint/{tuned_folder}",
    ):
        assert f"bft/t/{checkpoint}/manifest.json" in keys
        assert f"bft/t/{checkpoint}/model.safetensors" in keys
    assert {"bft/t/seed_examples.parquet", "bft/t/eval_scores/filtering.parquet",
            "bft/t/finetuned_checkpoint/filtering.train.jsonl"} <= set(keys)  # fmt: skip
    meta = tuned.asset_materializations_for_node(node(inst, "finetuned_checkpoint"))[0].metadata
    assert meta["checkpoint"].value == s3.uri(f"bft/t/finetuned_checkpoint/{tuned_folder}")
    assert "bft/t/finetuned_checkpoint/filtering.checkpoints.parquet" in keys
    assert meta["training_set"].value == s3.uri(
        "bft/t/finetuned_checkpoint/filtering.train.parquet"
    )

    # Every document read from S3 is accounted for in the tables on S3.
    storage = S3Storage(root=s3.uri("bft"), s3=s3.resource, cache_dir=str(tmp_path / "r"))
    for shard in shards:
        kept = storage.read("t/candidate_responses", shard).height
        dropped = storage.read("t/candidate_responses", shard, "rejects").height
        assert kept + dropped == 4
        assert storage.read("t/rewritten_dataset", shard).height == kept
    assert storage.read("t/eval_scores", "filtering").height > 0
    assert "bft-test-secret-never-logged" not in logs

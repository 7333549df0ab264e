"""The whole graph on S3: storage, corpus and model references on a real S3-compatible
server (moto), with resources built by the definitions from the environment, as a
deployment would build them."""

import json

import dagster as dg
import pytest

from bft_assets.corpus import discover_shards
from bft_assets.definitions import build_resources, defs
from bft_assets.demo import write_demo_corpus
from bft_resources.corpus import CorpusSource
from bft_resources.models import ModelResource, model_cache_dir
from bft_resources.storage import S3Storage

FAST_TRAINING = {"learning_rate": 3e-3, "max_steps": 2, "batch_size": 4, "dropout": 0.0}
SHARD_CONFIG = {
    "backtranslated_pool": {"config": {"max_new_tokens": 8}},
    "scored_pool": {"config": {"mode": "logprobs", "threshold": 1}},
    "rewritten_dataset": {"config": {"max_new_tokens": 8, "rewrite": "all"}},
}
EVAL_CONFIG = {
    "reference": "base_model",
    "max_new_tokens": 8,
    "mauve_texts": 3,
    "min_agreement": 0.0,
    "tags": ["assistant"],
}


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
    model = ModelResource(model=uri, s3=s3.resource)
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
    env = {
        "BFT_STORAGE": s3.uri("bft"),
        "BFT_CORPUS_URI": _upload_folder(s3, tmp_path / "corpus", "dolma"),
        "BFT_BASE_MODEL": model_uri,
        "BFT_REWRITER_MODEL": model_uri,
        "BFT_JUDGE_MODEL": model_uri,
        "BFT_MODEL_CACHE": str(tmp_path / "models"),
    }
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    resources = build_resources()
    assert isinstance(resources["storage"], S3Storage)
    resources["storage"] = S3Storage(  # the same bucket and prefix, a private local cache
        root=dg.EnvVar("BFT_STORAGE"), s3=resources["storage"].s3, cache_dir=str(tmp_path / "c")
    )
    by_name = {a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}

    def run(selection: list[str], partition: str | None = None, config: dict | None = None):
        job = dg.materialize(
            [by_name[name] for name in selection],
            instance=instance, resources=resources, partition_key=partition,
            run_config={"ops": config or {}}, selection=selection,
        )  # fmt: skip
        assert job.success, selection
        return job

    with dg.instance_for_test() as instance:
        run(["seed_examples"])
        for direction in ("backward", "forward"):
            run(["seed_model"], direction, {"seed_model": {"config": FAST_TRAINING}})
        corpus = CorpusSource(uri=env["BFT_CORPUS_URI"], s3=s3.resource)
        shards = discover_shards(corpus, instance)
        assert shards == ["stdlib-docs-0000", "stdlib-docs-0001"]
        stages = ["candidate_responses", "backtranslated_pool", "scored_pool", "rewritten_dataset"]
        for shard in shards:
            run(stages, shard, SHARD_CONFIG)
        tuned = run(["finetuned_checkpoint"], "filtering",
                    {"finetuned_checkpoint": {"config": FAST_TRAINING}})  # fmt: skip
        run(["eval_scores"], "filtering", {"eval_scores": {"config": EVAL_CONFIG}})
        logs = "\n".join(
            str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id)
        )

    keys = s3.keys("bft/")
    for shard in shards:
        for asset in stages:
            assert f"bft/{asset}/{shard}.parquet" in keys
        assert f"bft/candidate_responses/{shard}.rejects.parquet" in keys
    for checkpoint in (
        "seed_model/backward",
        "seed_model/forward",
        "finetuned_checkpoint/filtering",
    ):
        assert f"bft/{checkpoint}/manifest.json" in keys
        assert f"bft/{checkpoint}/model.safetensors" in keys
    assert {"bft/seed_examples.parquet", "bft/eval_scores/filtering.parquet",
            "bft/finetuned_checkpoint/filtering.train.jsonl"} <= set(keys)  # fmt: skip
    meta = tuned.asset_materializations_for_node("finetuned_checkpoint")[0].metadata
    assert meta["checkpoint"].value == s3.uri("bft/finetuned_checkpoint/filtering")
    assert meta["training_set"].value == s3.uri("bft/finetuned_checkpoint/filtering.train.parquet")

    # Every document read from S3 is accounted for in the tables on S3.
    storage = S3Storage(root=env["BFT_STORAGE"], s3=s3.resource, cache_dir=str(tmp_path / "r"))
    for shard in shards:
        kept = storage.read("candidate_responses", shard).height
        dropped = storage.read("candidate_responses", shard, "rejects").height
        assert kept + dropped == 4
        assert storage.read("rewritten_dataset", shard).height == kept
    assert storage.read("eval_scores", "filtering").height > 0
    assert "bft-test-secret-never-logged" not in logs

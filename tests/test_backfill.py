"""A backfill of several shards as the UI launches one: `dagster dev` (webserver and daemon)
on the demo's dagster.yaml (queued runs, gpu pool limit 1 held per run), the backfill sent
over GraphQL, the runs launched by the daemon as separate processes."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize

from bft_assets.demo import write_demo_corpus
from bft_assets.instance import SEED_EXAMPLES, SEED_MODEL

from conftest import REPO
from servers import LAUNCH_BACKFILL, dagster_dev, graphql

pytestmark = pytest.mark.slow

SHARDS = ["stdlib-docs-0000", "stdlib-docs-0001", "stdlib-docs-0002"]
GPU_STEP = "backtranslated_pool"
GPU_STEP_KEY = "demo__backtranslated_pool"
RANGE = "dagster/asset_partition_range"

STATUS = """
query Status($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill { status }
  }
}"""


METADATA = """
query Metadata($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset { assetMaterializations(limit: 1) { metadataEntries {
      __typename label
      ... on MarkdownMetadataEntry { mdStr }
      ... on FloatMetadataEntry { floatValue }
      ... on IntMetadataEntry { intValue }
    } } }
  }
}"""


def _read_back_metadata(url: str, key: list[str]) -> dict[str, dict]:
    """The latest materialization's metadata as the UI receives it, by label."""
    asset = graphql(url, METADATA, {"key": {"path": key}})["assetOrError"]
    (latest,) = asset["assetMaterializations"]
    return {entry["label"]: entry for entry in latest["metadataEntries"]}


def _train_backward_model(home: Path, model: Path) -> None:
    """backtranslated_pool reads seed_model[backward]: train it first (a few steps), into the
    demo instance's storage."""
    inst = declare(home, model, prefix="demo", training={"steps": [2], "batch_size": 4},
                   engine={"dtype": "float32"})  # fmt: skip
    with dg.instance_for_test() as instance:
        assert materialize(inst, [SEED_EXAMPLES], instance).success
        assert materialize(inst, [SEED_MODEL], instance, partition_key="backward").success


def _run_spans(instance, run_ids) -> list[tuple[float, float]]:
    records = [instance.get_run_record_by_id(run_id) for run_id in run_ids]
    return [(r.start_time, r.end_time) for r in records]


def _step_spans(instance, run_ids, step: str) -> list[tuple[float, float]]:
    """(start, end) of one step in each run, from the event log."""
    spans = []
    for run_id in run_ids:
        times = {}
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None or event.step_key != step:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                times["start"] = entry.timestamp
            if event.event_type in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            ):
                times["end"] = entry.timestamp
        spans.append((times["start"], times["end"]))
    return spans


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, delta in edges:
        now += delta
        most = max(most, now)
    return most


def test_a_backfill_runs_shards_in_parallel_within_the_limits(tmp_path, tiny_tokenizer_model):
    home = tmp_path
    (home / "dagster_home").mkdir()
    shutil.copy(
        REPO / "bft_assets" / "data" / "dagster.yaml", home / "dagster_home" / "dagster.yaml"
    )
    write_demo_corpus(home / "corpus", shards=len(SHARDS), docs_per_shard=4)
    _train_backward_model(home, tiny_tokenizer_model)
    env = {**os.environ, "DAGSTER_HOME": str(home / "dagster_home"), "BFT_STORAGE": str(home / "storage"),
           "BFT_CORPUS_URI": str(home / "corpus"), "BFT_BASE_MODEL": str(tiny_tokenizer_model)}  # fmt: skip
    bft = Path(sys.executable).with_name("bft")
    added = subprocess.run(
        [str(bft), "discover-shards"], env=env, check=True, capture_output=True, text=True
    )
    assert "added 3 shard partitions" in added.stdout

    with dagster_dev(REPO / "workspace.yaml", env, home / "dagster-dev.log") as url:
        launched = graphql(url, LAUNCH_BACKFILL, {"params": {
            "partitionNames": SHARDS,
            "assetSelection": [{"path": ["demo", "candidate_responses"]}, {"path": ["demo", GPU_STEP]}],
        }})["launchPartitionBackfill"]  # fmt: skip
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill = launched["backfillId"]
        deadline, status = time.monotonic() + 420, None
        while time.monotonic() < deadline:
            status = graphql(url, STATUS, {"id": backfill})["partitionBackfillOrError"]["status"]
            if status not in ("REQUESTED", "CANCELING", "FAILING"):
                break
            time.sleep(2)
        assert status == "COMPLETED_SUCCESS", (
            status,
            (home / "dagster-dev.log").read_text()[-3000:],
        )
        # what a person reads at a glance reaches the UI as tables (Markdown the UI renders)
        # and numbers it plots, zero counts left out
        meta = _read_back_metadata(url, ["demo", "candidate_responses"])
        for label in ("n_tokens", "budget"):
            assert meta[label]["__typename"] == "MarkdownMetadataEntry", meta[label]
        assert meta["n_tokens"]["mdStr"].splitlines()[0] == "| p5 | p50 | p95 | max |"
        assert meta["budget"]["mdStr"].startswith("| prompt | overhead_tokens | longest_document |")
        assert meta["n_tokens_p50"]["__typename"] == "FloatMetadataEntry"
        assert "| 0 |" not in meta["drops"]["mdStr"] and not any(
            k.startswith("dropped_") for k in meta
        )

    with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill}))
        # The backfill policy: one run per shard, so a failure costs one shard.
        ranges = [(r.tags[f"{RANGE}_start"], r.tags[f"{RANGE}_end"]) for r in runs]
        assert sorted(ranges) == [(shard, shard) for shard in SHARDS]
        run_ids = [r.run_id for r in runs]
        at_once = _most_at_once(_run_spans(instance, run_ids))
        gpu_at_once = _most_at_once(_step_spans(instance, run_ids, GPU_STEP_KEY))
        records = [instance.get_run_record_by_id(i) for i in run_ids]
        waited = [r for r in records if r.start_time - r.create_timestamp.timestamp() > 2]
    # The gpu pool (limit 1) holds each run in the queue until the run before it ends: never
    # two runs with a GPU step at once, and none of them started to spin on a busy slot.
    assert at_once == 1 and gpu_at_once == 1, (at_once, gpu_at_once)
    assert waited  # runs did wait in the queue

    for shard in SHARDS:  # each shard's output is its own, whole
        candidates = pl.read_parquet(
            home / "storage" / "demo" / "candidate_responses" / f"{shard}.parquet"
        )
        pool = pl.read_parquet(home / "storage" / "demo" / GPU_STEP / f"{shard}.parquet")
        assert candidates.height > 0 and pool["doc_id"].to_list() == candidates["id"].to_list()
        assert (candidates["shard"] == shard).all()

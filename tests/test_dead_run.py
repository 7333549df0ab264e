"""A generation run killed with SIGKILL mid-way, under the shipped dagster.yaml and a real
`dagster dev` (webserver and daemon): the run is marked failed by run monitoring, nothing is
freed by hand, and the next run of that partition starts and resumes from the finished
batches."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from instances import attributes, declare, materialize

from bft_assets.corpus import discover_shards
from bft_assets.demo import write_demo_corpus
from bft_assets.instance import BACKTRANSLATED_POOL, CANDIDATE_RESPONSES
from bft_resources.corpus import CorpusSource

from conftest import REPO
from servers import LAUNCH_BACKFILL, dagster_dev, graphql

pytestmark = pytest.mark.slow


SLOW_GENERATION = {"backtranslation": {"max_new_tokens": 96, "batch_rows": 1}}


def _wait(what: str, seconds: float, ready) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if ready():
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {seconds} s")


def test_a_killed_run_releases_its_partition_and_the_next_run_resumes(
    tmp_path, tiny_tokenizer_model
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(
        REPO / "bft_assets" / "data" / "dagster.yaml", home / "dagster.yaml"
    )  # the shipped instance config
    write_demo_corpus(tmp_path / "corpus", shards=1, docs_per_shard=12)
    model = str(tiny_tokenizer_model)
    overrides = {"models": {"backward": model}, "generation": SLOW_GENERATION}
    inst = declare(tmp_path, model, prefix="k", **overrides)
    (tmp_path / "defs.py").write_text(textwrap.dedent(f"""\
        from bft_assets.component import BackAndForthTranslation
        from bft_assets.graph import build_instance_defs

        defs = build_instance_defs(BackAndForthTranslation.resolve_from_dict(
            {attributes(tmp_path, model, prefix="k", **overrides)!r}).instance())
        """))  # fmt: skip
    (tmp_path / "workspace.yaml").write_text("load_from:\n  - python_file: defs.py\n")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (shard,) = discover_shards(
            CorpusSource(uri=str(tmp_path / "corpus")), instance, inst.shards.name
        )
        assert materialize(inst, [CANDIDATE_RESPONSES], instance, partition_key=shard).success
        earlier = {r.run_id for r in instance.get_runs()}

    scratch = tmp_path / "storage" / ".work" / "k" / BACKTRANSLATED_POOL / shard
    with dagster_dev(tmp_path / "workspace.yaml", env, tmp_path / "dagster-dev.log") as url:
        # Run 1: materialized from a terminal, as `bft demo` and `dagster asset materialize` do.
        cli = Path(sys.executable).with_name("dagster")
        first = subprocess.Popen(
            [str(cli), "asset", "materialize", "-f", "defs.py", "--select", f"k/{BACKTRANSLATED_POOL}",
             "--partition", shard], cwd=tmp_path, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait("two finished batches", 180, lambda: len(list(scratch.rglob("part-*.parquet"))) >= 2)
        os.killpg(first.pid, signal.SIGKILL)  # a real process, a real signal, mid-shard
        first.wait(timeout=30)
        killed_at = time.monotonic()
        done_before = len(list(scratch.rglob("part-*.parquet")))

        with dg.DagsterInstance.from_config(str(home)) as instance:
            (run,) = [r for r in instance.get_runs() if r.run_id not in earlier]
            assert run.status == dg.DagsterRunStatus.STARTED  # nobody reported its death

            def failed() -> bool:
                return instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE

            noticed = _wait("run monitoring to fail the dead run", 60, failed)
            failure = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            why = " ".join(e.message for e in failure)

            # Run 2: launched from the UI's backfill dialog; nothing freed by hand.
            launched = graphql(url, LAUNCH_BACKFILL, {"params": {
                "partitionNames": [shard], "assetSelection": [{"path": ["k", BACKTRANSLATED_POOL]}]}})  # fmt: skip
            assert launched["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", (
                launched
            )

            def second_run():
                runs = [r for r in instance.get_runs() if r.run_id not in earlier | {run.run_id}]
                return runs[0] if runs and runs[0].status in (
                    dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS) else None  # fmt: skip

            _wait("the next run to start", 90, second_run)
            started_after = time.monotonic() - killed_at
            _wait(
                "the next run to succeed",
                240,
                lambda: second_run().status == dg.DagsterRunStatus.SUCCESS,
            )
            event = instance.get_latest_materialization_event(inst.key(BACKTRANSLATED_POOL))
            metadata = event.asset_materialization.metadata

    assert noticed < 60 and started_after < 120, (noticed, started_after)
    assert metadata["rows_reused"].value >= done_before >= 2  # resumed from the finished batches
    candidates = pl.read_parquet(
        tmp_path / "storage" / "k" / CANDIDATE_RESPONSES / f"{shard}.parquet"
    )
    pool = pl.read_parquet(tmp_path / "storage" / "k" / BACKTRANSLATED_POOL / f"{shard}.parquet")
    assert pool["doc_id"].to_list() == candidates["id"].to_list()
    assert "run worker process" in why and "is gone" in why, why  # bft's health check saw it

"""The endpoint backend against a real `transformers serve` on 127.0.0.1, with faults
injected by a proxy in front of it."""

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize, node, swapped

from bft_assets.corpus import discover_shards
from bft_assets.demo import write_demo_corpus
from bft_assets.instance import BACKTRANSLATED_POOL, CANDIDATE_RESPONSES
from bft_resources.corpus import CorpusSource
from bft_resources.engine import Chat, EndpointEngine, LogprobsUnavailable, Sampling
from bft_resources.engine.endpoint import EndpointError

from servers import FaultInjectingProxy, transformers_serve

pytestmark = pytest.mark.slow
SHORT = Sampling(temperature=0.7, top_p=0.9, max_tokens=8, seed=1)


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    with transformers_serve(smollm2.local_path(), tmp_path_factory.mktemp("serve") / "log") as url:
        yield url


@pytest.fixture
def proxy(server):
    injector = FaultInjectingProxy(server, hang_s=2.0)
    yield injector
    injector.close()


def _engine(url: str, smollm2, **overrides) -> EndpointEngine:
    settings = dict(base_url=url, served_model=str(smollm2.local_path()),
                    max_concurrency=2, max_retries=4, timeout_s=1.0, retry_backoff_s=0.01)  # fmt: skip
    return EndpointEngine(**(settings | overrides))


def test_generates_through_a_real_openai_compatible_server(server, smollm2):
    with _engine(server, smollm2, timeout_s=60).load("ignored") as model:
        replies = model.generate([Chat("Say hello."), Chat("Name a colour.")], SHORT)
    assert all(r.text.strip() for r in replies)
    assert all(r.prompt_tokens > 0 and 0 < r.completion_tokens <= 8 for r in replies)


def test_a_server_without_logprobs_says_so(server, smollm2):
    with (
        _engine(server, smollm2, timeout_s=60).load("ignored") as model,
        pytest.raises(LogprobsUnavailable, match="returned no logprobs"),
    ):
        model.option_logprobs([Chat("Score: ")], ["1", "2"])


def test_retries_429_500_timeout_and_dropped_connection(proxy, smollm2):
    proxy.script = ["429", "500", "timeout", "drop"]
    with _engine(proxy.url, smollm2, max_concurrency=1, timeout_s=1.5).load("ignored") as model:
        (reply,) = model.generate([Chat("Say hello.")], SHORT)
        assert model.client.retries == 4
    assert reply.text.strip()
    assert proxy.seen == ["429", "500", "timeout", "drop", "forward"]


def test_a_server_that_stays_down_fails_clearly(proxy, smollm2):
    proxy.always = "503"
    with (
        _engine(proxy.url, smollm2, max_retries=2).load("ignored") as model,
        pytest.raises(EndpointError, match=r"failed after 3 attempts; last error: HTTP 503"),
    ):
        model.generate([Chat("Say hello.")], SHORT)
    assert proxy.seen == ["503"] * 3


def test_an_outage_mid_shard_keeps_finished_batches(proxy, smollm2, tmp_path):
    """The stage fails clearly when the endpoint stays down; the batches that finished
    before the outage are reused when it comes back."""
    write_demo_corpus(tmp_path / "corpus", shards=1, docs_per_shard=4)
    inst = declare(tmp_path, smollm2.model, models={"backward": smollm2.model},
                   generation={"backtranslation": {"batch_rows": 2, "max_new_tokens": 8}})  # fmt: skip
    engine = _engine(proxy.url, smollm2, max_retries=1, timeout_s=60)
    with dg.instance_for_test() as instance:
        (shard,) = discover_shards(
            CorpusSource(uri=str(tmp_path / "corpus")), instance, inst.shards.name
        )
        materialize(inst, [CANDIDATE_RESPONSES], instance, partition_key=shard)
        proxy.script, proxy.always = (
            ["forward", "forward"],
            "503",
        )  # batch 1 answers, then an outage
        failed = materialize(swapped(inst, engine=engine), [BACKTRANSLATED_POOL], instance,
                             partition_key=shard, raise_on_error=False)  # fmt: skip
        assert not failed.success
        error = failed.get_step_failure_events()[0].step_failure_data.error
        assert "HTTP 503" in str(error.cause or error)
        proxy.always = None  # the server is back
        resumed = materialize(
            swapped(inst, engine=engine), [BACKTRANSLATED_POOL], instance, partition_key=shard
        )
    meta = resumed.asset_materializations_for_node(node(inst, BACKTRANSLATED_POOL))[0].metadata
    assert meta["rows_reused"].value == 2
    pool = pl.read_parquet(tmp_path / "storage" / "t" / BACKTRANSLATED_POOL / f"{shard}.parquet")
    assert pool.height == meta["rows"].value and pool["raw_instruction"].null_count() == 0

"""Generation resumes after a crash: finished batches are reused, nothing is lost or redone."""

import contextlib

import dagster as dg
import polars as pl
from instances import declare, materialize, node, swapped

from bft_assets.corpus import discover_shards
from bft_assets.demo import write_demo_corpus
from bft_assets.instance import BACKTRANSLATED_POOL, CANDIDATE_RESPONSES, CORPUS_DOCUMENTS
from bft_resources.corpus import CorpusSource
from bft_resources.engine import Engine, TransformersEngine

CALLS: list[list[str]] = []


def fault_injecting(engine: type[Engine]) -> type[Engine]:
    """``engine`` made a fault injector: a real engine whose model raises after
    ``fail_after`` generate calls (a crash mid-shard cannot be provoked on a healthy model
    otherwise). It records what each call was asked to generate. One per backend: the vLLM
    environment crashes a vLLM engine with it (tests/test_vllm_assets.py)."""

    class FaultInjecting(engine):
        fail_after: int = -1

        @contextlib.contextmanager
        def load(self, model, fallback=None, log=print):
            with super().load(model, fallback, log) as loaded:
                real_generate = loaded.generate

                def generate(chats, sampling):
                    if len(CALLS) == self.fail_after:
                        raise RuntimeError("injected crash")
                    CALLS.append([c.user for c in chats])
                    return real_generate(chats, sampling)

                loaded.generate = generate
                yield loaded

    FaultInjecting.__name__ = FaultInjecting.__qualname__ = f"FaultInjecting{engine.__name__}"
    return FaultInjecting


FaultInjectingEngine = fault_injecting(TransformersEngine)


def test_a_crash_loses_only_the_batch_in_flight(tmp_path, tiny_tokenizer_model):
    write_demo_corpus(tmp_path / "corpus", shards=1, docs_per_shard=10)
    model = str(tiny_tokenizer_model)
    inst = declare(tmp_path, model, models={"backward": model},
                   generation={"backtranslation": {"batch_rows": 3, "max_new_tokens": 6}})  # fmt: skip
    storage = tmp_path / "storage" / "t"
    with dg.instance_for_test() as instance:
        (shard,) = discover_shards(
            CorpusSource(uri=str(tmp_path / "corpus")), instance, inst.shards.name
        )
        CALLS.clear()
        crashed = materialize(swapped(inst, engine=FaultInjectingEngine(fail_after=2)),
                              [CORPUS_DOCUMENTS, CANDIDATE_RESPONSES, BACKTRANSLATED_POOL], instance,
                              partition_key=shard, raise_on_error=False)  # fmt: skip
        assert not crashed.success
        done_before = [p for call in CALLS for p in call]
        assert len(CALLS) == 2 and len(done_before) == 6
        assert not (storage / BACKTRANSLATED_POOL / f"{shard}.parquet").exists()

        CALLS.clear()
        resumed = materialize(swapped(inst, engine=FaultInjectingEngine()), [BACKTRANSLATED_POOL], instance,
                              partition_key=shard)  # fmt: skip
    assert resumed.success
    redone = [p for call in CALLS for p in call]
    assert not set(redone) & set(done_before), "a finished batch was generated again"
    meta = resumed.asset_materializations_for_node(node(inst, BACKTRANSLATED_POOL))[0].metadata
    candidates = pl.read_parquet(storage / CANDIDATE_RESPONSES / f"{shard}.parquet")
    pool = pl.read_parquet(storage / BACKTRANSLATED_POOL / f"{shard}.parquet")
    assert (meta["rows_reused"].value, meta["rows_generated"].value) == (6, candidates.height - 6)
    assert pool["doc_id"].to_list() == candidates["id"].to_list()  # every row, in order, once
    assert pool["raw_instruction"].null_count() == 0
    assert not list((tmp_path / "storage" / ".work").rglob("part-*"))

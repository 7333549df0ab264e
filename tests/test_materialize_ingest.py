"""Materialize seed_examples and candidate_responses for real, into a temporary instance."""

import gzip
import json
import shutil

import dagster as dg
import polars as pl
import pytest
from instances import declare, materialize, node, table_counts

from bft_assets import filters as c
from bft_assets.corpus import discover_shards
from bft_assets.graph import OBSERVE_CORPUS_JOB, build_instance_defs
from bft_assets.instance import CANDIDATE_RESPONSES, CORPUS_DOCUMENTS, SEED_EXAMPLES
from bft_resources.corpus import CorpusSource

from conftest import DOLMA, OASST_TREES


def _instance(tmp_path, corpus_dir, model, **overrides):
    return declare(tmp_path, model, seed={"uri": str(OASST_TREES)}, corpus={"uri": str(corpus_dir)},
                   **overrides)  # fmt: skip


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _metadata(result, inst, asset: str) -> dict:
    materialization = result.asset_materializations_for_node(node(inst, asset))[0]
    return {k: v.value for k, v in materialization.metadata.items()}


def test_seed_examples_from_real_oasst_trees(tmp_path, shared_data, tiny_tokenizer_model):
    inst = _instance(tmp_path, tmp_path, tiny_tokenizer_model)
    with dg.instance_for_test() as instance:
        result = materialize(inst, [SEED_EXAMPLES], instance)
    assert result.success
    meta = _metadata(result, inst, SEED_EXAMPLES)
    table = pl.read_parquet(tmp_path / "storage" / "t" / "seed_examples.parquet")
    rejects = pl.read_parquet(tmp_path / "storage" / "t" / "seed_examples.rejects.parquet")
    assert meta["rows"] == table.height > 50
    assert meta["records_read"] == 100 == table.height + rejects.height
    assert table_counts(meta["drops"])["root_synthetic"] == 5
    assert all(e.passed for e in _checks(result).values()), _checks(result)


@pytest.fixture
def real_corpus(tmp_path, shared_data):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in DOLMA.glob("*.gz"):
        shutil.copy(path, corpus)
    return corpus


def test_candidate_responses_on_real_dolma_shards_with_smollm2(tmp_path, real_corpus, smollm2):
    inst = _instance(tmp_path, real_corpus, smollm2.model)
    corpus = CorpusSource(uri=str(real_corpus))
    with dg.instance_for_test() as instance:
        keys = discover_shards(corpus, instance, inst.shards.name)
        assert sorted(keys) == sorted(corpus.shard(k).key for k in keys)
        multilingual = "CC-MAIN-20190717121559-20190717143559-00140"
        result = materialize(
            inst, [CORPUS_DOCUMENTS, CANDIDATE_RESPONSES], instance, partition_key=multilingual
        )
    assert result.success
    meta = _metadata(result, inst, CANDIDATE_RESPONSES)
    folder = tmp_path / "storage" / "t" / CANDIDATE_RESPONSES
    table = pl.read_parquet(folder / f"{multilingual}.parquet")
    rejects = pl.read_parquet(folder / f"{multilingual}.rejects.parquet")
    assert meta["lines_read"] == 697  # PROVENANCE.md
    assert table.height + rejects.height == 697
    assert meta["rows"] == table.height and meta["lines_dropped"] == rejects.height
    assert table_counts(meta["drops"])["not_english"] > 250  # most of this raw crawl is not English
    assert table_counts(meta["drops"])["empty_text"] == 27  # 697 lines, 670 with non-empty text
    assert table["n_tokens"].max() <= meta["token_budget"]
    assert table["id"].is_unique().all()
    checks = _checks(result)
    assert all(e.passed for e in checks.values()), {
        k: v.metadata for k, v in checks.items() if not v.passed
    }


def _write_gz(path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as out:
        out.write(b"\n".join(lines) + b"\n")


ENGLISH = (
    "The parser reads each line of the file and returns the records that it found, "
    "so that the caller can check them one at a time."
)


def test_malformed_lines_are_counted_never_fatal(tmp_path, tiny_tokenizer_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    doc = lambda **r: json.dumps(r).encode()  # noqa: E731
    _write_gz(
        corpus / "bad.jsonl.gz",
        [
            doc(id="ok-1", text=ENGLISH, metadata={"url": "https://example.org"}),
            doc(id="ok-2", text=ENGLISH.replace("parser", "reader"), metadata="{'url': 'x'}"),
            b'{"id": "broken", "text": ',
            b'{"id": "latin1", "text": "caf\xe9 ' + ENGLISH.encode() + b'"}',
            doc(id="no-text"),
            doc(id="null-text", text=None),
            b'"just a string"',
            b"",
            doc(id="huge", text="word " * 2_100_000),
            doc(id="dup", text=ENGLISH),
            doc(id="long", text=" ".join([ENGLISH] * 60)),
        ],
    )
    model = {"model": str(tiny_tokenizer_model), "context_window": 4096}  # "long" cannot fit
    generation = {"backtranslation": {"max_new_tokens": 32}, "scoring": {"mode": "logprobs"}}
    inst = _instance(tmp_path, corpus, model, generation=generation)
    with dg.instance_for_test() as instance:
        discover_shards(CorpusSource(uri=str(corpus)), instance, inst.shards.name)
        result = materialize(
            inst, [CORPUS_DOCUMENTS, CANDIDATE_RESPONSES], instance, partition_key="bad"
        )
    assert result.success
    meta = _metadata(result, inst, CANDIDATE_RESPONSES)
    rejects = pl.read_parquet(
        tmp_path / "storage" / "t" / CANDIDATE_RESPONSES / "bad.rejects.parquet"
    )
    assert dict(rejects.select("line", "reason").iter_rows()) == {
        3: c.BAD_JSON,
        4: c.BAD_UTF8,
        5: c.MISSING_TEXT,
        6: c.MISSING_TEXT,
        7: c.NOT_AN_OBJECT,
        8: c.BLANK_LINE,
        9: c.TOO_LARGE,
        10: c.DUPLICATE_TEXT,
        11: c.TOO_LONG_FOR_CONTEXT,
    }
    assert (meta["lines_read"], meta["rows"]) == (11, 2)
    assert rejects["excerpt"].str.len_chars().max() <= 200  # a 10 MB line is not copied whole
    assert all(e.passed for e in _checks(result).values())


def test_a_truncated_shard_fails_its_partition_naming_the_file(
    tmp_path, shared_data, tiny_tokenizer_model
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    data = (DOLMA / "provided_documents_000.json.gz").read_bytes()
    (corpus / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    inst = _instance(
        tmp_path, corpus, {"model": str(tiny_tokenizer_model), "context_window": 100_000}
    )
    with dg.instance_for_test() as instance:
        discover_shards(CorpusSource(uri=str(corpus)), instance, inst.shards.name)
        result = materialize(inst, [CORPUS_DOCUMENTS, CANDIDATE_RESPONSES], instance, partition_key="cut",
                             raise_on_error=False)  # fmt: skip
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "cut.jsonl.gz: compressed stream broke after line" in str(failure.cause or failure)
    assert not (tmp_path / "storage" / "t" / CANDIDATE_RESPONSES / "cut.parquet").exists()


def test_the_sensor_adds_new_shards_and_observation_versions_them(tmp_path, shared_data):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(DOLMA / "cc_en_head-0091.jsonl.gz", corpus)
    inst = _instance(tmp_path, corpus, "unused")
    defs = build_instance_defs(inst)
    sensor = defs.get_repository_def().get_sensor_def("t__corpus_shard_sensor")
    resource = CorpusSource(uri=str(corpus))
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
            first = sensor.evaluate_tick(context)
            assert first.dynamic_partitions_requests[0].partition_keys == ["cc_en_head-0091"]
            instance.add_dynamic_partitions(inst.shards.name, ["cc_en_head-0091"])
            assert sensor.evaluate_tick(context).skip_message
            shutil.copy(DOLMA / "cc_en_head-0174.jsonl.gz", corpus)
            requests = sensor.evaluate_tick(context).dynamic_partitions_requests
            assert requests[0].partition_keys == ["cc_en_head-0174"]

        discover_shards(resource, instance, inst.shards.name)
        observe = defs.resolve_job_def(inst.name(OBSERVE_CORPUS_JOB))
        result = observe.execute_in_process(instance=instance, resources=defs.resources)
        assert result.success
        records = instance.fetch_observations(inst.key(CORPUS_DOCUMENTS), limit=10).records
        versions = {
            r.partition_key: r.asset_observation.tags["dagster/data_version"] for r in records
        }
        assert versions == {s.key: resource.fingerprint(s) for s in resource.list_shards()}

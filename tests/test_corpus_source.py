import gzip
import shutil

import pytest

from bft_resources.corpus import CorpusSource, ShardReadError, shard_key

from conftest import DOLMA


def test_shards_are_discovered_recursively_with_readable_keys(tmp_path, shared_data):
    (tmp_path / "cc_en_head").mkdir()
    shutil.copy(DOLMA / "cc_en_head-0091.jsonl.gz", tmp_path / "cc_en_head" / "0091.jsonl.gz")
    shutil.copy(DOLMA / "provided_documents_000.json.gz", tmp_path)
    (tmp_path / "notes.txt").write_text("not a shard")
    shards = CorpusSource(uri=str(tmp_path)).list_shards()
    assert [s.key for s in shards] == ["cc_en_head.0091", "provided_documents_000"]
    assert shard_key("a/b/c.json.gz") == "a.b.c"


def test_lines_stream_and_fingerprint_follows_content(tmp_path, shared_data):
    shutil.copy(DOLMA / "cc_en_head-0091.jsonl.gz", tmp_path)
    corpus = CorpusSource(uri=str(tmp_path))
    shard = corpus.list_shards()[0]
    assert len(list(corpus.lines(shard))) == 10
    before = corpus.fingerprint(shard)
    with open(shard.uri, "ab") as handle:
        handle.write(gzip.compress(b'{"id": "x", "text": "appended"}\n'))
    assert corpus.fingerprint(shard) != before
    assert len(list(corpus.lines(shard))) == 11  # concatenated gzip members are one stream


def test_a_truncated_gzip_names_the_file_and_where_it_broke(tmp_path, shared_data):
    data = (DOLMA / "provided_documents_000.json.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    corpus = CorpusSource(uri=str(tmp_path))
    with pytest.raises(
        ShardReadError, match=r"cut\.jsonl\.gz: compressed stream broke after line \d+"
    ):
        list(corpus.lines(corpus.shard("cut")))


def test_a_missing_corpus_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus folder .* does not exist"):
        CorpusSource(uri=str(tmp_path / "nope")).list_shards()


def test_an_s3_corpus_lists_and_streams_like_a_local_one(tmp_path, shared_data, s3):
    local = tmp_path / "local"
    (local / "cc_en_head").mkdir(parents=True)
    shutil.copy(DOLMA / "cc_en_head-0091.jsonl.gz", local / "cc_en_head" / "0091.jsonl.gz")
    shutil.copy(DOLMA / "provided_documents_000.json.gz", local)
    for path in local.rglob("*.gz"):
        s3.upload(path, f"dolma/{path.relative_to(local).as_posix()}")
    s3.upload(DOLMA / "PROVENANCE.md", "dolma/PROVENANCE.md")  # not a shard

    remote = CorpusSource(uri=s3.uri("dolma"), s3=s3.resource)
    on_disk = CorpusSource(uri=str(local))
    assert [s.key for s in remote.list_shards()] == [s.key for s in on_disk.list_shards()]
    for shard in remote.list_shards():
        assert shard.uri.startswith(f"s3://{s3.name}/dolma/")
        assert list(remote.lines(shard)) == list(on_disk.lines(on_disk.shard(shard.key)))

    shard = remote.shard("provided_documents_000")
    before = remote.fingerprint(shard)
    s3.upload(DOLMA / "cc_en_head-0174.jsonl.gz", "dolma/provided_documents_000.json.gz")
    assert remote.fingerprint(remote.shard("provided_documents_000")) != before


def test_a_truncated_s3_shard_names_the_object(tmp_path, shared_data, s3):
    data = (DOLMA / "provided_documents_000.json.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    s3.upload(tmp_path / "cut.jsonl.gz", "web/cut.jsonl.gz")
    corpus = CorpusSource(uri=s3.uri("web"), s3=s3.resource)
    with pytest.raises(ShardReadError, match=rf"s3://{s3.name}/web/cut\.jsonl\.gz: compressed"):
        list(corpus.lines(corpus.shard("cut")))


def test_the_shard_sensor_adds_a_partition_when_a_file_lands_on_s3(tmp_path, shared_data, s3):
    import dagster as dg
    from instances import declare

    from bft_assets.corpus import build_shard_sensor

    inst = declare(tmp_path, "m", corpus={"uri": s3.uri("dolma")},
                   s3={"endpoint_url": s3.resource.endpoint_url, "region_name": "us-east-1"})  # fmt: skip
    sensor = build_shard_sensor(inst)
    corpus = CorpusSource(uri=s3.uri("dolma"), s3=s3.resource)
    s3.upload(DOLMA / "cc_en_head-0091.jsonl.gz", "dolma/cc_en_head-0091.jsonl.gz")
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, resources={"t__corpus": corpus}) as context,
    ):
        (request,) = sensor.evaluate_tick(context).dynamic_partitions_requests
        assert (
            request.partition_keys == ["cc_en_head-0091"]
            and request.partitions_def_name == "t__corpus_shards"
        )
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        assert sensor.evaluate_tick(context).skip_message
        s3.upload(DOLMA / "cc_en_head-0174.jsonl.gz", "dolma/cc_en_head-0174.jsonl.gz")
        (request,) = sensor.evaluate_tick(context).dynamic_partitions_requests
        assert request.partition_keys == ["cc_en_head-0174"]

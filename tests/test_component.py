"""bft as a plugin: two instances declared in YAML inside a user's own dg project, beside
the host's own `storage` resource, asset and automation sensor."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver
from instances import declare, materialize, record_built, record_whole_graph

from bft_assets.corpus import discover_shards
from bft_assets.demo import write_demo_corpus
from bft_assets.graph import build_instance_defs
from bft_assets.instance import (
    BACKTRANSLATED_POOL,
    CANDIDATE_RESPONSES,
    EVAL_SCORES,
    FINETUNED_CHECKPOINT,
    REWRITTEN_DATASET,
    SEED_EXAMPLES,
)
from bft_resources.corpus import CorpusSource

DG = Path(sys.executable).with_name("dg")

HOST_ASSETS = '''\
import dagster as dg


class Warehouse(dg.ConfigurableResource):
    url: str = "sqlite://"


@dg.asset(automation_condition=dg.AutomationCondition.eager())
def orders(storage: Warehouse) -> None:
    """The host's own asset, reading the host's own `storage` resource."""


@dg.definitions
def defs():
    return dg.Definitions(
        assets=[orders],
        resources={"storage": Warehouse()},
        sensors=[dg.AutomationConditionSensorDefinition(
            "host_automation", target=dg.AssetSelection.assets(orders))],
    )
'''


def _instance_yaml(root: Path, prefix: str, model: Path, rewriter: str | None = None) -> dict:
    return {
        "type": "bft_assets.BackAndForthTranslation",
        "attributes": {
            "key_prefix": prefix,
            "storage": str(root / f"storage_{prefix}"),
            "seed": {"uri": "bft:demo"},
            "corpus": {"uri": str(root / f"corpus_{prefix}")},
            "models": {"base": str(model), "rewriter": rewriter or str(model), "judge": str(model)},
            "recipes": [{"name": "seed_only", "responses": "none"},
                        {"name": "filtering_rewriting", "responses": "rewrite", "min_score": 5}],
            "eval": {"uri": "bft:demo"},
        },
    }  # fmt: skip


def write_dg_project(root: Path, name: str) -> Path:
    """An empty dg project as create-dagster lays it out (src layout, a defs folder the
    definitions load); returns its package folder."""
    package = root / "src" / name
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "{name}"
        version = "0.1.0"
        requires-python = ">=3.11"

        [tool.dg]
        directory_type = "project"

        [tool.dg.project]
        root_module = "{name}"
        """))  # fmt: skip
    (package / "__init__.py").write_text("")
    (package / "definitions.py").write_text(textwrap.dedent("""\
        from pathlib import Path

        import dagster as dg


        @dg.definitions
        def defs():
            return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
        """))  # fmt: skip
    (package / "defs" / "__init__.py").write_text("")
    return package


def _write_host(root: Path, model: Path) -> Path:
    """A user's dg project (src layout) with its own asset, `storage` resource and automation
    sensor, and two bft instances over two corpora and two storage roots."""
    package = write_dg_project(root, "host")
    (package / "defs" / "host_assets.py").write_text(HOST_ASSETS)
    for prefix in ("web", "c4"):
        _write_instance(root, prefix, _instance_yaml(root, prefix, model))
        write_demo_corpus(root / f"corpus_{prefix}", shards=1, docs_per_shard=3)
    # different shard names per corpus, so "each instance sees only its own" can be seen
    (root / "corpus_c4" / "stdlib-docs-0000.jsonl.gz").rename(
        root / "corpus_c4" / "c4-0000.jsonl.gz"
    )
    return root


def _write_instance(root: Path, prefix: str, body: dict) -> Path:
    folder = root / "src" / "host" / "defs" / prefix
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "defs.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _dg(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home"), "NO_COLOR": "1"}
    (root / "dagster_home").mkdir(exist_ok=True)
    # `check` would otherwise look for the project's own virtualenv; this one has bft.
    active = ["--use-active-venv"] if args[0] == "check" else []
    return subprocess.run([str(DG), *args, *active], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@contextmanager
def _host_defs(root: Path) -> Iterator[dg.Definitions]:
    """The host project's definitions, loaded as `dagster dev` would (modules evicted after,
    so the next load reads the YAML again)."""
    sys.path.insert(0, str(root / "src"))
    try:
        yield dg.load_from_defs_folder(path_within_project=root)
    finally:
        sys.path.remove(str(root / "src"))
        for name in [m for m in sys.modules if m == "host" or m.startswith("host.")]:
            del sys.modules[name]


@pytest.fixture
def host(tmp_path, tiny_tokenizer_model) -> Path:
    return _write_host(tmp_path / "host", tiny_tokenizer_model)


def test_two_instances_load_beside_the_host_and_dg_check_defs_passes(host):
    checked = _dg(host, "check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with _host_defs(host) as defs:
        repo = defs.get_repository_def()
        keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
        resources = set(defs.resources)
    assert "orders" in keys
    for prefix in ("web", "c4"):
        assert {f"{prefix}/{a}" for a in (SEED_EXAMPLES, CANDIDATE_RESPONSES, EVAL_SCORES)} <= keys
        assert {f"{prefix}__shard_job", f"{prefix}__seed_job"} <= {
            j.name for j in repo.get_all_jobs()
        }
        assert {f"{prefix}__corpus_shard_sensor", f"{prefix}__rebuild_stale"} <= {
            s.name for s in repo.sensor_defs
        }
    # The host keeps its generic `storage`; bft's resources are all prefixed.
    assert isinstance(defs.resources["storage"], dg.ConfigurableResource)
    assert all(r == "storage" or r.startswith(("web__", "c4__")) for r in resources)
    partition_sets = {
        a.partitions_def.name
        for a in defs.assets
        if isinstance(a, dg.AssetsDefinition)
        and isinstance(a.partitions_def, dg.DynamicPartitionsDefinition)
    }
    assert partition_sets == {"web__corpus_shards", "c4__corpus_shards"}


def test_each_instance_writes_its_own_root_and_sees_only_its_own_shards(host):
    with _host_defs(host) as defs, dg.instance_for_test() as instance:
        repo = defs.get_repository_def()
        for prefix in ("web", "c4"):
            sensor = repo.get_sensor_def(f"{prefix}__corpus_shard_sensor")
            with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
                result = sensor.evaluate_tick(context)
            for request in result.dynamic_partitions_requests:
                instance.add_dynamic_partitions(
                    request.partitions_def_name, list(request.partition_keys)
                )
        assert instance.get_dynamic_partitions("web__corpus_shards") == ["stdlib-docs-0000"]
        assert instance.get_dynamic_partitions("c4__corpus_shards") == ["c4-0000"]

        for prefix, shard in (("web", "stdlib-docs-0000"), ("c4", "c4-0000")):
            chosen = [defs.get_assets_def(dg.AssetKey([prefix, SEED_EXAMPLES]))]
            assert dg.materialize(chosen, instance=instance, resources=defs.resources).success
            chosen = [defs.get_assets_def(dg.AssetKey([prefix, CANDIDATE_RESPONSES]))]
            assert dg.materialize(
                chosen, instance=instance, resources=defs.resources, partition_key=shard
            ).success
        # the host's sensor and asset are untouched: no run, no materialization, still its own
        host_sensor = repo.get_sensor_def("host_automation")
        assert host_sensor.asset_selection.resolve(repo.asset_graph) == {dg.AssetKey("orders")}
        assert instance.get_latest_materialization_event(dg.AssetKey("orders")) is None

    for prefix, shard in (("web", "stdlib-docs-0000"), ("c4", "c4-0000")):
        root = host / f"storage_{prefix}" / prefix
        assert pl.read_parquet(root / f"{SEED_EXAMPLES}.parquet").height == 24
        candidates = pl.read_parquet(root / CANDIDATE_RESPONSES / f"{shard}.parquet")
        assert (candidates["shard"] == shard).all() and candidates.height > 0
    assert sorted(p.name for p in (host / "storage_web").iterdir()) == ["web"]
    assert sorted(p.name for p in (host / "storage_c4").iterdir()) == ["c4"]


def _stale(defs: dg.Definitions, instance: dg.DagsterInstance) -> set[str]:
    # Dagster's own resolver: what the UI shows as stale, and what `code_version_changed` reads.
    resolver = get_stale_status_resolver(instance, list(defs.assets))
    stale = set()
    for asset in defs.assets:
        if not isinstance(asset, dg.AssetsDefinition) or not asset.is_materializable:
            continue
        keys = [None] if asset.partitions_def is None else asset.partitions_def.get_partition_keys(
            dynamic_partitions_store=instance)  # fmt: skip
        for partition in keys:
            if resolver.get_status(asset.key, partition) != StaleStatus.FRESH:
                stale.add(f"{asset.key.to_user_string()}[{partition}]")
    return stale


def test_editing_one_instances_rewriter_stales_exactly_what_reads_its_rewrites(
    host, tiny_tokenizer_model
):
    """Dagster's staleness: the edited stage is stale at once (its code version); what reads
    it turns stale when the stage is rebuilt (a new data version). The other instance and the
    stages upstream stay fresh throughout."""
    recipes = ("seed_only", "filtering_rewriting")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("web__corpus_shards", ["s0"])
        instance.add_dynamic_partitions("c4__corpus_shards", ["s0"])
        with _host_defs(host) as defs:
            record_whole_graph(defs, instance)
            assert _stale(defs, instance) == set()  # a built graph is fresh

        body = _instance_yaml(
            host, "web", tiny_tokenizer_model, rewriter="meta-llama/Llama-2-70b-chat-hf"
        )
        _write_instance(host, "web", body)
        with _host_defs(host) as defs:
            assert _stale(defs, instance) == {f"web/{REWRITTEN_DATASET}[s0]"}
            assert record_built(
                instance, defs.get_assets_def(dg.AssetKey(["web", REWRITTEN_DATASET])), "s0"
            )
            stale = _stale(defs, instance)
    assert stale == {
        f"web/{asset}[{r}]" for asset in (FINETUNED_CHECKPOINT, EVAL_SCORES) for r in recipes
    }


def test_a_misspelt_attribute_fails_dg_check_defs_naming_it(host, tiny_tokenizer_model):
    body = _instance_yaml(host, "web", tiny_tokenizer_model)
    body["attributes"]["corpsu"] = body["attributes"].pop("corpus")
    path = _write_instance(host, "web", body)
    checked = _dg(host, "check", "defs")
    assert checked.returncode != 0
    out = checked.stdout + checked.stderr
    assert "corpsu" in out and f"{path}:" in out, out[-3000:]


def test_dg_lists_the_component_and_scaffolds_a_starter_that_loads(host):
    listed = _dg(host, "list", "components", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {c["key"]: c for c in json.loads(listed.stdout)["items"]}
    assert "bft_assets.BackAndForthTranslation" in entries

    shutil.rmtree(host / "src" / "host" / "defs" / "c4")
    scaffolded = _dg(host, "scaffold", "defs", "bft_assets.BackAndForthTranslation", "my_web")
    assert scaffolded.returncode == 0, scaffolded.stdout + scaffolded.stderr
    starter = (host / "src" / "host" / "defs" / "my_web" / "defs.yaml").read_text()
    assert "EMBEDDED model" in starter and "DEMO data" in starter  # clearly labelled
    assert yaml.safe_load(starter)["attributes"]["key_prefix"] == "my_web"
    # the paper's presets (BFT Tables 1 and 2) scaffold beside it and pass the same check
    for preset in ("paper-7b", "paper-70b"):
        params = json.dumps({"preset": preset})
        made = _dg(host, "scaffold", "defs", "bft_assets.BackAndForthTranslation", preset.replace("-", "_"),
                   "--json-params", params)  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
    checked = _dg(host, "check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with _host_defs(host) as defs:
        assert defs.get_assets_def(dg.AssetKey(["my_web", SEED_EXAMPLES]))
        seventy = defs.get_assets_def(dg.AssetKey(["paper_70b", FINETUNED_CHECKPOINT]))
        assert "filtering_distilling" in seventy.partitions_def.get_partition_keys()
    written = yaml.safe_load(
        (host / "src" / "host" / "defs" / "paper_7b" / "defs.yaml").read_text()
    )
    assert written["attributes"]["models"]["seed_base"] == "meta-llama/Llama-2-70b-hf"
    assert written["attributes"]["training"]["steps"] == [600, 900, 1200]


def _fake_hub_model(cache: Path, repo: str, revision: str, good: Path) -> None:
    """A Hugging Face hub cache holding ``repo`` at two revisions, as snapshot_download
    leaves it: ``revision`` is the tiny model, ``main`` a folder nothing can load."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    pinned, default = "1" * 40, "2" * 40
    shutil.copytree(good, folder / "snapshots" / pinned)
    (folder / "snapshots" / default).mkdir(parents=True)
    (folder / "snapshots" / default / "config.json").write_text("{not json")
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(pinned)
    (folder / "refs" / "main").write_text(default)


def test_a_pinned_revision_reaches_the_engines_model_load(
    tmp_path, tiny_tokenizer_model, monkeypatch
):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_hub_model(cache, "bft-test/tiny", "v1", tiny_tokenizer_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    write_demo_corpus(tmp_path / "corpus", shards=1, docs_per_shard=3)
    pinned = {"model": "bft-test/tiny", "revision": "v1"}
    inst = declare(tmp_path, tiny_tokenizer_model, models={"backward": pinned},
                   generation={"backtranslation": {"max_new_tokens": 4}})  # fmt: skip
    with dg.instance_for_test() as instance:
        (shard,) = discover_shards(
            CorpusSource(uri=str(tmp_path / "corpus")), instance, inst.shards.name
        )
        result = materialize(
            inst, [CANDIDATE_RESPONSES, BACKTRANSLATED_POOL], instance, partition_key=shard
        )
    assert result.success  # `main` cannot load: only the pinned snapshot could have
    pool = pl.read_parquet(tmp_path / "storage" / "t" / BACKTRANSLATED_POOL / f"{shard}.parquet")
    assert pool["model"].unique().to_list() == ["bft-test/tiny@v1"]

    unpinned = declare(tmp_path, tiny_tokenizer_model, models={"backward": "bft-test/tiny"})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(unpinned.shards.name, [shard])
        failed = materialize(
            unpinned, [BACKTRANSLATED_POOL], instance, partition_key=shard, raise_on_error=False
        )
    assert not failed.success  # the same reference without its revision loads `main`


def test_a_second_instance_reads_the_first_ones_seed_models(tmp_path, tiny_tokenizer_model):
    """The paper's corpus ablation: seed models trained once (web), read by c4, which trains
    none of its own; lineage runs from web/seed_model to c4's generation stages."""
    web = declare(tmp_path / "web", tiny_tokenizer_model, prefix="web",
                  training={"steps": [1], "batch_size": 4}, engine={"dtype": "float32"})  # fmt: skip
    write_demo_corpus(tmp_path / "c4" / "corpus", shards=1, docs_per_shard=3)
    c4 = declare(tmp_path / "c4", tiny_tokenizer_model, prefix="c4",
                 seed_models_from={"instance": "web", "storage": web.decl.storage},
                 generation={"backtranslation": {"max_new_tokens": 4}})  # fmt: skip
    both = dg.Definitions.merge(build_instance_defs(web), build_instance_defs(c4))
    graph = both.resolve_asset_graph()
    assert dg.AssetKey(["c4", "seed_model"]) not in graph.get_all_asset_keys()
    assert dg.AssetKey(["web", "seed_model"]) in graph.get(c4.key(BACKTRANSLATED_POOL)).parent_keys
    assert dg.AssetKey(["web", "seed_model"]) in graph.get(c4.key("scored_pool")).parent_keys
    with dg.instance_for_test() as instance:
        assert materialize(web, [SEED_EXAMPLES], instance).success
        assert materialize(web, ["seed_model"], instance, partition_key="backward").success
        (shard,) = discover_shards(CorpusSource(uri=c4.decl.corpus.uri), instance, c4.shards.name)
        result = materialize(
            c4, [CANDIDATE_RESPONSES, BACKTRANSLATED_POOL], instance, partition_key=shard
        )
    assert result.success
    pool = pl.read_parquet(Path(c4.decl.storage) / "c4" / BACKTRANSLATED_POOL / f"{shard}.parquet")
    assert pool["model"].unique().to_list() == [
        str(Path(web.decl.storage) / "web" / "seed_model" / "backward")
    ]


def _observe_recipes(defs: dg.Definitions, instance: dg.DagsterInstance, prefix: str) -> int:
    """One tick of the instance's recipe sensor, its observations recorded as the daemon
    records them; how many recipes it saw changed."""
    sensor = defs.get_repository_def().get_sensor_def(f"{prefix}__recipe_sensor")
    with dg.build_sensor_context(instance=instance) as context:
        result = sensor.evaluate_tick(context)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return len(result.asset_events)


def test_adding_or_editing_one_recipe_stales_only_that_recipe(host, tiny_tokenizer_model):
    """Through Dagster's own staleness resolver: a sixth recipe's partitions are the only ones
    to build; editing its min_score stales its own checkpoint and evaluation, nothing else
    (a recipe's declaration is its data version, observed by the recipe sensor)."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("web__corpus_shards", ["s0"])
        instance.add_dynamic_partitions("c4__corpus_shards", ["s0"])
        with _host_defs(host) as defs:
            record_whole_graph(defs, instance)
            assert _observe_recipes(defs, instance, "web") == 0  # observed while recorded
            assert _stale(defs, instance) == set()

        body = _instance_yaml(host, "web", tiny_tokenizer_model)
        body["attributes"]["recipes"].append(
            {"name": "filtering_4", "responses": "web", "min_score": 4, "generated_size": "all"}
        )
        _write_instance(host, "web", body)
        sixth = {f"web/{asset}[filtering_4]" for asset in (FINETUNED_CHECKPOINT, EVAL_SCORES)}
        with _host_defs(host) as defs:
            assert _observe_recipes(defs, instance, "web") == 1
            assert _stale(defs, instance) == sixth
            for asset in (FINETUNED_CHECKPOINT, EVAL_SCORES):
                assert record_built(
                    instance, defs.get_assets_def(dg.AssetKey(["web", asset])), "filtering_4"
                )
            assert _stale(defs, instance) == set()

        body["attributes"]["recipes"][-1]["min_score"] = 3
        _write_instance(host, "web", body)
        with _host_defs(host) as defs:
            assert _observe_recipes(defs, instance, "web") == 1  # only the edited recipe changed
            assert _stale(defs, instance) == sixth


def test_a_judge_declares_its_own_engine(tmp_path, tiny_tokenizer_model):
    """The judge holds an engine like every model role: a 70B judge on vLLM over 8 GPUs
    while the stages generate with transformers; its step asks for the 8 GPUs."""
    from bft_assets.graph import build_instance_defs
    from bft_assets.policies import GPUS_TAG
    from bft_resources.engine import EndpointEngine, TransformersEngine, VllmEngine

    inst = declare(
        tmp_path,
        tiny_tokenizer_model,
        judge={"engine": {"backend": "vllm", "tensor_parallel_size": 8}},
    )
    assert (
        type(inst.engine("judge")) is VllmEngine and inst.engine("judge").tensor_parallel_size == 8
    )
    assert type(inst.engine()) is TransformersEngine
    evaluated = build_instance_defs(inst).get_assets_def(inst.key(EVAL_SCORES))
    assert evaluated.op.tags[GPUS_TAG] == "8"
    remote = declare(tmp_path, tiny_tokenizer_model, judge={"engine": {
        "backend": "endpoint", "base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"}})  # fmt: skip
    assert (
        type(remote.engine("judge")) is EndpointEngine
        and remote.engine("judge").api_key_env == "OPENAI_API_KEY"
    )


def test_translation_sets_groups_owners_tags_and_op_tags_per_asset(tmp_path, tiny_tokenizer_model):
    from bft_assets.graph import build_instance_defs

    inst = declare(tmp_path, tiny_tokenizer_model,
                   translation={"group_name": "bft_{{ asset }}", "owners": ["team:gpu"], "tags": {"tier": "gold"}},
                   op_tags={"rewritten_dataset": {"team": "rewrites"}})  # fmt: skip
    defs = build_instance_defs(inst)
    rewritten = defs.get_assets_def(inst.key(REWRITTEN_DATASET))
    spec = rewritten.specs_by_key[inst.key(REWRITTEN_DATASET)]
    assert spec.group_name == "bft_rewritten_dataset" and spec.owners == ["team:gpu"]
    assert spec.tags["tier"] == "gold" and rewritten.op.tags["team"] == "rewrites"
    seed = defs.get_assets_def(inst.key(SEED_EXAMPLES)).specs_by_key[inst.key(SEED_EXAMPLES)]
    assert seed.group_name == "bft_seed_examples"
    with pytest.raises(ValueError, match="cannot be renamed"):
        build_instance_defs(
            declare(tmp_path, tiny_tokenizer_model, translation={"key": "elsewhere"})
        )

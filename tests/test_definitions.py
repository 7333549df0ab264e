import os
import subprocess
import sys

import dagster as dg

from bft_assets.definitions import declared_instances, defs
from bft_assets.prompts import BACKTRANSLATE, REWRITE, SCORE

from conftest import REPO

PIPELINE_ASSETS = {
    "seed_examples",
    "candidate_responses",
    "backtranslated_pool",
    "scored_pool",
    "rewritten_dataset",
}


def _graph():
    return defs.get_repository_def().asset_graph


def _key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["demo", name])


def test_the_code_location_is_the_demo_instance_declared_in_yaml():
    (inst,) = declared_instances().values()
    assert inst.prefix == "demo" and inst.decl.seed.uri == "bft:demo"
    # `bft demo` trains and evaluates exactly what the demo declares
    assert [r.name for r in inst.decl.recipes] == ["seed_only", "filtering", "filtering_rewriting"]


def test_graph_has_the_fixed_asset_keys_and_lineage():
    graph = _graph()
    keys = {k.path[-1] for k in graph.get_all_asset_keys()}
    assert {"seed_examples", "corpus_documents", "candidate_responses", "seed_model"} <= keys
    assert all(k.path[0] == "demo" for k in graph.get_all_asset_keys())
    candidates = graph.get(_key("candidate_responses"))
    assert _key("corpus_documents") in candidates.parent_keys
    assert graph.get(_key("corpus_documents")).is_observable
    assert _key("seed_model") in graph.get(_key("backtranslated_pool")).parent_keys


def test_shard_assets_share_the_instances_dynamic_shard_partitions():
    graph = _graph()
    for name in ("corpus_documents", *sorted(PIPELINE_ASSETS - {"seed_examples"})):
        partitions = graph.get(_key(name)).partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition)
        assert partitions.name == "demo__corpus_shards"
    assert graph.get(_key("seed_examples")).partitions_def is None


def test_every_materializable_asset_has_at_least_two_checks():
    graph = _graph()
    per_asset: dict[dg.AssetKey, int] = {}
    for check in graph.asset_check_keys:
        per_asset[check.asset_key] = per_asset.get(check.asset_key, 0) + 1
    for key in graph.materializable_asset_keys:
        assert per_asset.get(key, 0) >= 2, key
    assert {k.path[-1] for k in graph.materializable_asset_keys} >= PIPELINE_ASSETS


def test_check_names_are_prefixed_with_their_asset():
    for check in _graph().asset_check_keys:
        assert check.name.startswith(check.asset_key.path[-1] + "_"), check


def test_assets_follow_the_ui_conventions():
    """Kinds with icons, owners and tags from the YAML, and code references to the module
    that builds each asset."""
    graph = _graph()
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert "parquet" in node.kinds and node.owners == ["team:bft"], key
        assert node.tags.get("instance") == "demo", key
        references = node.metadata["dagster/code_references"].code_references
        module = {"candidate_responses": "candidates", "backtranslated_pool": "backtranslation",
                  "scored_pool": "scoring", "rewritten_dataset": "rewriting", "finetuned_checkpoint": "training",
                  "eval_scores": "evaluation/asset", "seed_examples": "seed"}.get(key.path[-1], key.path[-1])  # fmt: skip
        assert any(r.file_path.endswith(f"bft_assets/{module}.py") for r in references), key
    assert {"huggingface", "pytorch"} <= graph.get(_key("seed_model")).kinds


def test_dagster_definitions_validate_accepts_the_workspace(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_stages_share_the_gpu_pool_and_carry_their_prompt_version():
    graph = _graph()
    for name, prompt in (
        ("backtranslated_pool", BACKTRANSLATE),
        ("scored_pool", SCORE),
        ("rewritten_dataset", REWRITE),
    ):
        node = graph.get(_key(name))
        assert node.pools == {"gpu"}
        assert prompt.version in node.code_version

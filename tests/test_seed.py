import json

import polars as pl

from bft_assets import seed_records as seed
from bft_resources.records import RecordFiles

from conftest import OASST_TREES


def _eligible_first_turns(path) -> list[str]:
    """Independent count of trees with an English, live, human root and a rank-0 reply."""
    ids = []
    for line in path.read_text().splitlines():
        root = json.loads(line)["prompt"]
        if root["lang"] != "en" or root["deleted"] or root["synthetic"]:
            continue
        if any(
            r.get("rank") == 0 and r["lang"] == "en" and not r["deleted"] and not r["synthetic"]
            for r in root.get("replies", [])
        ):
            ids.append(json.loads(line)["message_tree_id"])
    return ids


def test_real_oasst_trees_give_first_turn_rank0_pairs(shared_data):
    pairs, rejects, read = seed.select_seed_pairs(RecordFiles(uri=str(OASST_TREES)).records(), 3200)
    assert read == 100
    assert pairs["id"].to_list() == _eligible_first_turns(OASST_TREES)
    assert pairs.height + rejects.height == read
    # PROVENANCE.md: 5 prompts of this sample are synthetic.
    assert rejects.filter(pl.col("reason") == seed.ROOT_SYNTHETIC).height == 5
    trees = {
        t["message_tree_id"]: t["prompt"]
        for t in map(json.loads, OASST_TREES.read_text().splitlines())
    }
    for row in pairs.iter_rows(named=True):
        root = trees[row["id"]]
        rank0 = next(r for r in root["replies"] if r["rank"] == 0)
        assert (row["instruction"], row["response"]) == (root["text"], rank0["text"])


def test_cap_keeps_the_first_pairs_in_file_order(shared_data):
    full, _, _ = seed.select_seed_pairs(RecordFiles(uri=str(OASST_TREES)).records(), 3200)
    capped, rejects, read = seed.select_seed_pairs(RecordFiles(uri=str(OASST_TREES)).records(), 10)
    assert capped["id"].to_list() == full["id"].to_list()[:10]
    assert rejects.filter(pl.col("reason") == seed.OVER_CAP).height == full.height - 10
    assert capped.height + rejects.height == read


def test_flat_pairs_jsonl_and_parquet_with_bad_lines(tmp_path):
    lines = [
        json.dumps({"instruction": "Say hi.", "response": "Hi!"}),
        "{not json",
        json.dumps({"prompt": "Count to two.", "completion": "One, two."}),
        json.dumps({"instruction": "Empty answer", "response": "  "}),
        json.dumps({"question": "No answer field"}),
        json.dumps(["a", "list"]),
        json.dumps({"instruction": "Say hi.", "response": "Hi!"}),  # duplicate of line 1
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs, rejects, read = seed.select_seed_pairs(
        RecordFiles(uri=str(tmp_path / "pairs.jsonl")).records(), 100
    )
    assert pairs["instruction"].to_list() == ["Say hi.", "Count to two."]
    assert dict(rejects.select("where", "reason").iter_rows()) == {
        "pairs.jsonl:2": seed.BAD_JSON,
        "pairs.jsonl:4": seed.EMPTY_TEXT,
        "pairs.jsonl:5": seed.NOT_A_PAIR,
        "pairs.jsonl:6": seed.NOT_A_PAIR,
        "pairs.jsonl:7": seed.DUPLICATE_ID,
    }
    assert read == 7

    pairs.select("instruction", "response").write_parquet(tmp_path / "pairs.parquet")
    from_parquet, _, _ = seed.select_seed_pairs(
        RecordFiles(uri=str(tmp_path / "pairs.parquet")).records(), 100
    )
    assert from_parquet["id"].to_list() == pairs["id"].to_list()

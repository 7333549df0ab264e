"""The README and the documentation site say what the code does: every YAML example in them
loads with `dg check defs`, and the attribute reference lists every attribute of the
component with its description.

Which ```yaml blocks are checked, and how:
- a block whose documents declare ``type: bft_assets.BackAndForthTranslation`` is checked as
  it stands, one defs folder per document (``---`` separates the files of one example);
- a block whose keys are all attributes of the component is an attributes fragment: it is
  merged over a minimal declaration (demo seed and eval sets, the embedded model), its keys
  replacing that declaration's, and checked;
- a block whose keys are Dagster instance settings is a ``dagster.yaml`` and is validated
  by Dagster's own instance-config validation;
- any other block fails the test: a new kind of example needs a rule here.
A block may include a file of the repository (``--8<-- "path"``, as the site's snippets
extension does): the file is what is checked. Key prefixes are suffixed per example, so that
examples which reuse ``web`` load side by side in one code location; one `dg check defs`
call checks them all.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from test_component import write_dg_project

from conftest import REPO

DG = Path(sys.executable).with_name("dg")
COMPONENT = "bft_assets.BackAndForthTranslation"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```yaml[^\n]*\n(.*?)^```", re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)
MINIMAL = {
    "key_prefix": "example",
    "storage": ".bft/storage",
    "seed": {"uri": "bft:demo"},
    "corpus": {"uri": ".bft/corpus"},
    "models": {"base": "smollm2-135m-instruct", "rewriter": "smollm2-135m-instruct"},
    "eval": {"uri": "bft:demo"},
}
DAGSTER_INSTANCE_KEYS = {
    "telemetry", "run_launcher", "run_coordinator", "run_monitoring", "concurrency", "storage",
    "run_storage", "event_log_storage", "schedule_storage", "compute_logs", "local_artifact_storage",
    "run_retries", "sensors", "schedules", "code_servers", "retention", "auto_materialize", "nux",
}  # fmt: skip


def _attributes() -> set[str]:
    from bft_assets.component import BackAndForthTranslation

    return set(BackAndForthTranslation.model().model_json_schema()["properties"])


def yaml_blocks() -> list[tuple[str, str]]:
    """(where, text) of every ```yaml block, with snippet includes read in."""
    found = []
    for page in PAGES:
        for n, match in enumerate(FENCE.finditer(page.read_text()), 1):
            text = SNIPPET.sub(lambda m: (REPO / m.group(1)).read_text(), match.group(1))
            found.append((f"{page.relative_to(REPO)}#{n}", text))
    return found


def classify(blocks: list[tuple[str, str]]) -> dict[str, list[tuple[str, list[dict]]]]:
    attributes = _attributes()
    kinds: dict[str, list[tuple[str, list[dict]]]] = {
        "declaration": [],
        "fragment": [],
        "dagster.yaml": [],
    }
    for where, text in blocks:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
        assert documents and all(isinstance(d, dict) for d in documents), (
            f"{where}: not YAML mappings"
        )
        if any(d.get("type") == COMPONENT for d in documents):
            assert all(d.get("type") == COMPONENT for d in documents), (
                f"{where}: a document without the type"
            )
            kinds["declaration"].append((where, documents))
        elif all(set(d) <= attributes for d in documents):
            kinds["fragment"].append(
                (where, [{"type": COMPONENT, "attributes": {**MINIMAL, **d}} for d in documents])
            )
        elif all(set(d) <= DAGSTER_INSTANCE_KEYS for d in documents):
            kinds["dagster.yaml"].append((where, documents))
        else:
            raise AssertionError(f"{where}: a YAML block that is neither a bft declaration, an attributes "
                                 f"fragment nor a dagster.yaml: {sorted(documents[0])}")  # fmt: skip
    return kinds


def host_project(root: Path, examples: list[tuple[str, list[dict]]]) -> dict[str, str]:
    """One dg project, a defs folder per declaration; returns folder -> where it came from."""
    package = write_dg_project(root, "docs_host")
    renamed: dict[str, str] = {}  # a prefix, as the first example that declares it is renamed
    origin = {}
    for n, (where, documents) in enumerate(examples):
        own = {
            d["attributes"]["key_prefix"]: f"{d['attributes']['key_prefix']}_{n}" for d in documents
        }
        for prefix, new in own.items():
            renamed.setdefault(prefix, new)
        for m, document in enumerate(documents):
            attributes = dict(document["attributes"])
            attributes["key_prefix"] = own[attributes["key_prefix"]]
            if "seed_models_from" in attributes:
                source = attributes["seed_models_from"]["instance"]
                attributes["seed_models_from"] = {**attributes["seed_models_from"],
                                                  "instance": own.get(source, renamed.get(source, source))}  # fmt: skip
            folder = f"example_{n}_{m}"
            path = package / "defs" / folder / "defs.yaml"
            path.parent.mkdir()
            path.write_text(
                f"# {where}\n"
                + yaml.safe_dump({**document, "attributes": attributes}, sort_keys=False)
            )
            origin[folder] = where
    return origin


def test_every_yaml_example_in_the_readme_and_the_site_passes_dg_check_defs(tmp_path):
    kinds = classify(yaml_blocks())
    examples = kinds["declaration"] + kinds["fragment"]
    assert len(kinds["declaration"]) >= 4 and len(kinds["fragment"]) >= 5, {
        k: len(v) for k, v in kinds.items()
    }
    origin = host_project(tmp_path / "host", examples)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "NO_COLOR": "1"}
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    checked = subprocess.run([str(DG), "check", "defs", "--use-active-venv"], cwd=tmp_path / "host",
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    out = checked.stdout + checked.stderr
    named = sorted({origin[f] for f in re.findall(r"defs/(example_\d+_\d+)/", out)})
    assert checked.returncode == 0, f"examples that fail: {named}\n{out[-6000:]}"

    for where, documents in kinds["dagster.yaml"]:
        (tmp_path / "instance").mkdir(exist_ok=True)
        (tmp_path / "instance" / "dagster.yaml").write_text(yaml.safe_dump(documents[0]))
        config, _ = dagster_instance_config(str(tmp_path / "instance"))
        assert config, where


def test_a_wrong_example_would_fail(tmp_path):
    """The check above can fail: a misspelt attribute in an example is named with its page."""
    with pytest.raises(AssertionError, match="neither a bft declaration"):
        classify([("docs/x.md#1", "corpsu: {uri: x}\nseed: {uri: bft:demo}\n")])


def _attributes_hook() -> Any:
    spec = importlib.util.spec_from_file_location(
        "attributes_hook", REPO / "docs" / "hooks" / "attributes.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as mkdocs loads a hook (its dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def test_the_attribute_reference_lists_every_attribute_with_its_description():
    from bft_assets.component import BackAndForthTranslation

    hook = _attributes_hook()
    sections = hook.reference()
    schema = BackAndForthTranslation.model().model_json_schema()
    listed = {(s.name, r.name): r for s in sections for r in s.rows}
    assert {("", name) for name in schema["properties"]} <= set(listed)
    bft_types = [
        s.name for s in sections if s.name and s.name in hook.python_types(BackAndForthTranslation)
    ]
    for name in bft_types:  # every nested attribute of bft's own types (Dagster's are Dagster's)
        assert {(name, f) for f in schema["$defs"][name]["properties"]} <= set(listed), name
    undocumented = [f"{s or 'attributes'}.{f}" for (s, f), row in listed.items()
                    if (s == "" or s in bft_types) and not row.description]  # fmt: skip
    assert undocumented == []
    page = hook.render(sections)
    assert (
        "| `tensor_parallel_size` | integer (≥ 1) | `1` |" in page
    )  # type and default, not Dagster's marker
    assert hook.UNSET not in page

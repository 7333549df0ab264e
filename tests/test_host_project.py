"""A user's own project: bft installed NON-editable into the project's virtualenv, an instance
scaffolded with `dg`, and the `bft` commands run from two working directories.

What proves the install is not editable: the code the commands run is the copy pip built
into the venv's site-packages (checked through the interpreter and pip's ``direct_url.json``),
from a wheel of the working tree built outside the repository, so nothing of the checkout is
on any path. What would cost minutes is downloading bft's ~330 dependencies (~1 GB, 2-8 min
here): the venv is seeded instead with hard links to the test environment's installed
packages (bft's own editable entries left out, so no finder or ``.pth`` of the checkout
comes along), and pip then installs ``bft[cli]`` from that wheel with the constraints of
``make install``. pip checks every declared requirement against what is there; what this
does not prove is that nothing undeclared is needed (the test environment has the dev
extras too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from instances import place_checkpoint

from conftest import REPO

pytestmark = pytest.mark.slow

# What `create-dagster project host` (1.13) writes, file by file (tests/ and .dg/ aside).
PYPROJECT = """\
[project]
name = "host"
requires-python = ">=3.10,<3.15"
version = "0.1.0"
dependencies = [
    "dagster==1.13.27",
]

[dependency-groups]
dev = [
    "dagster-dg-cli",
    "dagster-webserver",
]

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
force-include = { "pyproject.toml" = "pyproject.toml" }

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "host"
registry_modules = [
    "host.components.*",
]
"""
DEFINITIONS = """\
from pathlib import Path

from dagster import definitions, load_from_defs_folder


@definitions
def defs():
    return load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def create_dagster_project(root: Path) -> Path:
    package = root / "src" / "host"
    (package / "defs").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "definitions.py").write_text(DEFINITIONS)
    (package / "defs" / "__init__.py").write_text("")
    (root / "tests" / "__init__.py").write_text("")
    return root


def _site_packages(venv: Path) -> Path:
    return (
        venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )


def seeded_venv(venv: Path) -> Path:
    """A virtualenv holding the test environment's installed packages (hard links, ~5 s),
    minus bft itself, with its console scripts pointed at the new interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    source, target = _site_packages(Path(sys.prefix)), _site_packages(venv)
    for entry in source.iterdir():
        if entry.name.startswith(("__editable__.bft-", "__editable___bft_", "bft-")):
            continue
        subprocess.run(["cp", "-al", str(entry), str(target)], check=True)
    python = f"{Path(sys.prefix) / 'bin'}/python".encode()
    for script in (Path(sys.prefix) / "bin").iterdir():
        copy = venv / "bin" / script.name
        if script.name == "bft" or copy.exists() or not script.is_file():
            continue
        first, _, rest = script.read_bytes().partition(b"\n")
        if first.startswith(b"#!" + python):  # a console script of the test environment
            copy.write_bytes(f"#!{venv / 'bin' / 'python'}\n".encode() + rest)
            copy.chmod(0o755)
    return venv


def wheel_source(destination: Path) -> Path:
    """The files of the working tree a wheel is built from (tracked and new, not ignored),
    copied out so that pip's build leaves nothing in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    wanted = [n for n in listed if n in ("pyproject.toml", "README.md")
              or n.startswith(("bft_assets/", "bft_resources/"))]  # fmt: skip
    for name in wanted:
        if (REPO / name).is_file():  # a deleted file is still listed until it is committed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("host-project")
    root = create_dagster_project(base / "host")
    venv = seeded_venv(base / "venv")
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "--no-build-isolation",
         "-c", str(REPO / "constraints" / "cpu.txt"), f"{wheel_source(base / 'src')}[cli]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # the user's project, importable as `pip install -e .` makes it
    (_site_packages(venv) / "host.pth").write_text(f"{root / 'src'}\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BFT_STORAGE", "BFT_CORPUS", "PYTHON"))
    }
    env |= {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{env['PATH']}", "NO_COLOR": "1",
            "DAGSTER_HOME": str(base / "dagster_home"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    return {"root": root, "venv": venv, "env": env}


def run(host: dict, cwd: Path, *command: str) -> str:
    done = subprocess.run([str(host["venv"] / "bin" / command[0]), *command[1:]], cwd=cwd, env=host["env"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{command} in {cwd}:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def test_bft_is_installed_from_a_wheel_not_from_the_checkout(host):
    python = str(host["venv"] / "bin" / "python")
    code = ("import bft_assets, json, importlib.metadata as m; d = m.distribution('bft'); "
            "print(json.dumps([bft_assets.__file__, d.read_text('direct_url.json'), d.requires]))")  # fmt: skip
    where, direct_url, requires = json.loads(subprocess.run([python, "-c", code], cwd=host["root"], env=host["env"],
                                                  capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert Path(where).is_relative_to(_site_packages(host["venv"])), where
    assert json.loads(direct_url)["dir_info"].get("editable", False) is False
    assert str(REPO) not in where
    # `pip install 'bft[cli]'` is how a project without dagster-dg-cli gets `dg`
    assert any(r.startswith("dagster-dg-cli") and 'extra == "cli"' in r for r in requires), requires


def test_the_three_steps_and_every_command_work_from_any_directory(host, tiny_tokenizer_model):
    root = host["root"]
    # Steps 1 and 2: `dg` finds the component among the installed ones (the entry point of
    # bft's wheel) and scaffolds an instance, which loads as it stands.
    run(host, root, "dg", "scaffold", "defs", "bft_assets.BackAndForthTranslation", "web")
    starter = (root / "src" / "host" / "defs" / "web" / "defs.yaml").read_text()
    assert "relative to the dg project root" in starter  # the file says where its paths point
    where = ("import json; from pathlib import Path; from bft_assets.cli import project_instances; "
             "d = project_instances(Path.cwd())['web'].decl; print(json.dumps([d.storage, d.corpus.uri]))")  # fmt: skip
    storage, corpus = map(Path, json.loads(run(host, root, "python", "-c", where)))
    assert storage.is_relative_to(root) and corpus.is_relative_to(root), (storage, corpus)
    run(host, root, "dg", "check", "defs")

    # The host's Dagster instance: bft's shipped config (gpu pool, run monitoring, launcher),
    # which the commands below load.
    config = Path(host["env"]["DAGSTER_HOME"]) / "dagster.yaml"
    run(host, root, "bft", "dagster-yaml", str(config))
    assert yaml.safe_load(config.read_text())["run_monitoring"]["enabled"] is True

    # Step 3's inputs, from the project root and from a folder inside it: the same folders.
    inside = root / "tests"
    written = {
        cwd: run(host, cwd, "bft", "demo-data", "--instance", "web").split()
        for cwd in (root, inside)
    }
    assert written[root] == written[inside] and len(written[root]) == 2
    assert all(Path(p).parent == corpus for p in written[root]), (written[root], corpus)
    assert "added 2 shard partitions" in run(
        host, root, "bft", "discover-shards", "--instance", "web"
    )
    assert "added 0 shard partitions" in run(
        host, inside, "bft", "discover-shards", "--instance", "web"
    )

    # A trained recipe, standing in the instance's storage as finetuned_checkpoint leaves it.
    table = "web/finetuned_checkpoint"
    from bft_resources.storage import LocalStorage

    store = LocalStorage(root=str(storage))
    train = pl.DataFrame({"id": ["s1"], "source": ["seed"], "instruction": ["Say hi."],
                          "prompt": ["Say hi.\nAnswer in the style of an AI Assistant."],
                          "response": ["Hi!"], "recipe": ["filtering"]})  # fmt: skip
    store.write(table, train, partition="filtering", suffix="train")
    place_checkpoint(store, table, "filtering", tiny_tokenizer_model, {"base_model": "tiny"})
    exported = {}
    for cwd in (root, inside):
        out = run(host, cwd, "bft", "export", "--instance", "web", "filtering", "exported")
        assert "datasets" in out, out
        exported[cwd] = cwd / "exported"
        assert pl.read_parquet(exported[cwd] / "train.parquet").equals(train)
    manifests = [json.loads((e / "model" / "manifest.json").read_text()) for e in exported.values()]
    assert manifests[0] == manifests[1]
    # everything the commands wrote is under the project: nothing beside it, nothing in the checkout
    assert sorted(p.name for p in root.parent.iterdir()) == ["dagster_home", "host", "src", "venv"]


def test_the_cli_finds_a_project_as_dg_does(tmp_path):
    """dg.toml projects too; a dg.toml wins over pyproject.toml in one folder; a workspace above
    a project is not taken for one (each file is what create-dagster writes, trimmed)."""
    from bft_assets.cli import find_project, project_settings

    workspace = tmp_path / "ws"
    project = workspace / "projects" / "p1"
    (project / "src" / "p1" / "defs").mkdir(parents=True)
    (workspace / "dg.toml").write_text('directory_type = "workspace"\n\n[workspace]\n')
    (project / "dg.toml").write_text(
        'directory_type = "project"\n\n[project]\nroot_module = "p1"\ndefs_module = "p1.mydefs"\n'
    )
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p1"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        '[tool.dg.project]\nroot_module = "other"\n'
    )
    assert find_project(project / "src" / "p1" / "defs") == project
    assert project_settings(project)["defs_module"] == "p1.mydefs"  # dg.toml, not pyproject
    assert find_project(workspace) is None
    (project / "dg.toml").unlink()
    assert project_settings(project)["root_module"] == "other"
    with pytest.raises(SystemExit, match="not a dg project"):
        project_settings(workspace / "projects")

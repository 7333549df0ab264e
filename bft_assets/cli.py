"""`bft`: the commands around the Dagster graph (demo inputs, shard discovery, export, the demo
run, the instance config).

A command finds the bft instances of the code location it is pointed at, as ``dagster``
finds a code location: ``-m MODULE`` or ``-f FILE``, else ``--project PATH``, else the dg
project the working directory is in (the nearest ``dg.toml`` or ``pyproject.toml`` with
``[tool.dg]`` that declares a project, as dg finds it),
else bft's own code location (the demo).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bft_assets.instance import Instance

DEMO_INSTANCE = "demo"


def find_project(start: Path) -> Path | None:
    """The nearest dg project at or above ``start``, found as dg finds one: a ``dg.toml``, else
    a ``pyproject.toml`` with ``[tool.dg]``, whose ``directory_type`` is ``project`` (a
    workspace above it is not one)."""
    from dagster_shared.utils.config import discover_config_file

    found = discover_config_file(start.resolve(), lambda c: c.get("directory_type") == "project")
    return found.parent if found else None


def project_settings(root: Path) -> dict:
    """The ``project`` table of a dg project's config file (``dg.toml`` wins, as for dg)."""
    from dagster_shared.utils.config import (
        detect_dg_config_file_format,
        load_toml_as_dict,
        locate_dg_config_in_folder,
    )

    path = locate_dg_config_in_folder(root.resolve())
    if path is None:
        sys.exit(f"{root}: not a dg project (no dg.toml, no pyproject.toml with [tool.dg])")
    config = load_toml_as_dict(path)
    node = config if detect_dg_config_file_format(path) == "root" else config["tool"]["dg"]
    return dict(node.get("project", {}))


def project_instances(root: Path) -> dict[str, Instance]:
    """The bft instances a dg project's defs folder declares, by key prefix."""
    import dagster as dg
    from dagster_shared.utils.config import get_canonical_defs_module_name

    from bft_assets.component import BackAndForthTranslation

    settings = project_settings(root)
    root_module = settings.get("root_module") or root.name.replace("-", "_")
    for folder in (root / "src", root):  # src layout or flat, as dg finds them
        if (folder / root_module.split(".")[0]).exists() and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    defs_module = importlib.import_module(
        get_canonical_defs_module_name(settings.get("defs_module"), root_module)
    )
    tree = dg.ComponentTree.from_module(defs_module=defs_module, project_root=root)
    return {
        c.key_prefix: c.instance() for c in tree.get_all_components(of_type=BackAndForthTranslation)
    }


def location_instances(module: str | None, file: str | None) -> dict[str, Instance]:
    """The bft instances a code location's module builds when its definitions load."""
    from bft_assets import component

    if file is not None:
        spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        if spec is None or spec.loader is None:
            sys.exit(f"{file}: not a Python file")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(str(module))
    for value in vars(
        loaded
    ).values():  # a @dg.definitions function loads its definitions when called
        if callable(value) and type(value).__name__ == "LazyDefinitions":
            value()
    return {prefix: decl.instance() for prefix, decl in component.BUILT.items()}


def declared(args: argparse.Namespace) -> Instance:
    """The instance named by ``--instance`` in the code location the arguments point at."""
    where: str
    if args.module or args.file:
        instances, where = location_instances(args.module, args.file), args.module or args.file
    elif (root := Path(args.project) if args.project else find_project(Path.cwd())) is not None:
        instances, where = project_instances(root), f"the dg project {root}"
    else:
        from bft_assets.definitions import declared_instances

        instances, where = declared_instances(), "bft's own code location (no dg project here)"
    if args.instance not in instances:
        sys.exit(f"no bft instance {args.instance!r} in {where}; declared: {sorted(instances)}")
    return instances[args.instance]


def dagster_instance():
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        sys.exit(
            "DAGSTER_HOME is not set: point it at the (absolute) folder `dg dev` runs with, e.g. "
            'export DAGSTER_HOME="$PWD/.dagster" before both (make demo sets it)'
        )
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def cmd_demo_data(args: argparse.Namespace) -> None:
    from bft_assets.demo import DEMO_WORDS, write_demo_corpus
    from bft_resources.uris import LocationError, parse_location

    uri = declared(args).decl.corpus.uri
    try:  # file:///x and ~/x read as every other reader reads them; S3 refused, not a folder "s3:"
        corpus = parse_location(uri, "corpus.uri").path
    except LocationError as error:
        sys.exit(f"bft demo-data writes a local folder: {error}")
    paths = write_demo_corpus(corpus, args.shards, args.docs_per_shard, *DEMO_WORDS)
    print("\n".join(str(p) for p in paths))


def cmd_discover_shards(args: argparse.Namespace) -> None:
    from bft_assets.corpus import discover_shards

    inst = declared(args)
    new = discover_shards(inst.corpus(), dagster_instance(), inst.shards.name)
    print(f"added {len(new)} shard partitions: {', '.join(new) or '-'}")


def cmd_dagster_yaml(args: argparse.Namespace) -> None:
    from importlib import resources

    text = (resources.files("bft_assets") / "data" / "dagster.yaml").read_text()
    if args.destination == "-":
        print(text, end="")
        return
    destination = Path(args.destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(text)
    print(f"wrote {destination}")


def cmd_demo(args: argparse.Namespace) -> None:
    from bft_assets.demo import print_recipe_table, run_demo

    started = time.perf_counter()
    inst = run_demo(args.shards, args.docs_per_shard, dagster_instance())
    storage = Path(inst.decl.storage)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"outputs (Parquet): {storage}")
    for path in sorted(storage.rglob("*.parquet")):
        print(f"  {path.relative_to(storage)}")
    print(
        f"runs and metadata: DAGSTER_HOME={os.environ['DAGSTER_HOME']}; open the UI with `make ui`"
    )
    print_recipe_table(inst)


def cmd_export(args: argparse.Namespace) -> None:
    from bft_assets.export import export_recipe

    inst = declared(args)
    written = export_recipe(inst, inst.storage, args.recipe, Path(args.destination))
    for what, where in written.items():
        print(f"{what:>9}: {where}")


def cmd_alpaca_eval_lc(args: argparse.Namespace) -> None:
    import json

    from bft_assets.evaluation.lc import annotations_lc

    print(json.dumps(annotations_lc(Path(args.annotations))))


def main(argv: list[str] | None = None) -> None:
    # Threads that sleep at OpenMP's barriers rather than spin: beside any other busy process a
    # 2-core machine decodes ~3x and trains ~1.5x faster so (benchmarks/cpu_wait_policy.py),
    # and a quiet one loses nothing. Read once, when torch starts: set before anything imports
    # it. The user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(
        prog="bft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(required=True)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--instance", default=DEMO_INSTANCE, help="the instance's key_prefix")
    location = which.add_mutually_exclusive_group()
    location.add_argument(
        "--project", help="a dg project folder (default: the one the working directory is in)"
    )
    location.add_argument("-m", "--module", help="a code location module, as dagster takes it")
    location.add_argument("-f", "--file", help="a code location file, as dagster takes it")
    demo_sizes = argparse.ArgumentParser(add_help=False)
    demo_sizes.add_argument(
        "--shards", type=int, default=2, help="demo shards to write (default: 2)"
    )
    demo_sizes.add_argument(
        "--docs-per-shard", type=int, default=5, help="documents per demo shard (default: 5)"
    )

    def command(name: str, fn, help: str, parents=()) -> argparse.ArgumentParser:
        found = sub.add_parser(name, parents=list(parents), help=help)
        found.set_defaults(fn=fn)
        return found

    command(
        "demo-data",
        cmd_demo_data,
        "write the demo corpus to an instance's corpus folder",
        (demo_sizes, which),
    )
    command(
        "discover-shards",
        cmd_discover_shards,
        "add a partition per new shard of an instance's corpus",
        (which,),
    )
    command("demo", cmd_demo, "materialize the whole graph for the demo partitions", (demo_sizes,))
    export = command("export", cmd_export, "write a recipe's training set (datasets, JSONL, Parquet, card) and model",
                     (which,))  # fmt: skip
    export.add_argument("recipe", help="a recipe the instance declares, e.g. filtering")
    export.add_argument("destination", help="a folder (relative: to the working directory)")
    dagster_yaml = command("dagster-yaml", cmd_dagster_yaml,
                           "write bft's Dagster instance config (gpu pool, run queue, run monitoring, launcher)")  # fmt: skip
    dagster_yaml.add_argument(
        "destination", nargs="?", default="-", help="a file, or - for standard output"
    )
    lc = command("alpaca-eval-lc", cmd_alpaca_eval_lc,
                 "win rate, length-controlled win rate and standard error of an AlpacaEval annotations.json")  # fmt: skip
    lc.add_argument("annotations", help="AlpacaEval's annotations.json")
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()

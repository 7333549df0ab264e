"""The code's shape, measured from its own source: imports follow the machinery, not the
lineage (no stage module imports another; the import chain stays short), asset bodies stay
short on the shared runner, and every setting of an engine, the trainer and the training
is declared once (the YAML resolves into the resources themselves)."""

import ast
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "bft_assets"
# One module per stage, named after its asset (evaluation is a package around its asset).
STAGE_MODULES = {
    "bft_assets.seed", "bft_assets.seed_model", "bft_assets.corpus", "bft_assets.candidates",
    "bft_assets.backtranslation", "bft_assets.scoring", "bft_assets.rewriting",
    "bft_assets.training", "bft_assets.evaluation.asset",
}  # fmt: skip
MAX_CHAIN = 7
MAX_ASSET_BODY = 60
MAX_STAGE_MODULE = 150


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_imports(name: str) -> set[str]:
    """bft_assets modules imported when ``name`` is imported (top level, not under
    TYPE_CHECKING; imports inside functions happen later, when called)."""
    found = set()
    for node in modules()[name].body:
        if _type_checking(node):
            continue
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found |= {t for t in targets if t in modules() and t != name}
    return found


def longest_chain(name: str, seen: tuple[str, ...] = ()) -> list[str]:
    if name in seen:
        raise AssertionError(f"import cycle: {' -> '.join((*seen, name))}")
    below = [longest_chain(child, (*seen, name)) for child in sorted(module_imports(name))]
    return [name, *max(below, key=len, default=[])]


def test_the_import_chain_of_bft_assets_is_short():
    chain = max((longest_chain(m) for m in modules()), key=len)
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_no_stage_module_imports_another(stage):
    assert not module_imports(stage) & (STAGE_MODULES - {stage})


def _asset_bodies() -> dict[str, int]:
    """Lines of every function decorated as an asset (``@dg.asset``, ``@stage_asset(...)``)."""
    bodies = {}
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                "asset" in ast.unparse(d).split("(")[0] for d in node.decorator_list
            ):
                bodies[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    return bodies


def test_every_asset_body_is_short():
    bodies = _asset_bodies()
    assert len(bodies) >= 10  # every asset of the graph is found
    assert {k: v for k, v in bodies.items() if v > MAX_ASSET_BODY} == {}


def test_every_stage_module_is_short():
    lengths = {
        m: len((REPO / (m.replace(".", "/") + ".py")).read_text().splitlines())
        for m in STAGE_MODULES
    }
    assert {m: n for m, n in lengths.items() if n > MAX_STAGE_MODULE} == {}


def test_every_engine_trainer_and_training_setting_is_declared_once():
    """The YAML's engine, judge engine, trainer, training and seed_training ARE the
    resources: their schema is the resource classes' own fields."""
    from bft_assets.component import BackAndForthTranslation
    from bft_resources.engine import EndpointEngine, TransformersEngine, VllmEngine
    from bft_resources.trainer import Trainer, TrainingSettings

    component = BackAndForthTranslation.resolve_from_dict({
        "key_prefix": "x", "storage": "/tmp/x", "seed": {"uri": "bft:demo"}, "corpus": {"uri": "/tmp/c"},
        "models": {"base": "m", "rewriter": "m"}, "eval": {"uri": "bft:demo"},
        "engine": {"backend": "vllm", "tensor_parallel_size": 8},
        "judge": {"engine": {"backend": "endpoint", "base_url": "http://127.0.0.1:1/v1"}},
        "trainer": {"num_gpus": 8, "distributed": "fsdp"}, "training": {"learning_rate": 5.5e-6},
    })  # fmt: skip
    assert type(component.engine) is VllmEngine and component.engine.tensor_parallel_size == 8
    assert type(component.judge.engine) is EndpointEngine
    assert type(component.trainer) is Trainer and type(component.training) is TrainingSettings
    schema = BackAndForthTranslation.model().model_json_schema()
    defs = schema["$defs"]
    for cls in (TransformersEngine, VllmEngine, EndpointEngine, Trainer, TrainingSettings):
        assert set(defs[cls.__name__]["properties"]) == set(cls.model_fields), cls
    # No copy of them in bft_assets: no class there shares more than two field names with one.
    machinery = [set(cls.model_fields) - {"backend"} for cls in (TransformersEngine, VllmEngine, EndpointEngine,
                                                                  Trainer, TrainingSettings)]  # fmt: skip
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                fields = {t.target.id for t in node.body
                          if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)}  # fmt: skip
                assert all(len(fields & m) <= 2 for m in machinery), (name, node.name)

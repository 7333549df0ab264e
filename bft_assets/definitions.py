"""The repository's code location: a dg project whose defs folder declares the demo
instance (``bft_assets/defs/demo/defs.yaml``). `dagster dev -w workspace.yaml`,
``dagster_cloud.yaml`` and ``bft demo`` load ``defs`` from here.

The executor is this code location's choice, not an instance's: ``BFT_EXECUTOR`` picks it.
"""

import os
import warnings
from pathlib import Path

import dagster as dg

import bft_assets.defs
from bft_assets.instance import Instance

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def step_executor(kind: str) -> dg.ExecutorDefinition | None:
    """Where a run's steps execute. k8s and ecs give every step its own pod or task, so
    that each asks for the GPUs its op tags name and CPU steps ask for none."""
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind == "ecs":
        from dagster_aws.ecs import ecs_executor

        return ecs_executor
    if kind == "in_process":
        return dg.in_process_executor  # no process per step: ~3 s less per step on 2 cores
    if kind != "multiprocess":
        raise ValueError(f"BFT_EXECUTOR={kind!r}: use multiprocess, in_process, k8s or ecs")
    return None


def component_tree() -> dg.ComponentTree:
    return dg.ComponentTree.from_module(defs_module=bft_assets.defs, project_root=PROJECT_ROOT)


def quiet_framework_warnings() -> None:
    """Dagster warns that the code references it adds to every component are a beta API, and
    that dg's own APIs are previews: true, but not news to a user of bft, in every run log."""
    for category in (dg.BetaWarning, dg.PreviewWarning):
        warnings.filterwarnings("ignore", category=category)


def declared_instances() -> dict[str, Instance]:
    """The bft instances this code location declares, by key prefix (for the `bft` CLI)."""
    from bft_assets.component import BackAndForthTranslation

    found = component_tree().get_all_components(of_type=BackAndForthTranslation)
    return {c.key_prefix: c.instance() for c in found}


def load_defs() -> dg.Definitions:
    quiet_framework_warnings()
    components = component_tree().build_defs()
    executor = step_executor(os.environ.get("BFT_EXECUTOR", "multiprocess"))
    return dg.Definitions.merge(components, dg.Definitions(executor=executor))


defs = load_defs()

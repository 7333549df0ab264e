"""How partitions run and are rebuilt: the GPU pool, the backfill policy, and the
declarative automation that rebuilds stale partitions (off until a user turns it on)."""

import json

import dagster as dg

# Every step that loads a model takes a slot of this pool; its limit is the number of GPUs
# (or of model replicas) the deployment has: `dagster instance concurrency set gpu N`.
GPU_POOL = "gpu"

# The assets read one partition key per run (a shard, a recipe, a direction): a backfill of
# N partitions is N runs, so a failure (an OOM, a preempted node) costs one partition, and
# the run queue and the gpu pool spread the runs over the machines there are.
ONE_PARTITION_PER_RUN = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)

AUTOMATION_SENSOR = "rebuild_stale"

# Per-step GPU requests, read where a step runs in its own pod (dagster-k8s's
# k8s_job_executor) or its own task (dagster-aws's ecs_executor). CPU steps ask for none.
K8S_CONFIG_TAG = "dagster-k8s/config"
ECS_CONTAINER_TAG = "ecs/container_overrides"
GPUS_TAG = "bft/gpus"


def gpu_op_tags(gpus: int) -> dict[str, str]:
    """Op tags that make a step's pod or task request ``gpus`` GPUs (and tolerate the taint
    GPU nodes usually carry)."""
    if gpus < 1:
        return {}
    count = str(gpus)
    k8s = {
        "container_config": {
            "resources": {
                "requests": {"nvidia.com/gpu": count},
                "limits": {"nvidia.com/gpu": count},
            }
        },
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        },
    }
    ecs = {"resourceRequirements": [{"type": "GPU", "value": count}]}
    return {K8S_CONFIG_TAG: json.dumps(k8s), ECS_CONTAINER_TAG: json.dumps(ecs), GPUS_TAG: count}


_AC = dg.AutomationCondition

# A partition is rebuilt when it becomes missing (a new shard), when its code version
# changes (prompt, sampling, model reference, filter rules), or when a partition it reads
# was rebuilt; never while it or an upstream partition is in progress or missing, and only
# once the upstream blocking checks passed. `newly_missing` rather than `missing`: a
# partition whose run failed is not retried on every tick.
REBUILD_STALE = (
    (_AC.newly_missing() | _AC.code_version_changed() | _AC.any_deps_updated()).since_last_handled()
    & ~_AC.any_deps_missing()
    & ~_AC.any_deps_in_progress()
    & ~_AC.in_progress()
    & _AC.all_deps_blocking_checks_passed()
).with_label("rebuild_stale")


def rebuild_stale_sensor(
    name: str, selection: dg.AssetSelection
) -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates REBUILD_STALE over one instance's assets, and no one else's.
    GPU time is money: it ships stopped. Start it in the UI (Automation tab) or with
    `dagster sensor start NAME`."""
    return dg.AutomationConditionSensorDefinition(
        name,
        target=selection,
        default_status=dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=60,
        description="Rebuilds missing and stale partitions (prompt, sampling or model changed, "
        "upstream rebuilt) once upstream checks pass. Stopped by default: it spends GPU time.",
    )

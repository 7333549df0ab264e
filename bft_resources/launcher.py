"""A run launcher for one machine that can tell a dead run from a running one.

Dagster's run monitoring marks a run failed when its launcher reports the run worker gone,
and then frees the concurrency slots it held (``free_slots_after_run_end_seconds``). The
default launcher cannot report: a run whose process was killed with SIGKILL (``bft demo``
in a terminal, a run worker, the machine's OOM killer) stays STARTED and keeps its slot of
the ``gpu`` pool, and every later GPU step waits for it forever. This launcher launches runs
exactly as the default one does, and answers the health check from the run worker's process
id (the one its first engine event records) and that process's start time, so a reused pid
is not taken for the run. It is meant for a single machine (``dagster dev``, the demo);
Kubernetes and ECS launchers answer the same check from their pods and tasks.
"""

import os
from pathlib import Path

from dagster import DagsterEventType, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus

_PROC = Path("/proc")


def run_worker_pid(instance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it was logged) of the process that executed the run, from the first engine
    event that records one ("Started process for run", "Executing steps in process")."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = (data.metadata or {}).get("pid") if data else None
        if pid is not None:
            return int(getattr(pid, "value", pid)), entry.timestamp
    return None


def process_started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is none."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        boot = next(
            line for line in (_PROC / "stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, StopIteration):
        return None
    # Field 22 (start time, in clock ticks after boot) comes after the command name, which is
    # in parentheses and may itself contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie or a dead process has no run left in it
        return None
    return int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")


class LocalRunLauncher(DefaultRunLauncher):
    @property
    def supports_check_run_worker_health(self) -> bool:
        return _PROC.is_dir()  # the check reads /proc; elsewhere Dagster's default applies

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        found = run_worker_pid(self._instance, run.run_id)
        if found is None:  # not started yet, or it logs nothing: nothing to judge on
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker process recorded yet")
        pid, logged_at = found
        started = process_started_at(pid)
        if started is None:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone")
        if started > logged_at + 1.0:
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                f"run worker process {pid} is gone (its pid now names a newer process)",
            )
        return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(pid))

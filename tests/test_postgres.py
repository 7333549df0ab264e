"""deploy/postgres/dagster.yaml against a private PostgreSQL 15 cluster on 127.0.0.1."""

import shutil

import dagster as dg
import pytest
from instances import declare, materialize

from bft_assets.instance import SEED_EXAMPLES

from conftest import REPO
from servers import PG_BIN, private_postgres

PASSWORD = "bft-pg-secret-never-logged"


@pytest.fixture
def postgres(monkeypatch):
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"needs PostgreSQL's initdb under {PG_BIN} (apt install postgresql-15)")
    with private_postgres(PASSWORD) as server:
        for var, key in {"DAGSTER_PG_HOST": "host", "DAGSTER_PG_PORT": "port",
                         "DAGSTER_PG_DB": "db", "DAGSTER_PG_USERNAME": "user"}.items():  # fmt: skip
            monkeypatch.setenv(var, server[key])
        monkeypatch.setenv("DAGSTER_PG_PASSWORD", PASSWORD)
        yield server


def test_materializations_are_recorded_in_postgres(postgres, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    inst = declare(tmp_path, "unused")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = materialize(inst, [SEED_EXAMPLES], instance)
        assert result.success
        logs = "\n".join(str(e) for e in instance.all_logs(result.run_id))

    # A second process (here: a second instance) sees the run and its checks in the database.
    with dg.DagsterInstance.from_config(str(home)) as again:
        assert again.get_run_by_id(result.run_id).is_success
        event = again.get_latest_materialization_event(inst.key(SEED_EXAMPLES))
        assert event is not None and event.run_id == result.run_id
        checks = again.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(inst.key(SEED_EXAMPLES), "seed_examples_ids_unique")]
        )
        assert len(checks) == 1
    assert PASSWORD not in logs

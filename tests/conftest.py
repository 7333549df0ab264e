"""Shared fixtures: real data from ../shared/data, the embedded SmolLM2, tiny local models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's threads sleep at OpenMP barriers rather than spin (read when torch starts, so before
# its import): spinning, two threads on a busy 2-core machine trained 8-20x slower than one;
# sleeping, torch's default of a thread per core ran test_generation_e2e 1.3x faster than one
# thread (benchmarks/cpu_wait_policy.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BFT_SHARED_DATA", REPO.parent / "shared" / "data"))
DOLMA = SHARED_DATA / "dolma_fixtures"
OASST_TREES = SHARED_DATA / "oasst_en100" / "en_100_tree.jsonl"
MULTILINGUAL_SHARD = DOLMA / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip that says why (CI turns such skips into failures)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"needs the shared test data at {SHARED_DATA} (a clone without ../shared has none)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from its GGUF once per cache)."""
    from bft_resources.models import SMOLLM2, ModelRef

    return ModelRef(model=SMOLLM2)


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory) -> Path:
    """A folder with a BPE tokenizer trained on the fly and a tiny random Llama config."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """One moto S3 server for the session; each test gets its own bucket."""
    from servers import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> S3Bucket:
    """A fresh bucket on the moto server, with the standard AWS variables pointing at it (so
    code that builds its client from boto3's chain reaches the same server)."""
    from dagster_aws.s3 import S3Resource

    for var, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "bft-test-key",
        "AWS_SECRET_ACCESS_KEY": "bft-test-secret-never-logged",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    resource = S3Resource(endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"bft-{uuid.uuid4().hex[:12]}"
    resource.get_client().create_bucket(Bucket=bucket)
    return S3Bucket(resource, bucket)


@dataclass(frozen=True)
class S3Bucket:
    resource: Any  # dagster_aws.s3.S3Resource
    name: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.resource.get_client().get_paginator("list_objects_v2")
        return sorted(
            entry["Key"]
            for page in pages.paginate(Bucket=self.name, Prefix=prefix)
            for entry in page.get("Contents", [])
        )

    def upload(self, path: Path, key: str) -> str:
        self.resource.get_client().upload_file(str(path), self.name, key)
        return self.uri(key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under BFT_NO_SKIPS=1 (CI) a skipped test is a failed test: CI always has the data."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("BFT_NO_SKIPS") == "1" and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under BFT_NO_SKIPS=1: {report.longrepr}"


VLLM_TESTS = "test_vllm*.py"  # the vLLM environment (make test-vllm) collects these files only


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test marked vllm outside tests/test_vllm*.py would run nowhere: the main suite
    deselects it and the vLLM environment, which lacks the dev extras the other modules
    import, does not collect its file. Collection fails instead, naming it."""
    stray = [
        i.nodeid for i in items if i.get_closest_marker("vllm") and not i.path.match(VLLM_TESTS)
    ]
    if stray:
        raise pytest.UsageError(
            f"vllm-marked tests belong in tests/{VLLM_TESTS}: {', '.join(stray)}"
        )

"""The Dagster UI as a user drives it: a real `dagster dev` on 127.0.0.1 and Debian's
Chromium through Playwright. Screenshots are saved under $BFT_ARTIFACTS (or the test's
temporary folder)."""

import os
import shutil
import time
from pathlib import Path

import pytest

from bft_assets.definitions import defs
from bft_assets.demo import write_demo_corpus

from conftest import REPO
from servers import dagster_dev

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium as root, offline: no sandbox, no GPU, none of its background traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("BFT_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install '.[dev]')")
    home = tmp_path_factory.mktemp("ui")
    (home / "dagster_home").mkdir()
    shutil.copy(
        REPO / "bft_assets" / "data" / "dagster.yaml", home / "dagster_home" / "dagster.yaml"
    )
    write_demo_corpus(home / "corpus", shards=1, docs_per_shard=4)
    env = {**os.environ, "DAGSTER_HOME": str(home / "dagster_home"), "BFT_STORAGE": str(home / "storage"),
           "BFT_CORPUS_URI": str(home / "corpus")}  # fmt: skip
    env.pop("BFT_SEED_URI", None)
    with dagster_dev(REPO / "workspace.yaml", env, home / "dagster-dev.log") as url:
        yield url, home


@pytest.fixture(scope="module")
def page(dagster_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True
        )
        tab = browser.new_page(viewport={"width": 1600, "height": 1000})
        tab.set_default_timeout(60_000)
        yield tab
        browser.close()


def _open(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter dialog
    if skip.count():
        skip.click()


def _graph():
    return defs.get_repository_def().asset_graph


def test_every_asset_is_in_the_catalog_and_the_graph(dagster_ui, page, artifacts):
    url, _ = dagster_ui
    _open(page, f"{url}/assets/demo")  # the catalog within the instance's key prefix
    for key in _graph().get_all_asset_keys():
        page.get_by_text(key.path[-1]).first.wait_for()
    page.screenshot(path=str(artifacts / "catalog.png"))
    for group in ("seed", "generation", "training", "evaluation"):
        _open(page, f"{url}/locations/bft/asset-groups/{group}/lineage")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(artifacts / f"graph-{group}.png"))
    page.get_by_text("rewritten_dataset").first.wait_for()


def test_every_check_is_listed_on_its_asset(dagster_ui, page):
    url, _ = dagster_ui
    checks: dict[str, list[str]] = {}
    for check in _graph().asset_check_keys:
        checks.setdefault(check.asset_key.to_user_string(), []).append(check.name)
    for asset, names in checks.items():
        _open(page, f"{url}/assets/{asset}?view=checks")  # asset: demo/<name>, the URL's path
        for name in names:
            # Long names are shown middle-truncated; the full name is in the DOM beside it.
            page.get_by_text(name, exact=True).first.wait_for(state="attached")


def test_materialize_seed_examples_from_the_ui(dagster_ui, page, artifacts):
    url, home = dagster_ui
    _open(page, f"{url}/assets/demo/seed_examples")
    page.get_by_text("Never materialized").first.wait_for()
    page.get_by_text("Materialize", exact=True).first.click()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        page.wait_for_timeout(3000)
        _open(page, f"{url}/assets/demo/seed_examples")
        if page.get_by_text("records_read", exact=True).count():
            break
    else:
        page.screenshot(path=str(artifacts / "seed_examples-timeout.png"))
        pytest.fail("seed_examples did not materialize from the UI within 240 s")
    page.screenshot(path=str(artifacts / "seed_examples.png"), full_page=True)
    body = page.inner_text("body")
    assert "dropped_root_synthetic" in body or "records_dropped" in body
    assert (home / "storage" / "demo" / "seed_examples.parquet").exists()
    _open(page, f"{url}/assets/demo/seed_examples?view=checks")
    page.get_by_text("seed_examples_ids_unique", exact=True).first.wait_for(state="attached")
    assert page.get_by_text("Passed").count() >= 1
    page.screenshot(path=str(artifacts / "seed_examples-checks.png"))

"""End to end: a person launches retraining from the Prefect UI with custom parameters.

A real local Prefect server and `facemine serve` run over a store holding a small real export
(LFW faces, clustered and exported); headless Chromium opens the UI, goes to Deployments →
retrain → Run → Custom run, checks the form refuses an out-of-range value, edits it and submits.
The run must complete and register a new model version whose training run carries the values
typed into the form, judged by the gate with its defaults (no validation data configured): on
pseudo-identities held out from training, both models' figures and the decision in the run's
`retrain-gate` artifact.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, sync_playwright
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect_helpers import (
    NEVER_DURING_TESTS,
    api_client,
    deployment_runs,
    facemine_serve,
    prefect_env,
    prefect_server,
    read_deployment,
    require_chromium,
    wait_for,
)
from retrain_helpers import prepared_store, store_copy

from storage import registry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Form label (under `config`) -> value typed; every one differs from the form's default.
TYPED = {"Epochs": "1", "Freeze Fraction": "0.95", "Margin": "0.37", "Seed": "7"}
EXPECTED_PARAMS = {"epochs": 1, "freeze_fraction": 0.95, "margin": 0.37, "seed": 7}
# The form starts from settings.train: CPU-sized defaults for this test's serve process.
TRAIN_DEFAULTS = {"batch_size": 16, "num_workers": 0, "warmup_epochs": 0.0}
UI_TIMEOUT_MS = 60_000
RUN_TIMEOUT_SECONDS = 300


@contextmanager
def browser_page(chromium: str, screenshot_on_failure: Path) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield page
        except BaseException:
            page.screenshot(path=str(screenshot_on_failure), full_page=True)
            raise
        finally:
            browser.close()


def form_input(page: Page, label: str) -> Locator:
    """The input a form label points at (labels read "<Field> (Optional)")."""
    field_id = page.locator("label", has_text=re.compile(rf"^{label} \(Optional\)$")).get_attribute("for")
    return page.locator(f'input[id="{field_id}"]')


def open_custom_retrain_form(page: Page, ui_url: str) -> None:
    page.goto(ui_url)
    page.get_by_role("link", name="Deployments").click()
    page.locator("a[href*='/deployments/deployment/']", has_text=re.compile("^retrain$")).click()
    page.get_by_role("button", name="Run").click()
    page.get_by_role("menuitem", name="Custom run").click()


def submit_run(page: Page) -> str:
    """Submit the run form; returns the new flow run's id."""
    page.get_by_role("button", name="Submit").click()
    # The deployment page comes back with a toast "<run name> scheduled to start now".
    page.get_by_text("scheduled to start now").wait_for()
    page.get_by_role("button", name="View run").click()
    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def test_retrain_launched_from_the_ui_registers_a_model_with_the_typed_parameters(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    chromium = require_chromium()
    with prefect_server(tmp_path) as (api_url, home):
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            prepared = prepared_store(tmp_path_factory)
        store = store_copy(prepared, tmp_path / "facemine-data", monkeypatch)
        # Defaults: no validation data configured (the serve process does not inherit FACEMINE_*).
        monkeypatch.delenv("FACEMINE_GATE__VALIDATION_PAIRS")
        monkeypatch.delenv("FACEMINE_GATE__VALIDATION_TRUTH")
        models_before = set(registry.models_table(store).id)
        env = prefect_env(
            home,
            api_url,
            FACEMINE_DATA_DIR=str(store.data_dir),
            FACEMINE_SERVE__CLUSTER_CRON=NEVER_DURING_TESTS,
            **{f"FACEMINE_TRAIN__{name.upper()}": str(value) for name, value in TRAIN_DEFAULTS.items()},
        )
        with facemine_serve(tmp_path, env) as serve_log, api_client(api_url) as client:
            logs = [serve_log, tmp_path / "prefect-server.log"]
            deployment = wait_for(lambda: read_deployment(client, "retrain/retrain"), 120, "deployment retrain", logs)
            with browser_page(chromium, tmp_path / "ui-failure.png") as page:
                open_custom_retrain_form(page, api_url.removesuffix("/api"))
                # The form carries the flow's constraints (margin <= 1.5): a bad value is refused.
                margin = form_input(page, "Margin")
                margin.fill("9")
                page.get_by_role("button", name="Submit").click()
                assert margin.evaluate("input => input.validity.rangeOverflow")
                assert "1.5" in margin.evaluate("input => input.validationMessage")
                for label, value in TYPED.items():
                    form_input(page, label).fill(value)
                run_id = submit_run(page)

            assert [str(run.id) for run in deployment_runs(client, deployment.id)] == [run_id]
            run = wait_for(
                lambda: (current := client.read_flow_run(run_id)).state.is_final() and current,
                RUN_TIMEOUT_SECONDS, "the UI-launched retrain run to finish", logs, every=5,
            )
            assert run.state.is_completed(), f"retrain run ended {run.state.name}: {run.state.message}"
            sent = run.parameters["config"]
            [artifact] = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-gate"]),
                                               flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )

    assert {name: sent[name] for name in EXPECTED_PARAMS} == EXPECTED_PARAMS
    new_models = set(registry.models_table(store).id) - models_before
    assert len(new_models) == 1, f"expected one new model version, got {sorted(new_models)}"
    model = registry.model_record(store, new_models.pop())
    training = registry.training_run(store, model["training_run_id"])
    assert training["status"] == "done" and training["model_id"] == model["id"]
    used = training["params"]["train_config"]
    assert {name: used[name] for name in EXPECTED_PARAMS} == EXPECTED_PARAMS
    assert {name: used[name] for name in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    assert [entry["epoch"] for entry in training["history"]] == [1]
    # The gate judged, with defaults, on people training never saw, and says how.
    assert training["metrics"]["judged"] is True and training["metrics"]["judged_by"] == "pseudo"
    assert training["metrics"]["gate_metric"] == "clustering_bcubed_f"
    assert "not measured" not in model["gate_reason"] and model["gate_reason"] == training["metrics"]["reason"]
    assert model["status"] in ("current", "rejected") and (model["status"] == "current") is training["metrics"]["promoted"]
    figures = {row["measure"]: row for row in json.loads(artifact.data)}
    current = training["metrics"]["current_metrics"]
    assert figures["clustering_bcubed_f"]["current"] == round(current["clustering_bcubed_f"], 4)
    assert figures["verification_auc"]["candidate"] == round(training["metrics"]["candidate_metrics"]["verification_auc"], 4)
    assert "pseudo-identities held out" in artifact.description and model["gate_reason"] in artifact.description

"""Shared test fixtures. Real photos come from ../shared/data (beside the checkout)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
SFACE_WEIGHTS = SHARED / "models" / "sface_2021dec_fp32.onnx"


def pytest_configure(config: pytest.Config) -> None:
    # Never let a developer's own settings or Prefect profile leak into tests.
    for name in list(os.environ):
        if name.startswith("FACEMINE_"):
            del os.environ[name]
    os.environ["FACEMINE_CONFIG"] = os.devnull  # no config file: an empty one (a missing one is an error)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    prefect_home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(config.rootpath) / ".pytest_cache" / "prefect-home")))
    # Prefect creates its home without parents: on a fresh checkout .pytest_cache does not exist yet.
    prefect_home.mkdir(parents=True, exist_ok=True)
    if not DATA.is_dir():
        raise pytest.UsageError(f"test data not found at {DATA}: check out the repo beside ../shared")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh facemine data folder, also the default for code reading Settings() from the environment."""
    folder = tmp_path / "facemine-data"
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the whole session (starting one costs ~11 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

"""Prefect flow `export`: a clustering run → a versioned dataset export, its card an artifact."""
from __future__ import annotations

from prefect import flow

from flows.artifacts import export_card_artifact
from pipeline.config import ExportConfig
from storage.exports import export_dataset
from storage.settings import Settings
from usecases.runtime import store_for


@flow(name="export")
def export(name: str, run_id: int | None = None, config: ExportConfig | None = None) -> dict:
    """Export a clustering run (default: the newest) with `config` (default: the settings' export parameters)."""
    settings = Settings()
    result = export_dataset(store_for(settings), name, config or settings.export, run_id=run_id)
    export_card_artifact(result)
    return result

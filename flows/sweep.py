"""Prefect flow `sweep`: several training configurations on one export, each candidate judged by
the same gate on the same held-out data, only the best promoted (usecases.training.sweep).

Its steps are the `retrain` flow's tasks, so every training and embedding takes the GPU
concurrency slot. A keyed table artifact (`sweep-gate`) lists every candidate's figures and outcome.
"""
from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.train import TASKS
from pipeline.config import TrainConfig
from pipeline.errors import FacemineError
from pipeline.gate import EMBEDDING_SPEED
from storage.settings import Settings
from usecases import training

# Values a grid may give a TrainConfig field (the UI's form takes them as JSON lists).
GridValue = float | int | str | bool


def sweep_artifact(summary: dict) -> None:
    """Keyed table artifact `sweep-gate`: the current model, then one row per candidate."""
    def figure(metrics: dict, name: str) -> float | None:
        value = metrics.get(name)
        return None if value is None else round(float(value), 4)

    candidates = summary["candidates"]
    metric = candidates[0]["gate_metric"] if candidates else "clustering_bcubed_f"
    speed = "faces/s"  # embedding speed, beside the quality figure (the gate's speed trade)
    rows = [{"model": f"{summary['parent_model_id']} (current)", "configuration": "",
             metric: figure(summary["current_metrics"], metric),
             speed: figure(summary["current_metrics"], EMBEDDING_SPEED), "outcome": ""}]
    rows += [{"model": str(entry["model_id"]), "configuration": str(entry["config"]),
              metric: figure(entry["candidate_metrics"], metric), speed: figure(entry["candidate_metrics"], EMBEDDING_SPEED),
              "outcome": ("promoted: " if entry["promoted"] else "") + entry["reason"]} for entry in candidates]
    rows += [{"model": "-", "configuration": str(entry["config"]), metric: None, speed: None,
              "outcome": f"failed: {entry['error']}"} for entry in summary["failed"]]
    best = summary["best_model_id"]
    outcome = f"model {best} promoted" if summary["promoted_model_id"] else (
        f"model {best} passed (promotion not requested)" if best else "no candidate passed the gate: kept the current model")
    create_table_artifact(key="sweep-gate", table=rows,
                          description=f"**{outcome}**\n\nJudged on {summary['judged_by_description']}.")


@flow(name="sweep")
def sweep(
    configs: Annotated[list[TrainConfig], Field(min_length=1)] = [TrainConfig()],  # noqa: B006 - Prefect copies parameters
    grid: dict[str, list[GridValue]] | None = None,
    export_id: Annotated[int | None, Field(ge=1)] = None,
    promote: bool = True,
    validation_pairs: str | None = None,
) -> dict:
    """Train several configurations on one dataset export and promote only the best candidate that
    passes the gate; every candidate stays in the registry with its figures.

    Args:
        configs: Training configurations to compare.
        grid: Optional grid crossed with each configuration: training parameter -> values, e.g.
            {"base_lr": [0.01, 0.003], "recipe": ["distill", "margin"]}.
        export_id: Dataset export to train on; empty: the newest.
        promote: Make the best candidate the current embedder when it passes the gate.
        validation_pairs: Held-out pairs CSV (path_a, path_b, same); empty: settings' gate.validation_pairs.
    """
    summary = training.sweep(Settings(), training.sweep_configs(configs, grid), export_id, promote, validation_pairs,
                             TASKS)
    sweep_artifact(summary)
    if not any(entry["judged"] for entry in summary["candidates"]):
        # As for `retrain`: a green Completed would read as "the gate looked and kept the current model".
        raise FacemineError(f"sweep: no candidate could be judged: {summary['candidates'][0]['reason']}")
    return summary

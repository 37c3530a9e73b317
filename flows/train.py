"""Prefect flow `retrain`: the retraining use case (usecases.training.retrain) with each step a
Prefect task (training and embedding inside the GPU concurrency slot), and the gate's outcome
as a keyed table artifact (`retrain-gate`: both models' figures and the decision). A candidate
that could not be judged fails the flow run.
"""
from __future__ import annotations

from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.gpu import gpu_slot
from pipeline.config import TrainConfig
from pipeline.errors import FacemineError
from pipeline.gate import ARCHITECTURE, BEST_BCUBED_F, EMBEDDING_SPEED
from storage.settings import Settings
from usecases import training
from usecases.holdout import Judge


@task(name="train-embedder")
def train_task(
    settings: Settings, training_run_id: int, base_model_id: int, export_path: str, held_out: list[str], config: TrainConfig
) -> dict:
    return training.train_candidate(settings, training_run_id, base_model_id, export_path, held_out, config, gpu_slot)


@task(name="register-candidate")
def register_task(settings: Settings, checkpoint: str, parent_id: int, training_run_id: int) -> int:
    return training.register_candidate(settings, checkpoint, parent_id, training_run_id)


@task(name="evaluate-model")
def evaluate_task(settings: Settings, model_id: int, judged_by: Judge, export_path: str) -> dict:
    return training.evaluate_model(settings, model_id, judged_by, export_path, gpu_slot)


TASKS = training.RetrainSteps(train=train_task, register=register_task, evaluate=evaluate_task)

# Rows of the gate's artifact: the measures both models are judged on, their embedding speed
# (faces/s, the gate's speed trade), then their operating points.
ARTIFACT_MEASURES = (
    "clustering_bcubed_f", "clustering_bcubed_precision", "clustering_bcubed_recall", "verification_auc",
    "verification_tar@far=0.001", "verification_tar@far=0.01", "verification_accuracy", EMBEDDING_SPEED,
    "clustering_floor", BEST_BCUBED_F, "clustering_best_floor",
)


def gate_artifact(summary: dict) -> None:
    """Keyed table artifact `retrain-gate`: both models' figures, the data that judged, the decision."""
    current, candidate = summary["current_metrics"], summary["candidate_metrics"]

    def figure(metrics: dict, name: str) -> float | None:
        value = metrics.get(name)
        return None if value is None else round(float(value), 4)

    rows = [{"measure": name, "current": figure(current, name), "candidate": figure(candidate, name)}
            for name in ARTIFACT_MEASURES]
    rows.append({"measure": ARCHITECTURE, "current": current.get(ARCHITECTURE), "candidate": candidate.get(ARCHITECTURE)})
    rows.append({"measure": "calibrated verification threshold",
                 "current": current.get("calibration", {}).get("verification_threshold"),
                 "candidate": candidate.get("calibration", {}).get("verification_threshold")})
    outcome = "promoted" if summary["promoted"] else ("NOT JUDGED" if not summary["judged"] else "kept the current model")
    create_table_artifact(
        key="retrain-gate", table=rows,
        description=f"**{outcome}** ({summary['gate_metric']}): {summary['reason']}\n\n"
                    f"Judged on {summary['judged_by_description']}.",
    )


def fail_unless_judged(summary: dict) -> None:
    # The run's state must say so: a green Completed would read as "the gate looked and kept SFace".
    if not summary["judged"]:
        raise FacemineError(
            f"training run {summary['training_run_id']}: model {summary['model_id']} was registered but {summary['reason']}"
        )


@flow(name="retrain")
def retrain(
    config: TrainConfig = TrainConfig(),
    export_id: Annotated[int | None, Field(ge=1)] = None,
    promote: bool = True,
    validation_pairs: str | None = None,
) -> dict:
    """Fine-tune the current embedder on a dataset export and promote the result only if it beats
    the current model on held-out people (settings.gate): configured validation data, else
    reviewed identities held out from training, else a share of pseudo-identities held out.

    Args:
        config: Training parameters.
        export_id: Dataset export to train on; empty: the newest.
        promote: Make the candidate the current embedder when it passes the gate.
        validation_pairs: Held-out pairs CSV (path_a, path_b, same); empty: settings' gate.validation_pairs.
    """
    summary = training.retrain(Settings(), config, export_id, promote, validation_pairs, TASKS)
    gate_artifact(summary)
    fail_unless_judged(summary)
    return summary

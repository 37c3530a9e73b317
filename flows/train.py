"""Prefect flow `retrain`: dataset export → fine-tuned embedder → registry → held-out gate.

    export ──choose who judges (configured photos / reviewed / pseudo-identities held out)──▶
    train on the rest (current model as base) ──▶ candidate ──register (parent, run, export)──▶
    calibrate both models on the same unlabelled faces ──▶ score both on the held-out people
    at their own operating points ──gate──▶ promoted, or kept with the reason

Every step is recorded: the `TrainingRun` goes running → done (or failed, with the error), its
history fills epoch by epoch, its metrics say which data judged the gate, and the candidate model
keeps its metrics, calibration and gate reason. A keyed table artifact (`retrain-gate`) shows both
models' figures and the decision. A candidate that could not be judged fails the flow run.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.gpu import gpu_slot
from flows.holdout import Judge, choose_judge, judge_metrics, training_samples
from pipeline.config import TrainConfig
from pipeline.errors import FacemineError
from pipeline.gate import GateVerdict, judge
from pipeline.train import filter_pseudo_labels, train_embedder
from storage import registry
from storage.settings import Settings
from usecases.runtime import current_embedder, load_embedder, store_for

EXPORT_VAL_PREFIX = "export_val_"


def training_folder(settings: Settings, training_run_id: int) -> Path:
    return settings.models_dir / f"training-run-{training_run_id:06d}"


@task(name="train-embedder")
def train_task(
    settings: Settings, training_run_id: int, base_model_id: int, export_path: str, held_out: list[str], config: TrainConfig
) -> dict:
    """Fine-tune the base model on an export's train split, validating on its val split, both
    without the `held_out` identities (they judge the gate)."""
    store = store_for(settings)
    base = store.model(base_model_id)
    embedder = load_embedder(base.kind, base.weights_path, settings.embed.device)
    samples = training_samples(registry.export_samples(export_path), held_out)
    confidence = registry.export_confidences(export_path)
    train = filter_pseudo_labels([(path, label, confidence[path]) for path, label in samples["train"]],
                                 config.min_label_confidence, config.min_identity_faces)
    kept = {label for _, label in train}
    samples = {"train": train, "val": [(path, label) for path, label in samples["val"] if label in kept]}
    out_dir = training_folder(settings, training_run_id)
    history: list[dict] = []

    def on_epoch(entry: dict) -> None:
        history.append(entry)
        registry.set_training_output(store, training_run_id, str(out_dir), history)
        get_run_logger().info("training run %d epoch %s", training_run_id, entry)

    registry.set_training_output(store, training_run_id, str(out_dir), history)
    with gpu_slot():
        result = train_embedder(embedder, samples["train"], samples["val"] or None, config, out_dir, progress=on_epoch)
    return {"checkpoint": str(result.checkpoint_path), "history": result.history, "baseline": result.baseline_metrics}


@task(name="register-candidate")
def register_task(settings: Settings, checkpoint: str, parent_id: int, training_run_id: int) -> int:
    store = store_for(settings)
    embedder = load_embedder("checkpoint", checkpoint, settings.embed.device)
    model = store.register_model(
        name=f"{embedder.kind}-run{training_run_id}",
        kind="checkpoint",  # the registry name that rebuilds it (its `kind` is the base architecture)
        weights_path=str(embedder.weights_path),
        weights_hash=embedder.weights_hash,
        embedding_dim=embedder.preprocessing.embedding_dim,
        preprocessing=dataclasses.asdict(embedder.preprocessing),
        parent_id=parent_id,
        training_run_id=training_run_id,
    )
    return model.id


@task(name="evaluate-model")
def evaluate_task(settings: Settings, model_id: int, judged_by: Judge, export_path: str) -> dict:
    return judge_metrics(settings, model_id, judged_by, registry.export_samples(export_path))


# Rows of the gate's artifact: the measures both models are judged on, then their operating points.
ARTIFACT_MEASURES = (
    "clustering_bcubed_f", "clustering_bcubed_precision", "clustering_bcubed_recall", "verification_auc",
    "verification_tar@far=0.001", "verification_tar@far=0.01", "verification_accuracy", "clustering_floor",
)


def gate_artifact(verdict: GateVerdict, judged_by: Judge, current: dict, candidate: dict, promoted: bool) -> None:
    """Keyed table artifact `retrain-gate`: both models' figures, the data that judged, the decision."""
    def figure(metrics: dict, name: str) -> float | None:
        value = metrics.get(name)
        return None if value is None else round(float(value), 4)

    rows = [{"measure": name, "current": figure(current, name), "candidate": figure(candidate, name)}
            for name in ARTIFACT_MEASURES]
    rows.append({"measure": "calibrated verification threshold",
                 "current": current.get("calibration", {}).get("verification_threshold"),
                 "candidate": candidate.get("calibration", {}).get("verification_threshold")})
    outcome = "promoted" if promoted else ("NOT JUDGED" if not verdict.judged else "kept the current model")
    create_table_artifact(
        key="retrain-gate", table=rows,
        description=f"**{outcome}** ({verdict.metric}): {verdict.reason}\n\nJudged on {judged_by.description}.",
    )


def _export_val(metrics: dict) -> dict:
    """train_embedder's val_* metrics (the export's own val split) under their gate names."""
    return {EXPORT_VAL_PREFIX + name.removeprefix("val_"): value for name, value in metrics.items() if name.startswith("val_")}


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
    settings = Settings()
    store = store_for(settings)
    gate = settings.gate
    pairs_csv = str(Path(validation_pairs).resolve()) if validation_pairs else gate.validation_pairs
    export = registry.pick_export(store, export_id)
    # Before training: a run nothing could judge fails now, not after minutes of training.
    judged_by = choose_judge(store, registry.export_samples(export["path"]), gate, pairs_csv)
    _, base = current_embedder(settings)
    params = {
        "train_config": config.model_dump(),
        "export": export,
        "base_model": {"id": base.id, "name": base.name, "weights_hash": base.weights_hash},
        "judged_by": {"source": judged_by.source, "description": judged_by.description,
                      "identities": list(judged_by.identities)},
        "validation_pairs": judged_by.pairs_csv,
        "validation_truth": judged_by.truth_csv,
        "gate": gate.model_dump(),
    }
    run_id = registry.start_training_run(store, base.id, export["id"], params)
    logger = get_run_logger()
    logger.info("training run %d: model %s on export %s v%d; judged on %s",
                run_id, base.name, export["name"], export["version"], judged_by.description)
    try:
        started = time.perf_counter()
        trained = train_task(settings, run_id, base.id, export["path"], list(judged_by.identities), config)
        train_seconds = time.perf_counter() - started
        model_id = register_task(settings, trained["checkpoint"], base.id, run_id)
        started = time.perf_counter()
        current = evaluate_task(settings, base.id, judged_by, export["path"]) | _export_val(trained["baseline"])
        last_epoch = trained["history"][-1]
        candidate = evaluate_task(settings, model_id, judged_by, export["path"]) | _export_val(last_epoch)
        evaluate_seconds = time.perf_counter() - started
        registry.update_model_metrics(store, model_id, candidate)
        verdict = judge(candidate, current, gate)
        promoted = registry.record_gate(store, model_id, verdict.passed, verdict.reason, promote)
        summary = {
            "training_run_id": run_id,
            "model_id": model_id,
            "parent_model_id": base.id,
            "export_id": export["id"],
            "promoted": promoted,
            "judged": verdict.judged,
            "gate_passed": verdict.passed,
            "reason": verdict.reason,
            "gate_metric": verdict.metric,
            "judged_by": judged_by.source,
            "judged_by_description": judged_by.description,
            "candidate_metrics": candidate,
            "current_metrics": current,
            "history": trained["history"],
            "checkpoint": trained["checkpoint"],
            "seconds": {"train": round(train_seconds, 3), "evaluate": round(evaluate_seconds, 3)},
        }
        registry.finish_training_run(
            store, run_id, model_id, trained["history"],
            {key: summary[key] for key in ("candidate_metrics", "current_metrics", "gate_metric", "gate_passed",
                                           "judged", "judged_by", "judged_by_description", "promoted", "reason",
                                           "seconds")},
        )
    except BaseException as error:
        registry.fail_training_run(store, run_id, repr(error))
        raise
    gate_artifact(verdict, judged_by, current, candidate, promoted)
    logger.info("training run %d -> model %d: %s (judged on %s)", run_id, model_id, verdict.reason, judged_by.description)
    if not verdict.judged:
        # The run's state must say so: a green Completed would read as "the gate looked and kept SFace".
        raise FacemineError(f"training run {run_id}: model {model_id} was registered but {verdict.reason}")
    return summary

"""Prefect flow `retrain`: dataset export → fine-tuned embedder → registry → held-out gate.

    export ──train (current model as base)──▶ candidate ──register (parent, run, export)──▶
    held-out metrics of candidate and current ──gate──▶ promoted, or kept with the reason

Every step is recorded: the `TrainingRun` goes running → done (or failed, with the error),
its history fills epoch by epoch, and the candidate model keeps its metrics and gate reason.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger, task
from pydantic import Field

from flows.gpu import gpu_slot
from flows.holdout import holdout_metrics, load_holdout
from flows.runtime import current_embedder, load_embedder, settings_from, settings_payload, store_for
from pipeline.config import TrainConfig
from pipeline.gate import gate_decision
from pipeline.train import train_embedder
from storage import registry
from storage.settings import Settings

EXPORT_VAL_PREFIX = "export_val_"


def training_folder(settings: Settings, training_run_id: int) -> Path:
    return settings.models_dir / f"training-run-{training_run_id:06d}"


@task(name="train-embedder")
def train_task(payload: str, training_run_id: int, base_model_id: int, export_path: str, config: TrainConfig) -> dict:
    """Fine-tune the base model on an export's train split, validating on its val split."""
    settings, store = settings_from(payload), store_for(payload)
    base = store.model(base_model_id)
    embedder = load_embedder(base.kind, base.weights_path, settings.embed.device)
    samples = registry.export_samples(export_path)
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
def register_task(payload: str, checkpoint: str, parent_id: int, training_run_id: int) -> int:
    settings, store = settings_from(payload), store_for(payload)
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
def evaluate_task(payload: str, model_id: int, pairs_csv: str | None, truth_csv: str | None) -> dict:
    return holdout_metrics(payload, model_id, load_holdout(settings_from(payload), pairs_csv, truth_csv))


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
    the current model on the held-out gate metric (settings.gate).

    Args:
        config: Training parameters.
        export_id: Dataset export to train on; empty: the newest.
        promote: Make the candidate the current embedder when it passes the gate.
        validation_pairs: Held-out pairs CSV (path_a, path_b, same); empty: settings' gate.validation_pairs.
    """
    settings = Settings()
    payload = settings_payload(settings)
    store = store_for(payload)
    gate = settings.gate
    pairs_csv = str(Path(validation_pairs).resolve()) if validation_pairs else gate.validation_pairs
    export = registry.pick_export(store, export_id)
    _, base = current_embedder(payload)
    params = {
        "train_config": config.model_dump(),
        "export": export,
        "base_model": {"id": base.id, "name": base.name, "weights_hash": base.weights_hash},
        "validation_pairs": pairs_csv,
        "validation_truth": gate.validation_truth,
        "gate": gate.model_dump(),
    }
    run_id = registry.start_training_run(store, base.id, export["id"], params)
    logger = get_run_logger()
    logger.info("training run %d: model %s on export %s v%d", run_id, base.name, export["name"], export["version"])
    try:
        started = time.perf_counter()
        trained = train_task(payload, run_id, base.id, export["path"], config)
        train_seconds = time.perf_counter() - started
        model_id = register_task(payload, trained["checkpoint"], base.id, run_id)
        started = time.perf_counter()
        current = evaluate_task(payload, base.id, pairs_csv, gate.validation_truth) | _export_val(trained["baseline"])
        last_epoch = trained["history"][-1]
        candidate = evaluate_task(payload, model_id, pairs_csv, gate.validation_truth) | _export_val(last_epoch)
        evaluate_seconds = time.perf_counter() - started
        registry.update_model_metrics(store, model_id, candidate)
        passed, reason = gate_decision(candidate, current, gate.metric, gate.min_improvement)
        if gate.metric not in candidate:
            reason += (": give held-out data (gate.validation_pairs / gate.validation_truth, e.g. "
                       "FACEMINE_GATE__VALIDATION_PAIRS=pairs.csv) or choose another gate.metric")
        promoted = registry.record_gate(store, model_id, passed, reason, promote)
        summary = {
            "training_run_id": run_id,
            "model_id": model_id,
            "parent_model_id": base.id,
            "export_id": export["id"],
            "promoted": promoted,
            "gate_passed": passed,
            "reason": reason,
            "gate_metric": gate.metric,
            "candidate_metrics": candidate,
            "current_metrics": current,
            "history": trained["history"],
            "checkpoint": trained["checkpoint"],
            "seconds": {"train": round(train_seconds, 3), "evaluate": round(evaluate_seconds, 3)},
        }
        registry.finish_training_run(
            store, run_id, model_id, trained["history"],
            {key: summary[key] for key in ("candidate_metrics", "current_metrics", "gate_metric", "gate_passed",
                                           "promoted", "reason", "seconds")},
        )
    except BaseException as error:
        registry.fail_training_run(store, run_id, repr(error))
        raise
    logger.info("training run %d -> model %d: %s", run_id, model_id, reason)
    return summary

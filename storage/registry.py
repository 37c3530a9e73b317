"""Model registry: training runs, trained models with their lineage and gate outcome, loop iterations.

Lineage of a trained model: `Model.parent_id` (the model it was fine-tuned from) and
`Model.training_run_id` -> `TrainingRun` (dataset export, parameters, per-epoch history, metrics).
A model the gate did not promote is kept with status "rejected" (or "candidate" when promotion
was not asked for) and the reason in `Model.gate_reason`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select, update

from pipeline.config import ClusterConfig
from pipeline.errors import FacemineError
from pipeline.hashing import is_url, open_input
from storage.schema import DatasetExport, LoopIteration, Model, TrainingRun
from storage.store import Store

EXPORT_SPLITS = ("train", "val")


# ---- what training reads --------------------------------------------------------------------


def pick_export(store: Store, export_id: int | None = None) -> dict:
    """The export `export_id`, default the newest one."""
    with store.session() as session:
        if export_id is None:
            row = session.scalar(select(DatasetExport).order_by(DatasetExport.id.desc()).limit(1))
            if row is None:
                raise FacemineError("no dataset export yet: run `facemine export NAME` first")
        else:
            row = session.get(DatasetExport, export_id)
            if row is None:
                raise FacemineError(f"dataset export {export_id} does not exist")
        return {"id": row.id, "name": row.name, "version": row.version, "path": row.path,
                "run_id": row.run_id, "model_id": row.model_id}


def _export_file(export_path: str | Path, relative: str) -> Path | str:
    """A file of an export: a path in a folder root, a URL on object storage (read with
    `pipeline.hashing.open_input`)."""
    return f"{str(export_path).rstrip('/')}/{relative}" if is_url(str(export_path)) else Path(export_path) / relative


def _manifest(export_path: str | Path, columns: list[str]) -> pd.DataFrame:
    try:
        with open_input(_export_file(export_path, "manifest.parquet")) as file:
            return pd.read_parquet(file, columns=columns)
    except OSError:
        raise FacemineError(f"export folder {export_path} has no manifest.parquet: was it moved or deleted?") from None


def export_samples(export_path: str | Path) -> dict[str, list[tuple[Path | str, str]]]:
    """(chip file, identity) per split ("train", "val") from an export's manifest."""
    manifest = _manifest(export_path, ["identity", "chip_path", "split"])
    return {
        split: [(_export_file(export_path, chip), str(identity)) for chip, identity in zip(rows.chip_path, rows.identity)]
        for split in EXPORT_SPLITS
        for rows in [manifest[manifest.split == split]]
    }


def export_confidences(export_path: str | Path) -> dict[Path | str, float]:
    """chip file -> the confidence its clustering assigned the face with."""
    manifest = _manifest(export_path, ["chip_path", "confidence", "split"])
    exported = manifest[manifest.split.isin(EXPORT_SPLITS)]
    return {_export_file(export_path, chip): float(confidence) for chip, confidence in zip(exported.chip_path, exported.confidence)}


# ---- training runs ----------------------------------------------------------------------------


def start_training_run(store: Store, parent_model_id: int, export_id: int, params: dict) -> int:
    with store.session() as session:
        row = TrainingRun(parent_model_id=parent_model_id, export_id=export_id, params=params, status="running",
                          metrics={}, history=[])
        session.add(row)
        session.flush()
        return row.id


def set_training_output(store: Store, run_id: int, checkpoint_dir: str, history: list[dict]) -> None:
    """Where the run writes, and its per-epoch history so far (shown while it trains)."""
    with store.session() as session:
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run_id).values(checkpoint_dir=checkpoint_dir, history=history)
        )


def finish_training_run(store: Store, run_id: int, model_id: int, history: list[dict], metrics: dict) -> None:
    with store.session() as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(model_id=model_id, history=history, metrics=metrics, status="done",
                    finished_at=datetime.now(timezone.utc))
        )


def fail_training_run(store: Store, run_id: int, error: str) -> None:
    with store.session() as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(status="failed", metrics={"error": error}, finished_at=datetime.now(timezone.utc))
        )


def training_run(store: Store, run_id: int) -> dict:
    with store.session() as session:
        row = session.get_one(TrainingRun, run_id)
        return {
            "id": row.id, "parent_model_id": row.parent_model_id, "export_id": row.export_id,
            "model_id": row.model_id, "params": dict(row.params), "metrics": dict(row.metrics),
            "history": list(row.history), "checkpoint_dir": row.checkpoint_dir, "status": row.status,
            "created_at": row.created_at, "finished_at": row.finished_at,
        }


# ---- models -----------------------------------------------------------------------------------


def model_record(store: Store, model_id: int) -> dict:
    """Everything the registry knows about one model (status, metrics, gate reason, lineage ids)."""
    with store.session() as session:
        row = session.get_one(Model, model_id)
        return {
            "id": row.id, "name": row.name, "kind": row.kind, "status": row.status, "is_current": row.is_current,
            "parent_id": row.parent_id, "training_run_id": row.training_run_id, "weights_path": row.weights_path,
            "metrics": dict(row.metrics or {}), "gate_reason": row.gate_reason, "created_at": row.created_at,
        }


def update_model_metrics(store: Store, model_id: int, metrics: dict) -> None:
    """Merge `metrics` into the model's stored metrics."""
    with store.session() as session:
        row = session.get_one(Model, model_id)
        row.metrics = {**(row.metrics or {}), **metrics}


def calibrated_cluster_config(store: Store, model_id: int, config: ClusterConfig) -> ClusterConfig:
    """`config` with a trained model's own calibrated floor (pipeline.calibration) once it has one.

    The settings' floor was measured for the configured embedder (benchmarks/cluster_quality.py),
    so a model without a parent keeps it; a fine-tuned model's similarity scale differs, and a floor
    tuned for another model means nothing for it."""
    record = model_record(store, model_id)
    calibration = record["metrics"].get("calibration")
    if record["parent_id"] is None or not calibration:
        return config
    return config.model_copy(update={"min_similarity": calibration["cluster_min_similarity"]})


def record_gate(store: Store, model_id: int, passed: bool, reason: str, promote: bool) -> bool:
    """Store the gate's verdict on a candidate; promote it when it passed and promotion was asked
    for. Returns whether it became the current model."""
    if passed and promote:
        store.set_current_model(model_id, reason)
        return True
    status, note = ("candidate", f"{reason} (promotion not requested)") if passed else ("rejected", reason)
    with store.session() as session:
        session.execute(update(Model).where(Model.id == model_id).values(status=status, gate_reason=note))
    return False


def lineage(store: Store, model_id: int) -> list[dict]:
    """The model, its parent, its parent's parent, ... each with its training run's export and params."""
    chain: list[dict] = []
    seen: set[int] = set()
    next_id: int | None = model_id
    while next_id is not None and next_id not in seen:
        seen.add(next_id)
        record = model_record(store, next_id)
        if record["training_run_id"] is not None:
            run = training_run(store, record["training_run_id"])
            record["export_id"], record["train_params"] = run["export_id"], run["params"]
        chain.append(record)
        next_id = record["parent_id"]
    return chain


def models_table(store: Store) -> pd.DataFrame:
    """One row per registered model, oldest first, with its training run's export and parameters
    (`train_params`, {} without a run) and its metrics: one query, however many models."""
    query = (
        select(Model.id, Model.name, Model.kind, Model.status, Model.parent_id, Model.training_run_id,
               TrainingRun.export_id, Model.gate_reason, Model.created_at, Model.metrics,
               TrainingRun.params.label("train_params"))
        .outerjoin(TrainingRun, TrainingRun.id == Model.training_run_id)
        .order_by(Model.id)
    )
    with store.session() as session:
        rows = session.execute(query).mappings().all()
    table = pd.DataFrame(rows, columns=[c.key for c in query.selected_columns])
    table["train_params"] = [params or {} for params in table.train_params]
    table["metrics"] = [metrics or {} for metrics in table.metrics]
    return table.astype({"parent_id": "Int64", "training_run_id": "Int64", "export_id": "Int64"})


# ---- closed-loop iterations ---------------------------------------------------------------------


def next_loop_iteration(store: Store, loop_name: str) -> int:
    """Iteration numbers of a loop continue across its runs."""
    with store.session() as session:
        last = session.scalar(select(func.max(LoopIteration.iteration)).where(LoopIteration.loop_name == loop_name))
    return (last or 0) + 1


def add_loop_iteration(
    store: Store,
    loop_name: str,
    iteration: int,
    model_id: int,
    run_id: int,
    export_id: int,
    training_run_id: int,
    promoted: bool,
    metrics: dict,
) -> int:
    with store.session() as session:
        row = LoopIteration(loop_name=loop_name, iteration=iteration, model_id=model_id, run_id=run_id,
                            export_id=export_id, training_run_id=training_run_id, promoted=promoted, metrics=metrics)
        session.add(row)
        session.flush()
        return row.id


def loop_iterations(store: Store, loop_name: str) -> list[dict]:
    """Stored iterations of one loop, in order."""
    with store.session() as session:
        rows = session.scalars(
            select(LoopIteration).where(LoopIteration.loop_name == loop_name).order_by(LoopIteration.iteration)
        ).all()
        return [
            {"iteration": row.iteration, "model_id": row.model_id, "run_id": row.run_id, "export_id": row.export_id,
             "training_run_id": row.training_run_id, "promoted": row.promoted, "metrics": dict(row.metrics),
             "created_at": row.created_at}
            for row in rows
        ]


def loop_names(store: Store) -> list[str]:
    with store.session() as session:
        return list(session.scalars(select(LoopIteration.loop_name).distinct().order_by(LoopIteration.loop_name)))

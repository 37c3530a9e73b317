"""The closed loop: mined faces → identities → dataset → better model → better identities.

    cluster (embed with the current model first) ─▶ per iteration:
        export ─▶ retrain ─▶ gate ─▶ promoted? re-embed + re-cluster with the new model ─▶ churn

`run_loop` is the loop's logic; its stages come as `LoopSteps` (the `closed_loop` flow passes its
subflows and tasks). Detection and alignment are never repeated: re-embedding re-reads the stored
chips (re-cut from stored landmarks when a model needs another template). A trained model clusters
at its own calibrated floor (stored on its row by the gate, pipeline.calibration), never at a floor
tuned for another model (`storage.registry.calibrated_cluster_config`). Review decisions hold
because every clustering obeys them. Each iteration is stored as a `LoopIteration` (metrics of
current and candidate, identities, label churn, stage times); `loop_table` and `plot_loop` show
them. The loop stops early when no model is promoted (settings.gate.patience iterations in a row)
or when a promotion changes fewer than `min_churn` of the labels.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from pipeline.config import TrainConfig
from pipeline.gate import EMBEDDING_SPEED, label_churn, should_stop
from storage import identities as identity_store
from storage import registry
from storage.settings import Settings
from storage.store import Store
from usecases.runtime import store_for

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


@dataclass(frozen=True)
class LoopSteps:
    """The loop's stages."""

    embed_and_cluster: Callable[[Settings], int]  # embed unseen faces, cluster; the clustering run's id
    export: Callable[..., dict]  # (name=, run_id=) -> storage.exports.export_dataset's summary
    retrain: Callable[..., dict]  # (config=, export_id=) -> usecases.training.retrain's summary


def run_labels(store: Store, run_id: int) -> dict[int, int | None]:
    """face id -> identity id (None: unassigned) of a clustering run."""
    table = identity_store.assignments(store, run_id)
    return {int(face): None if pd.isna(identity) else int(identity) for face, identity in zip(table.face_id, table.identity_id)}


def _timed(stage: str, seconds: dict[str, float], call: Callable[..., Result], *args: object, **kwargs: object) -> Result:
    started = time.perf_counter()
    result = call(*args, **kwargs)
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - started, 3)
    return result


def run_loop(
    settings: Settings,
    steps: LoopSteps,
    iterations: int,
    loop_name: str,
    config: TrainConfig,
    min_churn: float,
    export_name: str,
) -> dict:
    """Run up to `iterations` rounds of export → retrain → gate → re-cluster on the current store."""
    store = store_for(settings)
    seconds: dict[str, float] = {}
    run_id = _timed("embed_cluster", seconds, steps.embed_and_cluster, settings)
    first = registry.next_loop_iteration(store, loop_name)
    history: list[dict] = []
    stop_reason = ""
    for step in range(iterations):
        iteration = first + step
        exported = _timed("export", seconds, steps.export, name=export_name, run_id=run_id)
        # Each iteration draws its own batches and augmentations: a retry after a rejected
        # candidate (gate.patience > 1) is then not the same training again.
        iteration_config = config.model_copy(update={"seed": config.seed + step})
        trained = _timed("retrain", seconds, steps.retrain, config=iteration_config, export_id=exported["export_id"])
        seconds |= {f"retrain_{stage}": value for stage, value in trained["seconds"].items()}
        before = after = identity_store.run_info(store, run_id)
        churn = None
        if trained["promoted"]:
            new_run_id = _timed("reembed_cluster", seconds, steps.embed_and_cluster, settings)
            churn = label_churn(run_labels(store, run_id), run_labels(store, new_run_id))
            run_id, after = new_run_id, identity_store.run_info(store, new_run_id)
        entry = {
            "promoted": trained["promoted"],
            "churn": churn,
            "gate_metric": trained["gate_metric"],
            "gate_reason": trained["reason"],
            "judged_by": trained["judged_by"],
            "judged_by_description": trained["judged_by_description"],
            "current": trained["current_metrics"],
            "candidate": trained["candidate_metrics"],
            "candidate_model_id": trained["model_id"],
            "identities_before": before["stats"].get("identities"),
            "identities": after["stats"].get("identities"),
            "faces": after["stats"].get("faces"),
            "export": {key: exported[key] for key in ("name", "version", "identities", "train_faces", "val_faces")},
            "training": trained["history"][-1],
            "seconds": seconds,
        }
        model = store.current_model()
        registry.add_loop_iteration(
            store, loop_name, iteration, model.id, run_id, exported["export_id"], trained["training_run_id"],
            trained["promoted"], entry,
        )
        history.append(entry)
        logger.info("loop %r iteration %d: %s; churn %s", loop_name, iteration, trained["reason"], churn)
        seconds = {}
        stop, stop_reason = should_stop(history, min_churn, settings.gate.patience)
        if stop:
            logger.info("loop %r stops: %s", loop_name, stop_reason)
            break
    return {
        "loop_name": loop_name,
        "iterations": list(range(first, first + len(history))),
        "promoted": [entry["promoted"] for entry in history],
        "stopped_early": len(history) < iterations,
        "stop_reason": stop_reason,
        "model_id": store.current_model().id,
        "run_id": run_id,
    }


# ---- report ------------------------------------------------------------------------------------


def loop_table(store: Store, loop_name: str) -> pd.DataFrame:
    """One row per stored iteration: which data judged the gate, gate metric and embedding speed
    (faces/s) of current and candidate, decision, identities, churn, time."""
    rows = []
    for stored in registry.loop_iterations(store, loop_name):
        metrics = stored["metrics"]
        metric = metrics["gate_metric"]
        rows.append({
            "iteration": stored["iteration"],
            "gate_metric": metric,
            # Older iterations predate the record of what judged them.
            "judged_by": metrics.get("judged_by", "not recorded"),
            "current": metrics["current"].get(metric),
            "candidate": metrics["candidate"].get(metric),
            # Older iterations predate the speed measurement.
            "current_faces/s": _rounded(metrics["current"].get(EMBEDDING_SPEED)),
            "candidate_faces/s": _rounded(metrics["candidate"].get(EMBEDDING_SPEED)),
            "promoted": stored["promoted"],
            "model_id": stored["model_id"],
            "identities": metrics["identities"],
            "churn": metrics["churn"],
            "seconds": round(sum(value for stage, value in metrics["seconds"].items() if not stage.startswith("retrain_")), 1),
            "gate_reason": metrics["gate_reason"],
        })
    return pd.DataFrame(rows)


def _rounded(faces_per_second: float | None) -> float | None:
    return None if faces_per_second is None else round(faces_per_second, 1)


def plot_loop(table: pd.DataFrame, path: Path, title: str) -> Path:
    """PNG of the gate metric (current vs candidate) and the label churn per iteration."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (metric_axis, churn_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    metric_axis.plot(table.iteration, table.current, "o-", label="current model")
    metric_axis.plot(table.iteration, table.candidate, "s--", label="candidate")
    promoted = table[table.promoted]
    metric_axis.scatter(promoted.iteration, promoted.candidate, s=120, facecolors="none", edgecolors="green",
                        label="promoted")
    metric_axis.set_ylabel(str(table.gate_metric.iloc[-1]) if len(table) else "gate metric")
    metric_axis.legend()
    metric_axis.set_title(title)
    churn_axis.bar(table.iteration, table.churn.fillna(0.0).astype(float))
    churn_axis.set_ylabel("label churn")
    churn_axis.set_xlabel("iteration")
    churn_axis.set_xticks(table.iteration.tolist())
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

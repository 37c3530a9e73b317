"""Retraining: dataset export → fine-tuned embedder → registry → held-out gate.

    export ──choose who judges (configured photos / reviewed / pseudo-identities held out)──▶
    train on the rest (current model as base) ──▶ candidate ──register (parent, run, export)──▶
    calibrate both models on the same unlabelled faces (timing their embedding speed) ──▶ score
    both on the held-out people at their own operating points ──gate──▶ promoted (better, or a
    speed trade), or kept with the reason

Every step is recorded: the `TrainingRun` goes running → done (or failed, with the error), its
history fills epoch by epoch, its metrics say which data judged the gate, and the candidate model
keeps its metrics, calibration and gate reason.

`retrain` runs the steps in order; each step is one function (`train_candidate`,
`register_candidate`, `evaluate_model`) that `RetrainSteps` names, so the `retrain` flow runs
the same sequence with each step as a Prefect task (and the GPU slot), and a plain caller
without Prefect.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sklearn.model_selection import ParameterGrid

from pipeline.config import TrainConfig
from pipeline.errors import FacemineError
from pipeline.gate import GateVerdict, judge
from pipeline.train import filter_pseudo_labels, train_embedder
from storage import registry
from storage.settings import Settings
from storage.store import ModelInfo
from usecases.holdout import (
    GpuSlot,
    Judge,
    choose_judge,
    judge_metrics,
    training_samples,
)
from usecases.runtime import current_model, load_embedder, register, store_for

logger = logging.getLogger(__name__)

EXPORT_VAL_PREFIX = "export_val_"
# What the training run's metrics keep of a retrain's summary.
RUN_METRICS = ("candidate_metrics", "current_metrics", "gate_metric", "gate_passed", "judged", "judged_by",
               "judged_by_description", "promoted", "reason", "seconds")


def training_folder(settings: Settings, training_run_id: int) -> Path:
    return settings.models_dir / f"training-run-{training_run_id:06d}"


def train_candidate(
    settings: Settings,
    training_run_id: int,
    base_model_id: int,
    export_path: str,
    held_out: list[str],
    config: TrainConfig,
    gpu: GpuSlot = nullcontext,
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
        logger.info("training run %d epoch %s", training_run_id, entry)

    registry.set_training_output(store, training_run_id, str(out_dir), history)
    with gpu():
        result = train_embedder(embedder, samples["train"], samples["val"] or None, config, out_dir, progress=on_epoch)
    return {"checkpoint": str(result.checkpoint_path), "history": result.history, "baseline": result.baseline_metrics}


def register_candidate(settings: Settings, checkpoint: str, parent_id: int, training_run_id: int) -> int:
    """Register a trained checkpoint as a child of `parent_id`; its id."""
    embedder = load_embedder("checkpoint", checkpoint, settings.embed.device)
    model = register(store_for(settings), embedder, name=f"{embedder.kind}-run{training_run_id}",
                     parent_id=parent_id, training_run_id=training_run_id)
    return model.id


def evaluate_model(settings: Settings, model_id: int, judged_by: Judge, export_path: str, gpu: GpuSlot = nullcontext) -> dict:
    """The model's held-out figures at its own calibrated operating point, with its architecture and
    the embedding speed timed while calibrating it (usecases.holdout.judge_metrics)."""
    return judge_metrics(settings, model_id, judged_by, registry.export_samples(export_path), gpu)


@dataclass(frozen=True)
class RetrainSteps:
    """How each step runs: plain calls by default; the flows pass Prefect tasks of the same signatures."""

    train: Callable[..., dict] = train_candidate
    register: Callable[..., int] = register_candidate
    evaluate: Callable[..., dict] = evaluate_model


@dataclass(frozen=True)
class Judging:
    """What every candidate trained from one export is judged against: the same base model and held-out data."""

    export: dict
    base: ModelInfo
    judged_by: Judge


def prepare_judging(settings: Settings, export_id: int | None, validation_pairs: str | None) -> Judging:
    """The export (default: newest), the current model, and who judges. Runs before any training:
    a run nothing could judge fails now, not after minutes of training."""
    store = store_for(settings)
    pairs_csv = str(Path(validation_pairs).resolve()) if validation_pairs else settings.gate.validation_pairs
    export = registry.pick_export(store, export_id)
    judged_by = choose_judge(store, registry.export_samples(export["path"]), settings.gate, pairs_csv)
    base = current_model(settings)
    return Judging(export, base, judged_by)


def start_training_run(settings: Settings, judging: Judging, config: TrainConfig, **extra: object) -> int:
    """Record a running TrainingRun with everything it depends on; its id."""
    export, base, judged_by = judging.export, judging.base, judging.judged_by
    params = {
        "train_config": config.model_dump(),
        "export": export,
        "base_model": {"id": base.id, "name": base.name, "weights_hash": base.weights_hash},
        "judged_by": {"source": judged_by.source, "description": judged_by.description,
                      "identities": list(judged_by.identities)},
        "validation_pairs": judged_by.pairs_csv,
        "validation_truth": judged_by.truth_csv,
        "gate": settings.gate.model_dump(),
        **extra,
    }
    run_id = registry.start_training_run(store_for(settings), base.id, export["id"], params)
    logger.info("training run %d: model %s on export %s v%d; judged on %s",
                run_id, base.name, export["name"], export["version"], judged_by.description)
    return run_id


def export_val(metrics: dict) -> dict:
    """train_embedder's val_* metrics (the export's own val split) under their gate names."""
    return {EXPORT_VAL_PREFIX + name.removeprefix("val_"): value for name, value in metrics.items() if name.startswith("val_")}


@contextmanager
def _failure_recorded(settings: Settings, run_id: int) -> Iterator[None]:
    try:
        yield
    except BaseException as error:
        registry.fail_training_run(store_for(settings), run_id, repr(error))
        raise


def _train_and_register(
    settings: Settings, judging: Judging, run_id: int, config: TrainConfig, steps: RetrainSteps
) -> tuple[dict, int, float]:
    """(training result, candidate model id, training seconds) of one training run."""
    started = time.perf_counter()
    trained = steps.train(settings, run_id, judging.base.id, judging.export["path"], list(judging.judged_by.identities), config)
    train_seconds = time.perf_counter() - started
    return trained, steps.register(settings, trained["checkpoint"], judging.base.id, run_id), train_seconds


def _summary(judging: Judging, run_id: int, model_id: int, trained: dict, verdict: GateVerdict, promoted: bool,
             reason: str, current: dict, candidate: dict, seconds: dict) -> dict:
    return {
        "training_run_id": run_id,
        "model_id": model_id,
        "parent_model_id": judging.base.id,
        "export_id": judging.export["id"],
        "promoted": promoted,
        "judged": verdict.judged,
        "gate_passed": verdict.passed,
        "reason": reason,
        "gate_metric": verdict.metric,
        "judged_by": judging.judged_by.source,
        "judged_by_description": judging.judged_by.description,
        "candidate_metrics": candidate,
        "current_metrics": current,
        "history": trained["history"],
        "checkpoint": trained["checkpoint"],
        "seconds": seconds,
    }


def _finish(settings: Settings, summary: dict) -> None:
    registry.finish_training_run(store_for(settings), summary["training_run_id"], summary["model_id"],
                                 summary["history"], {key: summary[key] for key in RUN_METRICS})
    logger.info("training run %d -> model %d: %s (judged on %s)", summary["training_run_id"], summary["model_id"],
                summary["reason"], summary["judged_by_description"])


def retrain(
    settings: Settings,
    config: TrainConfig,
    export_id: int | None = None,
    promote: bool = True,
    validation_pairs: str | None = None,
    steps: RetrainSteps = RetrainSteps(),
) -> dict:
    """Fine-tune the current embedder on a dataset export and promote the result only if it beats
    the current model on held-out people (settings.gate). Returns the run's summary; a candidate
    that could not be judged is registered and rejected (`summary["judged"]` is False)."""
    store = store_for(settings)
    judging = prepare_judging(settings, export_id, validation_pairs)
    export, base, judged_by = judging.export, judging.base, judging.judged_by
    run_id = start_training_run(settings, judging, config)
    with _failure_recorded(settings, run_id):
        trained, model_id, train_seconds = _train_and_register(settings, judging, run_id, config, steps)
        started = time.perf_counter()
        current = steps.evaluate(settings, base.id, judged_by, export["path"]) | export_val(trained["baseline"])
        candidate = steps.evaluate(settings, model_id, judged_by, export["path"]) | export_val(trained["history"][-1])
        evaluate_seconds = time.perf_counter() - started
        registry.update_model_metrics(store, model_id, candidate)
        verdict = judge(candidate, current, settings.gate)
        promoted = registry.record_gate(store, model_id, verdict.passed, verdict.reason, promote)
        seconds = {"train": round(train_seconds, 3), "evaluate": round(evaluate_seconds, 3)}
        summary = _summary(judging, run_id, model_id, trained, verdict, promoted, verdict.reason, current, candidate,
                           seconds)
        _finish(settings, summary)
    return summary


# ---- sweeps ----------------------------------------------------------------------------------------

# Most configurations one sweep trains (each is a full training run).
MAX_SWEEP_CONFIGS = 16


def sweep_configs(configs: list[TrainConfig], grid: dict[str, list] | None = None) -> list[TrainConfig]:
    """Each of `configs` crossed with every combination of the `grid`'s values (TrainConfig field ->
    values; scikit-learn's ParameterGrid orders them), duplicates dropped in order."""
    combinations = list(ParameterGrid(grid or {}))
    unknown = sorted(set(grid or {}) - set(TrainConfig.model_fields))
    if unknown:
        raise FacemineError(f"sweep grid: {', '.join(unknown)} is not a training parameter")
    expanded: list[TrainConfig] = []
    for config in configs:
        for changes in combinations:
            try:
                candidate = TrainConfig.model_validate(config.model_dump() | changes)
            except ValidationError as error:
                raise FacemineError(f"sweep grid {changes}: {error.errors()[0]['msg']}") from None
            if candidate not in expanded:
                expanded.append(candidate)
    if not expanded:
        raise FacemineError("a sweep needs at least one training configuration")
    if len(expanded) > MAX_SWEEP_CONFIGS:
        raise FacemineError(f"the sweep has {len(expanded)} configurations; at most {MAX_SWEEP_CONFIGS} (each is a training run)")
    return expanded


def _config_changes(config: TrainConfig, first: TrainConfig) -> dict:
    """What tells a sweep's configuration apart: its fields that differ from the first one's."""
    return {name: value for name, value in config.model_dump().items() if getattr(first, name) != value}


@dataclass
class _SweepRun:
    run_id: int
    config: TrainConfig
    trained: dict
    model_id: int
    train_seconds: float
    current: dict | None = None  # the current model's figures with this run's export_val_* baseline
    candidate: dict | None = None
    verdict: GateVerdict | None = None
    evaluate_seconds: float = 0.0


def sweep(
    settings: Settings,
    configs: list[TrainConfig],
    export_id: int | None = None,
    promote: bool = True,
    validation_pairs: str | None = None,
    steps: RetrainSteps = RetrainSteps(),
) -> dict:
    """Train every configuration on the same export, judge each candidate by the gate against the
    current model on the same held-out data, and promote only the best one that passes (highest gate
    metric; the earlier one on a tie). Every candidate stays registered with its figures and reason.

    A configuration whose training fails is recorded as a failed run and the others go on; the
    sweep raises only when every one failed."""
    store = store_for(settings)
    judging = prepare_judging(settings, export_id, validation_pairs)
    export, base, judged_by = judging.export, judging.base, judging.judged_by
    runs: list[_SweepRun] = []
    failed: list[dict] = []
    for index, config in enumerate(configs):
        run_id = start_training_run(settings, judging, config, sweep={"index": index, "configs": len(configs)})
        try:
            with _failure_recorded(settings, run_id):
                runs.append(_SweepRun(run_id, config, *_train_and_register(settings, judging, run_id, config, steps)))
        except Exception as error:  # recorded on its run; the other configurations go on
            logger.warning("sweep: training run %d failed: %s", run_id, error)
            failed.append({"training_run_id": run_id, "config": _config_changes(config, configs[0]), "error": str(error)})
            if len(failed) == len(configs):
                raise
    pending = {run.run_id for run in runs}
    try:
        # The current model is judged once: every candidate meets the same figures.
        current = steps.evaluate(settings, base.id, judged_by, export["path"])
        for run in runs:
            started = time.perf_counter()
            run.candidate = steps.evaluate(settings, run.model_id, judged_by, export["path"]) | export_val(
                run.trained["history"][-1])
            run.evaluate_seconds = time.perf_counter() - started
            registry.update_model_metrics(store, run.model_id, run.candidate)
            run.current = current | export_val(run.trained["baseline"])
            run.verdict = judge(run.candidate, run.current, settings.gate)
        # max keeps the first of equals
        best = max((run for run in runs if run.verdict.passed), key=lambda run: run.candidate[run.verdict.metric],
                   default=None)
        candidates = []
        for run in runs:
            verdict, reason = run.verdict, run.verdict.reason
            if verdict.passed and run is not best:
                reason = (f"passed the gate ({reason.removesuffix(': promoted')}) but model {best.model_id} scored "
                          "higher in this sweep: not promoted")
            promoted = registry.record_gate(store, run.model_id, run is best, reason, promote)
            seconds = {"train": round(run.train_seconds, 3), "evaluate": round(run.evaluate_seconds, 3)}
            summary = _summary(judging, run.run_id, run.model_id, run.trained, verdict, promoted, reason, run.current,
                               run.candidate, seconds)
            _finish(settings, summary)
            pending.discard(run.run_id)
            candidates.append(summary | {"config": _config_changes(run.config, configs[0])})
    except BaseException as error:
        for run_id in pending:
            registry.fail_training_run(store, run_id, repr(error))
        raise
    return {
        "export_id": export["id"],
        "parent_model_id": base.id,
        "judged_by": judged_by.source,
        "judged_by_description": judged_by.description,
        "current_metrics": current,
        "candidates": candidates,
        "failed": failed,
        "best_model_id": None if best is None else best.model_id,
        "promoted_model_id": next((entry["model_id"] for entry in candidates if entry["promoted"]), None),
    }

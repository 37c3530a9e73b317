"""The gate's speed trade (pipeline.gate.judge) on hand-set metric dictionaries, the embedding-speed
timing (usecases.holdout.embedding_speed), and a real evaluation that records faces/s beside the
quality figures, shown by `facemine models`."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

# `prepared` and `store` are fixtures shared with the other retraining tests.
from retrain_helpers import prepared, store  # noqa: F401

from pipeline.config import GateConfig
from pipeline.gate import ARCHITECTURE, EMBEDDING_SPEED, judge
from storage.store import Store

STUDENT = "student-mobilenet_v3_small"
CURRENT = {"clustering_bcubed_f": 0.900, "verification_auc": 0.980, "verification_tar@far=0.001": 0.800,
           EMBEDDING_SPEED: 10.0, ARCHITECTURE: "sface"}
# 0.003 worse on the gate metric, 0.001 on AUC, 12.1x faster, another architecture.
FASTER = {"clustering_bcubed_f": 0.897, "verification_auc": 0.979, "verification_tar@far=0.001": 0.800,
          EMBEDDING_SPEED: 121.0, ARCHITECTURE: STUDENT}
NO_GAIN = "clustering_bcubed_f 0.8970 vs current 0.9000 (-0.0030, not more than the required 0): kept the current model"


def verdict(candidate: dict, config: GateConfig | None = None) -> tuple[bool, bool, str, str]:
    result = judge(candidate, CURRENT, config or GateConfig())
    return result.judged, result.passed, result.metric, result.reason


def test_a_slightly_worse_much_faster_model_of_another_architecture_passes_as_a_speed_trade() -> None:
    assert verdict(FASTER) == (True, True, "clustering_bcubed_f", (
        "speed trade: clustering_bcubed_f 0.8970 vs current 0.9000 (-0.0030); traded 0.0030 clustering_bcubed_f, "
        "0.0010 verification_auc for 12.1x embedding speed (121.0 vs 10.0 faces/s, student-mobilenet_v3_small vs "
        "sface), each loss within 0.005: promoted"))
    # A tie on every measure and twice as fast trades nothing.
    tie = CURRENT | {EMBEDDING_SPEED: 20.0, ARCHITECTURE: STUDENT}
    assert verdict(tie)[1:3] == (True, "clustering_bcubed_f")
    assert "; traded nothing for 2.0x embedding speed" in verdict(tie)[3]


def test_a_better_and_faster_model_passes_as_before() -> None:
    better = FASTER | {"clustering_bcubed_f": 0.910, "verification_auc": 0.980}
    assert verdict(better) == (True, True, "clustering_bcubed_f",
                               "clustering_bcubed_f 0.9100 vs current 0.9000 (+0.0100, more than the required 0): promoted")


def test_a_loss_over_the_allowed_one_is_refused() -> None:
    worse = FASTER | {"clustering_bcubed_f": 0.894}
    assert verdict(worse) == (True, False, "clustering_bcubed_f", (
        "clustering_bcubed_f 0.8940 vs current 0.9000 (-0.0060, not more than the required 0): kept the current model "
        "(no speed trade: fell on clustering_bcubed_f by 0.0060, more than the allowed 0.005)"))
    assert verdict(worse, GateConfig(speed_trade_max_loss=0.01))[1] is True


def test_a_speedup_under_the_required_one_is_refused() -> None:
    slower = FASTER | {EMBEDDING_SPEED: 19.0}
    assert verdict(slower) == (True, False, "clustering_bcubed_f", (
        f"{NO_GAIN} (no speed trade: 1.9x embedding speed (19.0 vs 10.0 faces/s, student-mobilenet_v3_small vs sface), "
        "less than the required 2x)"))
    assert verdict(slower, GateConfig(speed_trade_min_speedup=1.5))[1] is True


def test_a_guard_falling_more_than_the_allowed_loss_is_refused() -> None:
    guard_fell = FASTER | {"verification_tar@far=0.001": 0.790}
    assert verdict(guard_fell)[1:] == (False, "clustering_bcubed_f", (
        f"{NO_GAIN} (no speed trade: fell on verification_tar@far=0.001 by 0.0100, more than the allowed 0.005)"))
    # Better on the gate metric but a guard fell beyond gate.guard_tolerance: within the trade's
    # allowed loss, the speed pays for it.
    better_but_guard = FASTER | {"clustering_bcubed_f": 0.910, "verification_tar@far=0.001": 0.797}
    assert verdict(better_but_guard)[1] is True
    assert "traded 0.0010 verification_auc, 0.0030 verification_tar@far=0.001 for 12.1x" in verdict(better_but_guard)[3]


def test_no_trade_without_both_speeds_across_architectures() -> None:
    unmeasured = {name: value for name, value in FASTER.items() if name != EMBEDDING_SPEED}
    assert verdict(unmeasured) == (True, False, "clustering_bcubed_f",
                                   f"{NO_GAIN} (no speed trade: embedding speed not measured for the candidate)")
    assert judge(FASTER, CURRENT | {EMBEDDING_SPEED: math.nan}, GateConfig()).reason == (
        f"{NO_GAIN} (no speed trade: embedding speed not measured for the current model)")
    # One architecture: a speed difference is machine noise, never a trade. An architecture not
    # recorded, or trades turned off (no loss allowed): the plain gate.
    for candidate, config in ((FASTER | {ARCHITECTURE: "sface"}, GateConfig()),
                              ({name: value for name, value in FASTER.items() if name != ARCHITECTURE}, GateConfig()),
                              (FASTER, GateConfig(speed_trade_max_loss=0.0))):
        assert verdict(candidate, config) == (True, False, "clustering_bcubed_f", NO_GAIN)
    # A model that could not be judged is not judged, however fast.
    assert judge({EMBEDDING_SPEED: 500.0, ARCHITECTURE: STUDENT}, CURRENT, GateConfig()).judged is False
    with pytest.raises(ValidationError):
        GateConfig(speed_trade_min_speedup=1.0)


def test_embedding_speed_is_the_median_batch_after_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from usecases import holdout

    calls: list[tuple[int, int, bool]] = []

    class Recorder:
        def embed(self, chips: np.ndarray, batch_size: int, flip_tta: bool) -> np.ndarray:
            calls.append((len(chips), batch_size, flip_tta))
            return chips[:, :1].astype(np.float32)

    # Seconds per face: 1 (warm-up), 0.25, 0.25 on the last two chips.
    clock = iter([0.0, 64.0, 64.0, 80.0, 80.0, 80.5])
    monkeypatch.setattr(holdout, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    chips = np.arange(130, dtype=np.uint8).reshape(130, 1)
    vectors, faces_per_second = holdout.embedding_speed(Recorder(), chips, flip_tta=True)
    assert calls == [(64, 64, True), (64, 64, True), (2, 64, True)]
    assert np.array_equal(vectors, chips.astype(np.float32)) and faces_per_second == 4.0
    # One batch: its own speed.
    clock = iter([0.0, 5.0])
    assert holdout.embedding_speed(Recorder(), chips[:10])[1] == 2.0


@pytest.mark.slow
def test_an_evaluation_records_faces_per_second_and_models_and_loop_report_show_it(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture  # noqa: F811
) -> None:
    from facemine_cli import main
    from pipeline.embed import create_embedder
    from storage import registry
    from usecases.loop import loop_table
    from usecases.runtime import register
    from usecases.training import evaluate_model, prepare_judging

    settings = store.settings  # judged on the configured held-out LFW photos, as `retrain` judges
    judging = prepare_judging(settings, None, None)
    student = register(store, create_embedder(STUDENT, device="cpu"), name="fresh-student", parent_id=judging.base.id)
    evaluated = {model.id: evaluate_model(settings, model.id, judging.judged_by, judging.export["path"])
                 for model in (judging.base, student)}

    for model_id, architecture in ((judging.base.id, "sface"), (student.id, STUDENT)):
        metrics = evaluated[model_id]
        assert metrics[ARCHITECTURE] == architecture and math.isfinite(metrics[EMBEDDING_SPEED])
        assert metrics[EMBEDDING_SPEED] > 0
        stored = registry.model_record(store, model_id)["metrics"]
        assert (stored[EMBEDDING_SPEED], stored[ARCHITECTURE]) == (metrics[EMBEDDING_SPEED], architecture)
    # An untrained student is far from its teacher: the gate refuses the trade, and says why.
    result = judge(evaluated[student.id], evaluated[judging.base.id], settings.gate)
    assert result.judged and not result.passed and "(no speed trade: " in result.reason

    monkeypatch.setenv("COLUMNS", "250")  # Rich would wrap table cells at 80 columns
    capsys.readouterr()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for model_id, metrics in evaluated.items():
        row = next(line for line in out.splitlines() if re.match(rf"│ {model_id}\s+│", line))
        cells = [cell.strip() for cell in row.strip("│").split("│")]
        assert cells[-4:-1] == [str(round(metrics["clustering_bcubed_f"], 4)), str(round(metrics["verification_auc"], 4)),
                                str(round(metrics[EMBEDDING_SPEED], 1))]
    assert re.findall(rf"│ metric\s+│ {EMBEDDING_SPEED}\s+│ (\S+)\s+│", out) == [
        str(round(metrics[EMBEDDING_SPEED], 4)) for metrics in evaluated.values()]

    # The loop report: both models' faces/s beside the gate metric.
    base, export = judging.base.id, judging.export
    training_run = registry.start_training_run(store, base, export["id"], {})
    registry.add_loop_iteration(store, "speed", 1, base, export["run_id"], export["id"], training_run, False, {
        "gate_metric": result.metric, "gate_reason": result.reason, "judged_by": judging.judged_by.source,
        "current": evaluated[base], "candidate": evaluated[student.id], "identities": 8, "churn": None,
        "seconds": {"retrain": 1.0}})
    [row] = loop_table(store, "speed").to_dict("records")
    assert (row["current"], row["current_faces/s"], row["candidate"], row["candidate_faces/s"]) == (
        evaluated[base][result.metric], round(evaluated[base][EMBEDDING_SPEED], 1),
        evaluated[student.id][result.metric], round(evaluated[student.id][EMBEDDING_SPEED], 1))

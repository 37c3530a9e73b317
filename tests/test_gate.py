"""Promotion gate, label churn and the closed loop's stopping rule, on hand-checked values."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from pipeline.config import GateConfig
from pipeline.gate import gate_decision, label_churn, should_stop

METRIC = "verification_accuracy"


def test_better_candidate_is_promoted_with_the_numbers_in_the_reason() -> None:
    promote, reason = gate_decision({METRIC: 0.93}, {METRIC: 0.91}, METRIC)
    assert promote
    assert "0.9300" in reason and "0.9100" in reason and "+0.0200" in reason


def test_worse_candidate_and_tie_are_not_promoted() -> None:
    assert gate_decision({METRIC: 0.90}, {METRIC: 0.91}, METRIC)[0] is False
    promote, reason = gate_decision({METRIC: 0.91}, {METRIC: 0.91}, METRIC)
    assert promote is False
    assert "kept the current model" in reason


def test_min_improvement_is_a_strict_margin() -> None:
    # +0.02 beats a margin of 0.01 but not one of 0.03.
    assert gate_decision({METRIC: 0.93}, {METRIC: 0.91}, METRIC, min_improvement=0.01)[0] is True
    assert gate_decision({METRIC: 0.93}, {METRIC: 0.91}, METRIC, min_improvement=0.03)[0] is False


def test_missing_or_nan_metric_never_promotes() -> None:
    promote, reason = gate_decision({"other": 1.0}, {METRIC: 0.5}, METRIC)
    assert not promote and "not measured for the candidate" in reason
    promote, reason = gate_decision({METRIC: 0.9}, {}, METRIC)
    assert not promote and "not measured for the current model" in reason
    assert gate_decision({METRIC: math.nan}, {METRIC: 0.5}, METRIC)[0] is False


def test_gate_metric_setting_accepts_only_higher_is_better_metrics() -> None:
    for metric in ("verification_accuracy", "verification_tar@far=0.001", "clustering_bcubed_f", "export_val_auc"):
        assert GateConfig(metric=metric).metric == metric
    for metric in ("verification_threshold", "clustering_n_clusters", "loss"):
        with pytest.raises(ValidationError):
            GateConfig(metric=metric)


def test_label_churn_counts_changed_faces_among_the_shared_ones() -> None:
    previous = {1: 10, 2: 10, 3: 11, 4: None, 5: 12}
    current = {1: 10, 2: 11, 3: 11, 4: 12, 6: 13}
    # Shared faces 1-4; face 2 moved, face 4 went from unassigned to 12: 2 of 4.
    assert label_churn(previous, current) == pytest.approx(0.5)
    assert label_churn(previous, previous) == 0.0
    assert label_churn({1: 10}, {2: 10}) == 0.0


def test_should_stop_when_nothing_is_promoted() -> None:
    rejected = {"promoted": False, "churn": None}
    promoted = {"promoted": True, "churn": 0.2}
    assert should_stop([promoted, rejected], min_churn=0.01, patience=1)[0] is True
    # With patience 2 one rejection is tolerated, two in a row are not.
    assert should_stop([promoted, rejected], min_churn=0.01, patience=2) == (False, "")
    stop, reason = should_stop([promoted, rejected, rejected], min_churn=0.01, patience=2)
    assert stop and "last 2 iterations" in reason


def test_should_stop_when_churn_falls_below_the_threshold() -> None:
    assert should_stop([{"promoted": True, "churn": 0.05}], min_churn=0.01) == (False, "")
    stop, reason = should_stop([{"promoted": True, "churn": 0.005}], min_churn=0.01)
    assert stop and "0.0050" in reason
    assert should_stop([], min_churn=0.01) == (False, "")

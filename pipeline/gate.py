"""Promotion gate and closed-loop bookkeeping: plain functions on metric dictionaries.

- `gate_decision`: does a retrained model replace the current one? Only when it beats it on one
  held-out metric (higher is better) by more than a margin; ties keep the current model.
- `judge`: the gate as configured (GateConfig): the primary metric ("auto" picks it from what
  was measured), guard metrics that may not fall, and whether the models could be judged at all.
- `label_churn`: how much of the labelling changed between two clustering runs.
- `should_stop`: the closed loop's stopping rule over the iterations so far.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.config import GateConfig

AUTO_METRICS = ("clustering_bcubed_f", "verification_auc")


def gate_decision(
    candidate: Mapping[str, float], current: Mapping[str, float], metric: str, min_improvement: float = 0.0
) -> tuple[bool, str]:
    """(promote, reason): promote iff candidate[metric] - current[metric] > min_improvement.

    A metric missing or not finite on either side never promotes: the reason says which.
    """
    for side, metrics in (("candidate", candidate), ("current model", current)):
        value = metrics.get(metric)
        if value is None:
            return False, f"{metric} was not measured for the {side}"
        if not math.isfinite(value):
            return False, f"{metric} of the {side} is {value}"
    new, old = float(candidate[metric]), float(current[metric])
    gain = new - old
    comparison = f"{metric} {new:.4f} vs current {old:.4f} ({gain:+.4f}"
    if gain > min_improvement:
        return True, f"{comparison}, more than the required {min_improvement:g}): promoted"
    return False, f"{comparison}, not more than the required {min_improvement:g}): kept the current model"


@dataclass(frozen=True)
class GateVerdict:
    judged: bool  # False: the metric was not measured on both models; nothing was compared
    passed: bool
    metric: str
    reason: str


def _measured(metrics: Mapping[str, float], name: str) -> bool:
    value = metrics.get(name)
    return value is not None and math.isfinite(value)


def judge(candidate: Mapping[str, float], current: Mapping[str, float], config: GateConfig) -> GateVerdict:
    """The gate's verdict: the candidate must beat the current model on the primary metric by more
    than `min_improvement`, and lose no guard metric (measured on both) by more than `guard_tolerance`."""
    metric = config.metric
    if metric == "auto":
        metric = next((name for name in AUTO_METRICS if _measured(candidate, name) and _measured(current, name)),
                      AUTO_METRICS[0])
    passed, reason = gate_decision(candidate, current, metric, config.min_improvement)
    if not (_measured(candidate, metric) and _measured(current, metric)):
        return GateVerdict(False, False, metric, f"not judged: {reason}")
    falls = [
        f"{guard} {candidate[guard]:.4f} vs current {current[guard]:.4f}"
        for guard in config.guard_metrics
        if guard != metric and _measured(candidate, guard) and _measured(current, guard)
        and candidate[guard] < current[guard] - config.guard_tolerance
    ]
    if passed and falls:
        return GateVerdict(True, False, metric, f"{reason.removesuffix(': promoted')} but fell on {'; '.join(falls)}: "
                                                "kept the current model")
    return GateVerdict(True, passed, metric, reason)


def label_churn(previous: Mapping[int, Hashable | None], current: Mapping[int, Hashable | None]) -> float:
    """Share of the faces labelled in both runs whose identity differs (None: unassigned).

    Identities compare by id: clustering runs keep the ids of the identities they continue.
    0.0 when no face is in both runs (nothing comparable changed).
    """
    common = previous.keys() & current.keys()
    if not common:
        return 0.0
    return sum(previous[face] != current[face] for face in common) / len(common)


def should_stop(history: Sequence[Mapping], min_churn: float, patience: int = 1) -> tuple[bool, str]:
    """(stop, reason) after the iterations in `history` (oldest first).

    Each entry needs "promoted" (bool) and, when promoted, "churn" (label churn its re-clustering
    caused). Stop when none of the last `patience` iterations promoted a model (nothing improves),
    or when the latest promotion moved fewer than `min_churn` of the labels (the labelling has
    settled, so another round would train on the same data).
    """
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    if not history:
        return False, ""
    recent = history[-patience:]
    if len(recent) == patience and not any(entry["promoted"] for entry in recent):
        return True, f"no model promoted in the last {patience} iteration{'s' if patience > 1 else ''}"
    latest = history[-1]
    if latest["promoted"] and latest["churn"] < min_churn:
        return True, f"label churn {latest['churn']:.4f} fell below {min_churn:g}"
    return False, ""

"""Promotion gate and closed-loop bookkeeping: plain functions on metric dictionaries.

- `gate_decision`: does a retrained model replace the current one? Only when it beats it on one
  held-out metric (higher is better) by more than a margin; ties keep the current model.
- `judge`: the gate as configured (GateConfig): the primary metric ("auto" picks it from what
  was measured), guard metrics that may not fall, whether the models could be judged at all, and
  the speed trade (a slightly worse model of another architecture that embeds much faster).
- `label_churn`: how much of the labelling changed between two clustering runs.
- `should_stop`: the closed loop's stopping rule over the iterations so far.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.config import GateConfig

AUTO_METRICS = ("clustering_bcubed_f", "verification_auc")
# Held-out BCubed F at each model's best floor (pipeline.holdout.best_floor_metrics).
BEST_BCUBED_F = "clustering_best_bcubed_f"
# Recorded beside the quality figures when a model is evaluated (usecases.holdout.calibrate_model):
# faces/s at batch 64 on the evaluating device, and the network architecture (`Embedder.kind`).
EMBEDDING_SPEED = "embedding_faces_per_second"
ARCHITECTURE = "architecture"


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
    than `min_improvement`, and lose no guard metric (measured on both) by more than `guard_tolerance`;
    else it may still pass as a speed trade (`_speed_trade`). Both models are compared as evaluated,
    each at its own calibrated operating point: a scale shift buys no promotion, nor does speed
    beyond the configured loss."""
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
    if passed and config.floor_free_check and metric == "clustering_bcubed_f" and not _floor_free_gain(candidate, current, config):
        passed = False
        reason = (f"{reason.removesuffix(': promoted')} only at the calibrated floors: at each model's best floor "
                  f"{candidate[BEST_BCUBED_F]:.4f} vs current {current[BEST_BCUBED_F]:.4f}, a shift of the "
                  "similarity scale, not a better model: kept the current model")
    if passed and not falls:
        return GateVerdict(True, True, metric, reason)
    traded, trade_reason = _speed_trade(candidate, current, metric, config)
    if traded:
        return GateVerdict(True, True, metric, trade_reason)
    if passed:  # better on the gate metric, but a guard fell
        reason = f"{reason.removesuffix(': promoted')} but fell on {'; '.join(falls)}: kept the current model"
    return GateVerdict(True, False, metric, f"{reason} ({trade_reason})" if trade_reason else reason)


def _floor_free_gain(candidate: Mapping[str, float], current: Mapping[str, float], config: GateConfig) -> bool:
    """Whether a BCubed F gain also holds with each model at its best floor (where both measured).

    Calibration places each model's floor only approximately: a model whose similarity scale
    moved lands elsewhere on its curve, and a gain at the calibrated floors can be that alone."""
    if not (_measured(candidate, BEST_BCUBED_F) and _measured(current, BEST_BCUBED_F)):
        return True
    return candidate[BEST_BCUBED_F] > current[BEST_BCUBED_F] + config.min_improvement


def _speed_trade(
    candidate: Mapping[str, float], current: Mapping[str, float], metric: str, config: GateConfig
) -> tuple[bool, str]:
    """(accepted, reason) of trading a little quality for embedding speed; reason "" where no trade
    applies (trades off, or both models of one architecture, or an architecture not recorded).

    Accepted when the candidate embeds at least `speed_trade_min_speedup` times faster and falls by
    at most `speed_trade_max_loss` on the gate metric and on each guard metric measured on both.
    """
    if config.speed_trade_max_loss == 0:
        return False, ""
    architectures = candidate.get(ARCHITECTURE), current.get(ARCHITECTURE)
    if None in architectures or architectures[0] == architectures[1]:
        return False, ""
    for side, metrics in (("candidate", candidate), ("current model", current)):
        if not (_measured(metrics, EMBEDDING_SPEED) and metrics[EMBEDDING_SPEED] > 0):
            return False, f"no speed trade: embedding speed not measured for the {side}"
    new_speed, old_speed = float(candidate[EMBEDDING_SPEED]), float(current[EMBEDDING_SPEED])
    speedup = new_speed / old_speed
    speeds = (f"{speedup:.1f}x embedding speed ({new_speed:.1f} vs {old_speed:.1f} faces/s, "
              f"{architectures[0]} vs {architectures[1]})")
    if speedup < config.speed_trade_min_speedup:
        return False, f"no speed trade: {speeds}, less than the required {config.speed_trade_min_speedup:g}x"
    losses = {
        name: float(current[name]) - float(candidate[name])
        for name in dict.fromkeys((metric, *config.guard_metrics))
        if _measured(candidate, name) and _measured(current, name)
    }
    too_big = [f"{name} by {loss:.4f}" for name, loss in losses.items() if loss > config.speed_trade_max_loss]
    if too_big:
        return False, f"no speed trade: fell on {', '.join(too_big)}, more than the allowed {config.speed_trade_max_loss:g}"
    new, old = float(candidate[metric]), float(current[metric])
    traded = ", ".join(f"{loss:.4f} {name}" for name, loss in losses.items() if loss > 0) or "nothing"
    return True, (f"speed trade: {metric} {new:.4f} vs current {old:.4f} ({new - old:+.4f}); traded {traded} "
                  f"for {speeds}, each loss within {config.speed_trade_max_loss:g}: promoted")


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

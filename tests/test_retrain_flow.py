"""The `retrain` flow on a tiny export of real LFW faces: registry lineage, held-out gate (configured
photos, reviewed identities, pseudo-identities), per-model calibration, failures."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
# `prepared` and `store` are fixtures shared with the other retraining tests.
from retrain_helpers import Prepared, prepared, small_train_config, store  # noqa: F401

from facemine_cli import main
from labeling.actions import Labeler
from pipeline.config import GateConfig, TrainConfig
from pipeline.embed import create_embedder
from pipeline.errors import FacemineError
from pipeline.gate import ARCHITECTURE, EMBEDDING_SPEED, judge
from pipeline.holdout import PSEUDO
from storage import registry
from storage.holdout import HoldoutCache
from storage.store import Store

pytestmark = pytest.mark.slow




def test_retrain_registers_candidate_with_lineage_and_applies_the_gate(store: Store) -> None:
    from flows.train import retrain

    base = store.current_model()
    export = registry.pick_export(store)
    result = retrain(config=small_train_config())

    run = registry.training_run(store, result["training_run_id"])
    assert run["status"] == "done"
    assert run["parent_model_id"] == base.id and run["export_id"] == export["id"] and run["model_id"] == result["model_id"]
    assert run["params"]["train_config"]["freeze_fraction"] == 0.9
    assert [entry["epoch"] for entry in run["history"]] == [1]
    assert run["history"][0]["loss"] > 0

    model = registry.model_record(store, result["model_id"])
    assert model["kind"] == "checkpoint" and model["parent_id"] == base.id
    assert model["training_run_id"] == result["training_run_id"]
    assert [step["id"] for step in registry.lineage(store, model["id"])] == [model["id"], base.id]
    # The registered weights load and embed like any model.
    embedder = create_embedder(model["kind"], model["weights_path"], device="cpu")
    assert embedder.weights_hash == store.model(model["id"]).weights_hash

    current, candidate = result["current_metrics"], result["candidate_metrics"]
    for metrics in (current, candidate):
        assert 0.5 <= metrics["verification_accuracy"] <= 1.0
        assert 0.0 <= metrics["verification_tar@far=0.01"] <= 1.0
        assert 0.0 < metrics["clustering_bcubed_f"] <= 1.0
        assert metrics["verification_pairs"] >= 25
        # Each model is clustered at its own calibrated floor, stored on its row.
        assert metrics["clustering_floor"] == metrics["calibration"]["cluster_min_similarity"]
    assert registry.model_record(store, base.id)["metrics"]["calibration"] == current["calibration"]
    # SFace separates these LFW pairs well: the held-out pipeline (detect, align, embed) is sound.
    assert current["verification_accuracy"] >= 0.85
    # Configured labelled photos judge: the gate compares BCubed F, guarded by AUC and TAR@FAR.
    assert result["judged_by"] == "configured" and result["judged"] is True
    assert result["gate_metric"] == "clustering_bcubed_f"
    verdict = judge(candidate, current, GateConfig())
    assert result["promoted"] is verdict.passed and result["reason"] == verdict.reason
    assert model["status"] == ("current" if verdict.passed else "rejected")
    assert model["gate_reason"] == result["reason"] and "clustering_bcubed_f" in result["reason"]
    assert store.current_model().id == (model["id"] if verdict.passed else base.id)
    assert run["metrics"]["judged_by"] == "configured"


def _gate_artifact() -> tuple[list[dict], str]:
    from prefect.artifacts import Artifact

    artifact = Artifact.get("retrain-gate")
    return json.loads(artifact.data), artifact.description


def _trained_identities(checkpoint: str) -> int:
    return torch.load(checkpoint, weights_only=True)["extra"]["num_classes"]


def _trainable_identities(export: dict, held_out: list[str]) -> int:
    """Identities left to train on: not held out, with TrainConfig's min_identity_faces train chips."""
    train = pd.Series([label for _, label in export["train"] if label not in held_out], dtype=str).value_counts()
    return int((train >= TrainConfig().min_identity_faces).sum())


def test_with_defaults_pseudo_identities_held_out_from_training_judge(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.train import retrain

    monkeypatch.delenv("FACEMINE_GATE__VALIDATION_PAIRS")
    monkeypatch.delenv("FACEMINE_GATE__VALIDATION_TRUTH")
    export = registry.export_samples(registry.pick_export(store)["path"])
    exported = {label for rows in export.values() for _, label in rows}
    result = retrain(config=small_train_config())

    assert result["judged"] is True and result["judged_by"] == "pseudo"
    assert "favours it" in result["judged_by_description"]
    held_out = registry.training_run(store, result["training_run_id"])["params"]["judged_by"]["identities"]
    assert len(held_out) == max(2, round(0.2 * len(exported))) and set(held_out) <= exported
    # Training never saw them: its classes are the other exported identities.
    assert _trained_identities(result["checkpoint"]) == _trainable_identities(export, held_out)
    candidate, current = result["candidate_metrics"], result["current_metrics"]
    for metrics in (candidate, current):
        assert metrics["holdout_identities"] == len(held_out)
        assert metrics["holdout_faces"] == sum(label in held_out for rows in export.values() for _, label in rows)
    assert result["gate_metric"] == "clustering_bcubed_f"
    assert result["reason"] == judge(candidate, current, GateConfig()).reason
    rows, description = _gate_artifact()
    by_measure = {row["measure"]: row for row in rows}
    assert by_measure["clustering_bcubed_f"]["current"] == round(current["clustering_bcubed_f"], 4)
    assert by_measure["clustering_floor"]["candidate"] == round(candidate["clustering_floor"], 4)
    assert "pseudo-identities held out" in description and result["reason"] in description


def test_reviewed_identities_judge_before_pseudo_ones(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.train import retrain

    monkeypatch.delenv("FACEMINE_GATE__VALIDATION_PAIRS")
    monkeypatch.delenv("FACEMINE_GATE__VALIDATION_TRUTH")
    export = registry.export_samples(registry.pick_export(store)["path"])
    exported = sorted({int(label) for rows in export.values() for _, label in rows})
    labeler = Labeler(store, who="tester")
    labeler.name(exported[0], "First Person")
    labeler.name(exported[-1], "Last Person")
    result = retrain(config=small_train_config())

    assert result["judged_by"] == "reviewed" and result["judged"] is True
    params = registry.training_run(store, result["training_run_id"])["params"]["judged_by"]
    assert params["identities"] == [str(exported[0]), str(exported[-1])]
    assert _trained_identities(result["checkpoint"]) == _trainable_identities(export, params["identities"])


def test_a_candidate_that_cannot_be_judged_fails_the_run(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Only pairs are configured, but the gate asks for a clustering measure: nothing to compare.
    monkeypatch.delenv("FACEMINE_GATE__VALIDATION_TRUTH")
    monkeypatch.setenv("FACEMINE_GATE__METRIC", "clustering_bcubed_f")
    base = store.current_model()
    code = main(["train", "--epochs", "1", "--freeze", "0.9", "--batch-size", "16", "--workers", "0"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not judged: clustering_bcubed_f was not measured" in error[0]
    candidate = registry.models_table(store).iloc[-1]
    assert candidate["status"] == "rejected" and candidate["gate_reason"].startswith("not judged")
    assert store.current_model().id == base.id
    run = registry.training_run(store, int(candidate["training_run_id"]))
    assert run["status"] == "done" and run["metrics"]["judged"] is False
    _, description = _gate_artifact()
    assert description.startswith("**NOT JUDGED**")


def test_candidate_not_beating_current_by_the_margin_is_kept_not_promoted(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FACEMINE_GATE__MIN_IMPROVEMENT", "1.0")  # accuracy cannot rise by 1
    base = store.current_model()
    code = main(["train", "--epochs", "1", "--freeze", "0.9", "--batch-size", "16", "--workers", "0"])
    assert code == 0
    assert "verification_accuracy" in capsys.readouterr().out

    candidate = registry.models_table(store).iloc[-1]
    assert candidate["id"] != base.id
    assert candidate["status"] == "rejected"
    assert "not more than the required 1" in candidate["gate_reason"]
    assert store.current_model().id == base.id
    # The current model's held-out metrics are stored with it for the next gate.
    assert "verification_accuracy" in registry.model_record(store, base.id)["metrics"]


def test_the_judging_use_case_runs_plainly_with_the_gpu_slot_it_is_given(store: Store) -> None:
    from usecases.holdout import choose_judge, judge_metrics

    export = registry.export_samples(registry.pick_export(store)["path"])
    exported = {label for rows in export.values() for _, label in rows}
    judged_by = choose_judge(store, export, GateConfig(), pairs_csv=None)  # nothing configured: pseudo-identities
    assert judged_by.source == PSEUDO and len(judged_by.identities) == max(2, round(0.2 * len(exported)))
    slots: list[str] = []

    @contextmanager
    def gpu() -> Iterator[None]:
        slots.append("taken")
        yield

    base = store.current_model()
    metrics = judge_metrics(store.settings, base.id, judged_by, export, gpu)

    assert slots == ["taken", "taken"]  # embedding the calibration sample, then the held-out faces
    assert metrics["holdout_identities"] == len(judged_by.identities)
    assert metrics["holdout_faces"] == sum(label in judged_by.identities for rows in export.values() for _, label in rows)
    assert metrics["clustering_floor"] == metrics["calibration"]["cluster_min_similarity"]
    stored = registry.model_record(store, base.id)["metrics"]
    assert {name: stored[name] for name in ("calibration", EMBEDDING_SPEED, ARCHITECTURE)} == {
        name: metrics[name] for name in ("calibration", EMBEDDING_SPEED, ARCHITECTURE)}
    assert metrics[ARCHITECTURE] == "sface"
    # Same model, same faces, same seeded sample: the same figures (the timed speed aside).
    again = judge_metrics(store.settings, base.id, judged_by, export)
    assert again.pop(EMBEDDING_SPEED) > 0
    assert again == {name: value for name, value in metrics.items() if name != EMBEDDING_SPEED}


def test_held_out_faces_are_detected_once_and_cached(store: Store, prepared: Prepared) -> None:
    cached = sorted(path.name for path in HoldoutCache(store.data_dir).root.iterdir())
    assert len(cached) == 1 and cached[0].endswith(".faces.npz")
    from usecases.holdout import load_holdout

    holdout = load_holdout(store.settings, str(prepared.pairs), str(prepared.truth))
    assert holdout.found.mean() > 0.9  # LFW photos are centred faces
    assert sorted(path.name for path in HoldoutCache(store.data_dir).root.iterdir()) == cached


def test_failed_training_is_recorded_as_failed(store: Store) -> None:
    from flows.train import retrain

    with pytest.raises(FacemineError, match="fresh"):
        retrain(config=small_train_config(base_model="fresh"))  # a fresh model cannot keep frozen layers
    runs = registry.models_table(store)
    assert len(runs) == 1  # nothing registered
    run = registry.training_run(store, 1)
    assert run["status"] == "failed" and "fresh" in run["metrics"]["error"]


def test_retrain_without_any_export_says_so(data_dir: Path, prefect_harness) -> None:  # noqa: ANN001
    from flows.train import retrain

    with pytest.raises(FacemineError, match="no dataset export yet"):
        retrain(config=small_train_config())

"""The `retrain` flow on a tiny export of real LFW faces: registry lineage, held-out gate, failures."""
from __future__ import annotations

from pathlib import Path

import pytest
# `prepared` and `store` are fixtures shared with the other retraining tests.
from retrain_helpers import Prepared, prepared, small_train_config, store  # noqa: F401

from facemine_cli import main
from pipeline.embed import create_embedder
from pipeline.errors import FacemineError
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
    # SFace separates these LFW pairs well: the held-out pipeline (detect, align, embed) is sound.
    assert current["verification_accuracy"] >= 0.85
    beats = candidate["verification_accuracy"] > current["verification_accuracy"]
    assert result["promoted"] is beats
    assert model["status"] == ("current" if beats else "rejected")
    assert model["gate_reason"] == result["reason"] and "verification_accuracy" in result["reason"]
    assert store.current_model().id == (model["id"] if beats else base.id)


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


def test_held_out_faces_are_detected_once_and_cached(store: Store, prepared: Prepared) -> None:
    cached = sorted(path.name for path in HoldoutCache(store.data_dir).root.iterdir())
    assert len(cached) == 1 and cached[0].endswith(".faces.npz")
    from flows.holdout import load_holdout

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

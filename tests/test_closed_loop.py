"""The `closed_loop` flow on a tiny real store: iterations stored, review decisions kept, report."""
from __future__ import annotations

from pathlib import Path

import pytest
# `prepared` and `store` are fixtures shared with the other retraining tests.
from retrain_helpers import prepared, small_train_config, store  # noqa: F401

from facemine_cli import main
from labeling.actions import Labeler
from pipeline.gate import GateVerdict
from storage import registry
from storage.decisions import identity_faces
from storage.identities import identities_summary, identity_rows, latest_run_id, run_info
from storage.store import Store

pytestmark = pytest.mark.slow




def test_two_iterations_with_model_changes_keep_a_named_identity(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flows.loop import closed_loop

    # A person names the largest identity before the loop runs.
    run_id = latest_run_id(store)
    named = int(identities_summary(store, run_id).identity_id.iloc[0])
    members = identity_faces(store, run_id, named)
    Labeler(store, who="tester").name(named, "Reviewed Person")
    # Force promotions so that both iterations re-embed and re-cluster with a new model (the gate
    # itself is tested in test_gate.py and test_retrain_flow.py).
    monkeypatch.setattr("usecases.training.judge", lambda *args: GateVerdict(True, True, "clustering_bcubed_f", "promoted by the test"))
    sface = store.current_model()

    result = closed_loop(iterations=2, loop_name="test", config=small_train_config(), min_churn=0.0)

    assert result["iterations"] == [1, 2] and result["promoted"] == [True, True] and not result["stopped_early"]
    iterations = registry.loop_iterations(store, "test")
    assert [row["iteration"] for row in iterations] == [1, 2]
    for row in iterations:
        metrics = row["metrics"]
        assert row["promoted"] and metrics["gate_reason"] == "promoted by the test"
        assert metrics["judged_by"] == "configured"
        assert 0.5 <= metrics["current"]["verification_accuracy"] <= 1.0
        assert 0.5 <= metrics["candidate"]["verification_accuracy"] <= 1.0
        assert metrics["identities"] >= 4  # 8 people were mined
        assert 0.0 <= metrics["churn"] <= 1.0
        assert metrics["seconds"]["retrain"] > 0 and metrics["seconds"]["reembed_cluster"] > 0
    # Iteration 2 starts from iteration 1's promoted model: its "current" is that candidate
    # (held-out metrics stored with the model, not measured again).
    held_out = lambda metrics: {k: v for k, v in metrics.items() if k.startswith(("verification_", "clustering_"))}  # noqa: E731
    assert held_out(iterations[1]["metrics"]["current"]) == held_out(iterations[0]["metrics"]["candidate"])
    # The current model descends from SFace through both trained models.
    chain = registry.lineage(store, store.current_model().id)
    assert [step["id"] for step in chain][1:] == [iterations[0]["model_id"], sface.id]
    assert iterations[1]["model_id"] == chain[0]["id"]
    # Each iteration's labelling is a clustering run of its own model, at that model's own floor.
    assert iterations[1]["run_id"] == latest_run_id(store) != run_id
    floor = registry.model_record(store, chain[0]["id"])["metrics"]["calibration"]["cluster_min_similarity"]
    assert run_info(store, iterations[1]["run_id"])["params"]["min_similarity"] == floor

    # The named identity kept its name and every reviewed face through two model changes.
    final = latest_run_id(store)
    assert identity_rows(store, [named]).name.iloc[0] == "Reviewed Person"
    assert set(members) <= set(identity_faces(store, final, named))


def test_loop_report_prints_iterations_and_writes_a_plot(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from flows.loop import closed_loop

    monkeypatch.setenv("FACEMINE_GATE__MIN_IMPROVEMENT", "1.0")  # no candidate can pass
    result = closed_loop(iterations=3, loop_name="strict", config=small_train_config())
    assert result["stopped_early"] and "no model promoted" in result["stop_reason"]
    [row] = registry.loop_iterations(store, "strict")
    assert not row["promoted"] and row["metrics"]["churn"] is None
    assert row["model_id"] == store.current_model().id  # unchanged

    plot = tmp_path / "report" / "loop.png"
    assert main(["loop", "report", "--name", "strict", "--plot", str(plot)]) == 0
    # Which data judged the iteration, and the gate's numbers.
    assert "iteration 1 (judged on configured): clustering_bcubed_f" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert main(["loop", "report", "--name", "missing"]) == 2

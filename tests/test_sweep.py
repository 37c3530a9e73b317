"""Training sweeps: configurations from a list crossed with a grid; the `sweep` flow on a tiny real
store promotes only the best candidate and keeps every one in the registry."""
from __future__ import annotations

import json

import pytest
# `prepared` and `store` are fixtures shared with the other retraining tests.
from retrain_helpers import prepared, small_train_config, store  # noqa: F401

from pipeline.errors import FacemineError
from pipeline.gate import GateVerdict
from storage import registry
from storage.settings import Settings
from storage.store import Store
from usecases.training import MAX_SWEEP_CONFIGS, sweep_configs


def test_a_grid_crosses_each_configuration_in_order_without_duplicates() -> None:
    first, second = small_train_config(), small_train_config(recipe="margin")
    configs = sweep_configs([first, second], {"base_lr": [0.01, 0.003], "epochs": [1]})
    assert [(config.recipe, config.base_lr, config.epochs) for config in configs] == [
        ("distill", 0.01, 1), ("distill", 0.003, 1), ("margin", 0.01, 1), ("margin", 0.003, 1),
    ]
    assert sweep_configs([first, first]) == [first]
    with pytest.raises(FacemineError, match="sweep grid: lr is not a training parameter"):
        sweep_configs([first], {"lr": [0.1]})
    with pytest.raises(FacemineError, match=r"sweep grid \{'epochs': 0\}: Input should be greater than or equal to 1"):
        sweep_configs([first], {"epochs": [0]})
    lrs = [0.001 * (step + 1) for step in range(MAX_SWEEP_CONFIGS + 1)]
    with pytest.raises(FacemineError, match=f"the sweep has 17 configurations; at most {MAX_SWEEP_CONFIGS}"):
        sweep_configs([first], {"base_lr": lrs})


def test_the_sweep_form_explains_every_parameter_and_refuses_bad_ones() -> None:
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from flows.sweep import sweep

    schema = parameter_schema(sweep.fn).model_dump()
    assert {name for name, field in schema["properties"].items() if field.get("description")} == set(schema["properties"])
    with pytest.raises(ParameterTypeError, match=r"configs: List should have at least 1 item"):
        sweep.validate_parameters({"configs": []})
    with pytest.raises(ParameterTypeError, match=r"configs\.0\.epochs: Input should be greater than or equal to 1"):
        sweep.validate_parameters({"configs": [{"epochs": 0}]})
    with pytest.raises(ParameterTypeError, match=r"grid\.base_lr: Input should be a valid list"):
        sweep.validate_parameters({"grid": {"base_lr": 0.01}})
    assert sweep.validate_parameters({"grid": {"epochs": [1, 2]}})["grid"] == {"epochs": [1, 2]}


def _sweep_artifact() -> tuple[list[dict], str]:
    from prefect.artifacts import Artifact

    artifact = Artifact.get("sweep-gate")
    return json.loads(artifact.data), artifact.description


@pytest.mark.slow
def test_sweep_promotes_only_the_best_candidate_and_registers_every_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.sweep import sweep

    # Both candidates pass (the gate itself is tested in test_gate.py and test_retrain_flow.py): the
    # sweep must still promote one, the better on the gate metric.
    monkeypatch.setattr("usecases.training.judge", lambda candidate, current, gate: GateVerdict(
        True, True, "clustering_bcubed_f", f"clustering_bcubed_f {candidate['clustering_bcubed_f']:.4f}: promoted"))
    base = store.current_model()
    configs = [small_train_config(), small_train_config(recipe="margin", seed=1)]

    result = sweep(configs=configs)

    candidates = result["candidates"]
    assert [entry["config"] for entry in candidates] == [{}, {"recipe": "margin", "seed": 1}]
    assert result["failed"] == [] and result["judged_by"] == "configured"
    figures = [entry["candidate_metrics"]["clustering_bcubed_f"] for entry in candidates]
    best, other = (candidates[0], candidates[1]) if figures[0] >= figures[1] else (candidates[1], candidates[0])
    assert [entry["promoted"] for entry in candidates] == [entry is best for entry in candidates]
    assert result["promoted_model_id"] == result["best_model_id"] == best["model_id"] == store.current_model().id
    assert best["reason"] == f"clustering_bcubed_f {best['candidate_metrics']['clustering_bcubed_f']:.4f}: promoted"
    assert other["reason"] == (
        f"passed the gate (clustering_bcubed_f {other['candidate_metrics']['clustering_bcubed_f']:.4f}) "
        f"but model {best['model_id']} scored higher in this sweep: not promoted")
    # Every candidate was judged against the same figures of the current model, on the same data.
    for entry in candidates:
        assert entry["current_metrics"]["clustering_bcubed_f"] == result["current_metrics"]["clustering_bcubed_f"]
        assert entry["judged_by_description"] == result["judged_by_description"]
    # Both stay in the registry, children of the base model, with their gate figures and reason.
    for index, entry in enumerate(candidates):
        record = registry.model_record(store, entry["model_id"])
        assert record["parent_id"] == base.id
        assert record["status"] == ("current" if entry is best else "rejected") and record["gate_reason"] == entry["reason"]
        assert record["metrics"]["clustering_bcubed_f"] == entry["candidate_metrics"]["clustering_bcubed_f"]
        assert record["metrics"]["calibration"] == entry["candidate_metrics"]["calibration"]
        run = registry.training_run(store, entry["training_run_id"])
        assert run["status"] == "done" and run["params"]["sweep"] == {"index": index, "configs": 2}
        assert run["params"]["train_config"]["recipe"] == configs[index].recipe
        assert run["metrics"]["promoted"] is (entry is best)
    assert len(registry.models_table(store)) == 3
    rows, description = _sweep_artifact()
    assert [row["model"] for row in rows] == [f"{base.id} (current)", *(str(entry["model_id"]) for entry in candidates)]
    assert description.startswith(f"**model {best['model_id']} promoted**")


@pytest.mark.slow
def test_a_sweep_no_candidate_passes_keeps_the_current_model_with_each_reason(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from usecases.training import sweep

    monkeypatch.setenv("FACEMINE_GATE__MIN_IMPROVEMENT", "1.0")  # no candidate can pass
    base = store.current_model()
    # The use case itself, without Prefect: plain steps, no GPU slot.
    result = sweep(Settings(), [small_train_config(), small_train_config(seed=1)])

    assert result["best_model_id"] is None and result["promoted_model_id"] is None
    assert store.current_model().id == base.id
    for entry in result["candidates"]:
        assert not entry["promoted"] and entry["judged"] and not entry["gate_passed"]
        assert "not more than the required 1): kept the current model" in entry["reason"]
        record = registry.model_record(store, entry["model_id"])
        assert record["status"] == "rejected" and record["gate_reason"] == entry["reason"]

"""Promotion gate, held-out identity choice, calibration, label churn and the closed loop's
stopping rule, on hand-checked values."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.calibration import VERIFICATION_Z, calibrate, cluster_floor, impostor_statistics
from pipeline.config import ClusterConfig, GateConfig
from pipeline.gate import gate_decision, judge, label_churn, should_stop
from pipeline.graph import MISSING, KnnGraph
from pipeline.holdout import PSEUDO, REVIEWED, choose_holdout_identities, identity_holdout_metrics

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
        with pytest.raises(ValidationError):
            GateConfig(guard_metrics=(metric,))


# ---- judge: the gate as configured --------------------------------------------------------------

BOTH = {"clustering_bcubed_f": 0.90, "verification_auc": 0.98, "verification_tar@far=0.001": 0.80}


def test_auto_metric_is_clustering_bcubed_f_when_measured_else_verification_auc() -> None:
    better = BOTH | {"clustering_bcubed_f": 0.92}
    verdict = judge(better, BOTH, GateConfig())
    assert (verdict.judged, verdict.passed, verdict.metric) == (True, True, "clustering_bcubed_f")
    pairs_only = {"verification_auc": 0.98}
    verdict = judge({"verification_auc": 0.97}, pairs_only, GateConfig())
    assert (verdict.judged, verdict.passed, verdict.metric) == (True, False, "verification_auc")


def test_a_guard_metric_that_falls_keeps_the_current_model() -> None:
    # Better clustering bought with a worse TAR@FAR=1e-3 is not promoted; a tolerance lets it pass.
    candidate = BOTH | {"clustering_bcubed_f": 0.95, "verification_tar@far=0.001": 0.79}
    verdict = judge(candidate, BOTH, GateConfig())
    assert verdict.judged and not verdict.passed
    assert "fell on verification_tar@far=0.001 0.7900 vs current 0.8000" in verdict.reason
    assert judge(candidate, BOTH, GateConfig(guard_tolerance=0.02)).passed is True
    # A guard measured on one side only does not block.
    assert judge({"clustering_bcubed_f": 0.95}, BOTH, GateConfig()).passed is True


def test_a_gain_only_at_the_calibrated_floors_is_a_scale_shift_and_keeps_the_current_model() -> None:
    # Measured: a candidate scoring at its calibrated floor what SFace scores at its best floor.
    current = BOTH | {"clustering_bcubed_f": 0.9568, "clustering_best_bcubed_f": 0.9600}
    shifted = BOTH | {"clustering_bcubed_f": 0.9600, "clustering_best_bcubed_f": 0.9600}
    verdict = judge(shifted, current, GateConfig())
    assert (verdict.judged, verdict.passed) == (True, False)
    assert verdict.reason == (
        "clustering_bcubed_f 0.9600 vs current 0.9568 (+0.0032, more than the required 0) only at the calibrated floors: at each "
        "model's best floor 0.9600 vs current 0.9600, a shift of the similarity scale, not a better model: "
        "kept the current model")
    better = shifted | {"clustering_best_bcubed_f": 0.9610}
    assert judge(better, current, GateConfig()).passed is True
    assert judge(shifted, current, GateConfig(floor_free_check=False)).passed is True
    # Where the best floors were not measured, the calibrated figures decide as before.
    assert judge(BOTH | {"clustering_bcubed_f": 0.96}, BOTH, GateConfig()).passed is True


def test_unmeasured_gate_metric_is_not_judged() -> None:
    verdict = judge({"verification_auc": 0.99}, {"verification_auc": 0.98}, GateConfig(metric="clustering_bcubed_f"))
    assert (verdict.judged, verdict.passed) == (False, False)
    assert verdict.reason == "not judged: clustering_bcubed_f was not measured for the candidate"


# ---- which identities judge -------------------------------------------------------------------


def _identities(faces: list[int], reviewed: set[int] = frozenset()) -> pd.DataFrame:
    ids = list(range(1, len(faces) + 1))
    return pd.DataFrame({"identity": ids, "faces": faces, "reviewed": [i in reviewed for i in ids]})


def test_reviewed_identities_judge_when_there_are_enough() -> None:
    table = _identities([5] * 10, reviewed={3, 7, 9})
    choice = choose_holdout_identities(table, share=0.2, min_identities=2)
    assert (choice.source, choice.identities) == (REVIEWED, [3, 7, 9])
    # A reviewed identity of one face cannot make a same-person pair: one usable is too few.
    table = _identities([5, 5, 1, 5, 5, 5, 5, 5, 5, 5], reviewed={3, 7})
    assert choose_holdout_identities(table, share=0.2, min_identities=2).source == PSEUDO


def test_pseudo_identities_are_a_stable_share_with_two_faces_or_more() -> None:
    table = _identities([5] * 18 + [1, 1])
    choice = choose_holdout_identities(table, share=0.2, min_identities=2, seed=0)
    assert choice.source == PSEUDO and len(choice.identities) == round(0.2 * 18)
    assert not {19, 20} & set(choice.identities)
    # The choice depends on the identities, not on the order the export lists them in.
    shuffled = table.sample(frac=1.0, random_state=3)
    assert choose_holdout_identities(shuffled, share=0.2, min_identities=2, seed=0) == choice
    assert choose_holdout_identities(table, share=0.2, min_identities=2, seed=1).identities != choice.identities


def test_too_few_identities_to_hold_out_says_so() -> None:
    choice = choose_holdout_identities(_identities([4, 4, 4]), share=0.2, min_identities=2)
    assert choice.identities == [] and choice.source == ""
    assert "3 identities" in choice.reason and "too few to hold 2 out" in choice.reason


def test_identity_holdout_metrics_judge_at_the_given_floor() -> None:
    # Two tight people on orthogonal axes: perfect pairs; a floor above their within-person
    # similarity splits everyone into singletons (BCubed recall 1/3 per face of a 3-face person).
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:2]
    vectors = np.repeat(centres, 3, axis=0) + 0.05 * rng.standard_normal((6, 16))
    people = np.array([0, 0, 0, 1, 1, 1])
    good = identity_holdout_metrics(vectors, people, floor=0.3, config=ClusterConfig(), max_pairs=100)
    assert good["verification_auc"] == 1.0 and good["clustering_bcubed_f"] == 1.0
    assert good["clustering_floor"] == 0.3 and good["holdout_identities"] == 2 and good["verification_pairs"] == 12
    split = identity_holdout_metrics(vectors, people, floor=0.999, config=ClusterConfig(), max_pairs=100)
    assert split["clustering_bcubed_recall"] == pytest.approx(1 / 3) and split["clustering_bcubed_precision"] == 1.0
    # The best floor within 0.15 of the given one (the lowest of those that score best).
    assert (good["clustering_best_bcubed_f"], good["clustering_best_floor"]) == (1.0, 0.15)
    assert (split["clustering_best_bcubed_f"], split["clustering_best_floor"]) == (0.5, 0.849)


# ---- calibration --------------------------------------------------------------------------------


def test_impostor_statistics_of_random_directions() -> None:
    # Cosines of independent random directions in D dimensions: centre 0, spread 1/sqrt(D).
    vectors = np.random.default_rng(0).standard_normal((3000, 256))
    centre, spread, pairs = impostor_statistics(vectors)
    assert pairs == 200_000
    assert abs(centre) < 0.002 and spread == pytest.approx(1 / 16, rel=0.02)


def test_calibrated_floor_follows_a_shift_of_the_similarity_scale() -> None:
    # A model that pulls every embedding towards one direction raises all similarities; its floor
    # rises with them, so one fixed floor would merge people the calibrated one keeps apart.
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 128))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    base = calibrate(vectors)
    pulled = calibrate(vectors + 0.4 * np.eye(128)[0])
    assert pulled["impostor_centre"] > base["impostor_centre"] + 0.1
    assert pulled["cluster_min_similarity"] > base["cluster_min_similarity"] + 0.1
    # Strangers only: the floor is where a face expects a quarter of an impostor link above it,
    # 1999 * P(Z > z) <= 0.25: z = 3.662, the grid's 3.67.
    centre, spread, _ = impostor_statistics(vectors)
    assert base["cluster_min_similarity"] == round(centre + 3.67 * spread, 4)
    assert base["verification_threshold"] == round(centre + VERIFICATION_Z * spread, 4)
    assert base["faces"] == 2000 and base["procedure"].startswith("random-pair")


def _graph_of(faces: int, links: int, similarity: float, k: int = 10) -> KnnGraph:
    """Every face lists `links` other faces at `similarity`, the rest of its k slots empty."""
    indices = np.full((faces, k), MISSING)
    similarities = np.full((faces, k), -np.inf, dtype=np.float32)
    indices[:, :links] = (np.arange(faces)[:, None] + 1 + np.arange(links)) % faces
    similarities[:, :links] = similarity
    return KnnGraph(indices, similarities)


def test_cluster_floor_keeps_a_quarter_impostor_links_at_most() -> None:
    # Impostors N(0, 0.1): above t a face expects (N - 1) * P(Z > t / 0.1) impostor links; the floor
    # is the first grid z (step 0.01) where that is at most a quarter of its links above t.
    # 1,001 faces with 10 links at 0.5 each: 1000 * P(Z > z) <= 2.5, z = 2.807 -> 0.281.
    assert cluster_floor(_graph_of(1001, 10, 0.5), 0.0, 0.1) == pytest.approx(0.281)
    # One link each: 1000 * P(Z > z) <= 0.25, z = 3.481 -> 0.349 (higher: fewer same-person links).
    assert cluster_floor(_graph_of(1001, 1, 0.5), 0.0, 0.1) == pytest.approx(0.349)
    # Ten times the faces with the same links: ten times the look-alikes, the floor rises likewise.
    assert cluster_floor(_graph_of(10001, 10, 0.5), 0.0, 0.1) == pytest.approx(0.349)
    # 101 faces: 100 * P(Z > z) <= 2.5, z = 1.960 -> 0.196; the floor follows the impostor scale.
    assert cluster_floor(_graph_of(101, 10, 0.5), 0.0, 0.1) == pytest.approx(0.196)
    assert cluster_floor(_graph_of(101, 10, 0.7), 0.2, 0.1) == pytest.approx(0.396)


def test_cluster_floor_of_a_sample_scales_to_its_collection() -> None:
    # 1,001 faces with 4 links each (k = 10): on their own 1000 * P(Z > z) <= 1, z = 3.090 -> 0.310.
    sample = _graph_of(1001, 4, 0.5)
    assert cluster_floor(sample, 0.0, 0.1) == pytest.approx(0.310)
    # As a sample of 5,001 faces: 20 same-person links per face, capped at k = 10, against
    # 5000 * P(Z > z) impostors: 5000 * P(Z > z) <= 2.5, z = 3.291 -> 0.330.
    assert cluster_floor(sample, 0.0, 0.1, collection_faces=5001) == pytest.approx(0.330)
    # A full list stays full: 10 links against 10000 * P(Z > z) impostors, z = 3.481 -> 0.349.
    assert cluster_floor(_graph_of(1001, 10, 0.5), 0.0, 0.1, collection_faces=10001) == pytest.approx(0.349)


def test_many_photos_per_person_lower_the_floor_at_one_impostor_distribution() -> None:
    # 2,000 single-photo people vs 100 people x 20 photos (same-person cosine about 0.48): both
    # have impostor cosines of random directions in 64 dimensions (centre 0, spread 1/8).
    rng = np.random.default_rng(3)
    alone = rng.standard_normal((2000, 64))
    strangers = calibrate(alone)
    people = np.repeat(rng.standard_normal((100, 64)), 20, axis=0) + rng.standard_normal((2000, 64))
    families = calibrate(people)
    assert families["impostor_spread"] == pytest.approx(strangers["impostor_spread"], rel=0.02)
    centre, spread, _ = impostor_statistics(alone)
    assert strangers["cluster_min_similarity"] == round(centre + 3.67 * spread, 4) == 0.4639
    # Twenty same-person links per face take the floor 0.85 spreads lower.
    assert families["cluster_min_similarity"] == 0.3573
    # A clustering whose k-NN lists hold 10 links sees at most 10 of them a face: a higher floor.
    assert calibrate(people, k=10)["cluster_min_similarity"] == 0.3879
    centre, spread, _ = impostor_statistics(people)
    assert families["verification_threshold"] == round(centre + VERIFICATION_Z * spread, 4)


def test_calibration_ignores_a_few_same_person_pairs() -> None:
    # 200 people x 5 faces: 0.4 % of random pairs are same-person (similar); median/MAD barely move.
    rng = np.random.default_rng(1)
    people = rng.standard_normal((200, 128))
    faces = np.repeat(people, 5, axis=0) + 0.3 * rng.standard_normal((1000, 128))
    alone = rng.standard_normal((1000, 128))
    assert calibrate(faces)["impostor_spread"] == pytest.approx(calibrate(alone)["impostor_spread"], rel=0.05)


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


def test_calibration_leaves_out_pairs_inside_one_pseudo_identity() -> None:
    # Three tight people: two random faces are one person a third of the time, which drags the
    # median up; left out by their clusters, only different people remain.
    rng = np.random.default_rng(2)
    people = np.eye(64)[:3]
    faces = np.repeat(people, 100, axis=0) + 0.05 * rng.standard_normal((300, 64))
    groups = np.repeat([0, 1, 2], 100)
    centre, _, pairs = impostor_statistics(faces, groups)
    # 300 * 299 / 2 pairs drawn; a partner outside the face's group 200 times in 299.
    assert abs(centre) < 0.02 and pairs == pytest.approx(300 * 299 / 2 * 200 / 299, rel=0.02)
    with pytest.raises(ValueError, match="2 groups"):
        impostor_statistics(faces, np.zeros(300))


def test_only_a_trained_model_clusters_at_its_own_calibrated_floor(tmp_path) -> None:
    from storage import registry
    from storage.settings import Settings
    from storage.store import Store

    store = Store(Settings(data_dir=tmp_path))
    preprocessing = {"template": "arcface_112"}
    base = store.register_model("base", "sface", None, "a" * 64, 128, preprocessing)
    child = store.register_model("child", "checkpoint", None, "b" * 64, 128, preprocessing, parent_id=base.id)
    settings_floor = ClusterConfig()
    assert registry.calibrated_cluster_config(store, child.id, settings_floor) == settings_floor  # not calibrated yet
    for model, floor in ((base, 0.31), (child, 0.47)):
        registry.update_model_metrics(store, model.id, {"calibration": {"cluster_min_similarity": floor}})
    # The settings' floor was measured for the base embedder; the trained one uses its own.
    assert registry.calibrated_cluster_config(store, base.id, settings_floor) == settings_floor
    assert registry.calibrated_cluster_config(store, child.id, settings_floor).min_similarity == 0.47
    assert settings_floor.min_similarity != 0.47

"""Clusterers and the identity step on synthetic identities (clustered points on the sphere).

These check the mechanics (constraints, merging, attaching, stable ids); clustering quality on
real faces is measured by benchmarks/cluster_quality.py and the real-photo integration tests.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_graph import sphere_clusters

from pipeline.cluster import CLUSTERERS, Constraints, cluster, cluster_faces, match_identities
from pipeline.config import ClusterConfig
from pipeline.errors import FacemineError
from pipeline.evaluate import clustering_metrics

PER_IDENTITY = 20
REPO = Path(__file__).resolve().parents[1]


def identities(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n well-separated synthetic identities of PER_IDENTITY faces each, and their true labels."""
    return sphere_clusters(n, PER_IDENTITY, noise=0.8, seed=seed), np.repeat(np.arange(n), PER_IDENTITY)


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def run(vectors: np.ndarray, **overrides) -> object:
    """cluster_faces with one photo per face, one subset and every face passed unless overridden."""
    n = len(vectors)
    arguments = {"photos": np.arange(n), "subsets": np.zeros(n, int), "passed": np.ones(n, bool)} | overrides
    return cluster_faces(vectors, **arguments)


@pytest.mark.parametrize("method", sorted(CLUSTERERS))
def test_every_clusterer_recovers_separated_identities(method: str) -> None:
    vectors, truth = identities(30)
    labels = cluster(vectors, ClusterConfig(method=method))

    assert labels.shape == truth.shape
    assert clustering_metrics(truth, labels)["bcubed_f"] > 0.9


def test_infomap_works_when_pipeline_cluster_is_the_first_import() -> None:
    # Regression: infomap loaded before faiss made its result iterators segfault (two SWIG modules).
    script = (
        "import numpy as np; from pipeline.cluster import cluster; "
        "x = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0) + 0.01 * np.arange(20)[:, None]; "
        "print(len(set(cluster(x).tolist())))"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "4"


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(FacemineError, match="unknown clustering method"):
        cluster(identities(2)[0], ClusterConfig(method="kmeans"))


def test_cluster_faces_recovers_identities_with_confidence() -> None:
    vectors, truth = identities(8)
    result = run(vectors)

    assert clustering_metrics(truth, result.labels)["bcubed_f"] > 0.95
    assert result.labels.max() + 1 == len(result.identities) == 8
    assert result.identities == [None] * 8
    assert np.all(result.source == "cluster")
    assert np.all((result.confidence >= 0) & (result.confidence <= 1))
    assert np.median(result.confidence) > 0.9


def test_two_faces_of_one_photo_never_share_an_identity() -> None:
    vectors, _ = identities(3)
    photos = np.arange(len(vectors))
    photos[6] = photos[5]  # faces 5 and 6 (same synthetic person) come from one photo
    result = run(vectors, photos=photos)

    assert result.labels[5] != result.labels[6]
    kept, removed = (5, 6) if result.labels[5] >= 0 and result.labels[5] == result.labels[0] else (6, 5)
    centre = unit(vectors[:PER_IDENTITY].mean(axis=0))
    assert vectors[kept] @ centre >= vectors[removed] @ centre
    assert result.stats["removed_for_cannot_link"] >= 1


def test_human_cannot_link_splits_a_pair() -> None:
    vectors, _ = identities(3)
    result = run(vectors, constraints=Constraints(cannot_link=[(22, 30)]))

    assert result.labels[22] != result.labels[30]


def test_must_link_unites_two_identities_and_pulls_in_a_low_quality_face() -> None:
    vectors, truth = identities(4)
    passed = np.ones(len(vectors), bool)
    passed[70] = False
    vectors[70] = sphere_clusters(1, 1, seed=99)[0]  # unrelated to everyone: would stay unassigned
    result = run(vectors, passed=passed, constraints=Constraints(must_link=[(0, 25), (1, 70)]))

    united = result.labels[0]
    assert united >= 0
    assert np.all(result.labels[truth <= 1] == united)
    assert result.labels[70] == united
    assert np.all(result.labels[(truth >= 2) & (np.arange(len(truth)) != 70)] != united)
    assert result.source[0] == "decision" and result.confidence[70] == 1.0


def test_contradictory_decisions_are_an_error() -> None:
    vectors, _ = identities(2)
    with pytest.raises(FacemineError, match="contradictory"):
        run(vectors, constraints=Constraints(must_link=[(0, 1), (1, 2)], cannot_link=[(0, 2)]))


def test_locked_identity_keeps_exactly_its_members() -> None:
    vectors, truth = identities(3)
    members = [0, 1, 2, 45]  # three faces of person 0 and, by human decision, one of person 2
    result = run(vectors, constraints=Constraints(fixed_members={"alice": members}))

    alice = result.identities.index("alice")
    np.testing.assert_array_equal(np.flatnonzero(result.labels == alice), members)
    assert np.all(result.source[members] == "decision")
    assert np.all(result.confidence[members] == 1.0)
    # Person 0's other faces still form their own identity.
    rest = result.labels[3:PER_IDENTITY]
    assert np.all(rest == rest[0]) and rest[0] not in (alice, -1)


def test_previous_identity_ids_survive_reclustering() -> None:
    vectors, truth = identities(4)
    previous = {face: f"person-{truth[face]}" for face in range(len(truth))}
    perturbed = sphere_clusters(4, PER_IDENTITY, noise=0.8, seed=0) + 0.02  # a "new model"
    result = run(perturbed, previous=previous)

    for face in (0, 25, 45, 79):
        assert result.identities[result.labels[face]] == f"person-{truth[face]}"


def test_rejected_face_is_not_reattached_to_that_identity() -> None:
    vectors, truth = identities(3)
    previous = {face: "bob" for face in range(PER_IDENTITY)}
    result = run(vectors, previous=previous, constraints=Constraints(rejected=[(3, "bob")]))

    bob = result.identities.index("bob")
    assert result.labels[4] == bob
    assert result.labels[3] != bob
    assert result.stats["removed_for_rejection"] == 1


def test_excluded_face_stays_unassigned() -> None:
    vectors, _ = identities(2)
    result = run(vectors, constraints=Constraints(excluded=[7]))

    assert result.labels[7] == -1 and result.source[7] == "unassigned" and result.confidence[7] == 0.0


def test_low_quality_faces_attach_only_when_confidently_close() -> None:
    vectors, truth = identities(3)
    centres = [unit(vectors[truth == person].mean(axis=0)) for person in range(3)]
    close = unit(centres[0] + 0.3 * (vectors[5] - centres[0]))
    between = unit(centres[1] + centres[2])
    stranger = sphere_clusters(1, 1, seed=123)[0]
    extra = np.stack([close, between, stranger])
    passed = np.r_[np.ones(len(vectors), bool), np.zeros(3, bool)]
    result = run(np.vstack([vectors, extra]), passed=passed)

    close_face, between_face, stranger_face = len(vectors) + np.arange(3)
    assert result.labels[close_face] == result.labels[0] and result.source[close_face] == "attached"
    assert 0 < result.confidence[close_face] <= 1
    assert result.labels[between_face] == -1 and result.labels[stranger_face] == -1
    assert result.stats["source_attached"] == 1


def test_same_person_merges_across_subsets_but_a_look_alike_does_not() -> None:
    rng = np.random.default_rng(5)
    person, other = sphere_clusters(2, 1, seed=7)
    # A look-alike: a different centre at cosine 0.6 to the person's.
    direction = unit(other - (other @ person) * person)
    look_alike = unit(0.6 * person + 0.8 * direction)

    def faces_around(centre: np.ndarray, count: int) -> np.ndarray:
        points = centre + 0.8 * rng.normal(size=(count, len(centre))) / np.sqrt(len(centre))
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)

    unrelated = sphere_clusters(2, PER_IDENTITY, noise=0.8, seed=11)
    # Subset 0: the person and a stranger; subset 1: the look-alike and another stranger;
    # subset 2: the person again.
    vectors = np.vstack([faces_around(person, 15), unrelated[:PER_IDENTITY],
                         faces_around(look_alike, 15), unrelated[PER_IDENTITY:], faces_around(person, 15)])
    subsets = np.repeat([0, 0, 1, 1, 2], [15, PER_IDENTITY, 15, PER_IDENTITY, 15])
    result = run(vectors, subsets=subsets)

    first, look_alikes, second = result.labels[:15], result.labels[35:50], result.labels[70:]
    assert np.all(first == first[0]) and np.all(second == first[0])
    assert np.all(look_alikes == look_alikes[0]) and look_alikes[0] != first[0]
    assert result.stats["merged_across_subsets"] == 1


def test_one_face_per_subset_still_merges_into_an_identity() -> None:
    vectors, truth = identities(3)
    # Person 0 has a single face in each of two subsets; everyone else is in subset 0.
    keep = np.r_[[0, 1], np.arange(PER_IDENTITY, 3 * PER_IDENTITY)]
    subsets = np.r_[0, 1, np.zeros(2 * PER_IDENTITY, int)]
    result = run(vectors[keep], subsets=subsets)

    assert result.labels[0] == result.labels[1] >= 0
    assert not np.isin(result.labels[0], result.labels[2:]).any()


def test_match_identities_follows_relabelling_and_small_changes() -> None:
    previous = {face: "x" for face in range(10)} | {face: "y" for face in range(10, 20)}
    relabelled = {face: 5 for face in range(10)} | {face: 2 for face in range(10, 20)}
    assert match_identities(previous, relabelled) == {5: "x", 2: "y"}

    changed = dict(relabelled) | {9: 2, 20: 5, 21: 8}  # one face moved, two new faces, a new cluster
    assert match_identities(previous, changed) == {5: "x", 2: "y", 8: None}


def test_match_identities_gives_a_split_identity_to_its_larger_part() -> None:
    previous = {face: "x" for face in range(10)} | {face: "y" for face in range(10, 20)}
    # Cluster 1 mixes 5 of x with 6 of y; cluster 2 holds the other 5 of x, cluster 3 the other 4 of y.
    current = {face: 1 for face in [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15]}
    current |= {face: 2 for face in [5, 6, 7, 8, 9]} | {face: 3 for face in [16, 17, 18, 19]}

    assert match_identities(previous, current) == {1: "y", 2: "x", 3: None}
    assert match_identities(previous, current, min_overlap=0.6) == {1: None, 2: "x", 3: "y"}

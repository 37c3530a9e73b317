"""Duplicate and outlier faces: byte-identical and re-encoded real photos, chip embeddings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, SFACE_WEIGHTS
from PIL import Image
from test_graph import sphere_clusters

from pipeline.config import DedupConfig, DetectConfig, IngestConfig, QualityConfig
from pipeline.dedup import find_duplicates, find_outliers
from pipeline.embed import create_embedder
from pipeline.errors import FacemineError
from pipeline.ingest import load_image
from pipeline.mining import build_miner

CELEBA = DATA / "celeba" / "images"
LFW = DATA / "lfw" / "images"
# Two byte-identical CelebA files filed under different names.
IDENTICAL = [CELEBA / "098498.jpg", CELEBA / "196333.jpg"]
OTHERS = [CELEBA / "000114.jpg", LFW / "AJ_Cook" / "AJ_Cook_0001.jpg", LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"]


def hashes(paths: list[Path]) -> tuple[list[str], list[str]]:
    loaded = [load_image(path, IngestConfig()) for path in paths]
    return [image.content_hash for image in loaded], [image.perceptual_hash for image in loaded]


def test_byte_identical_photos_keep_the_better_face() -> None:
    content, _ = hashes(IDENTICAL + OTHERS)
    quality = np.array([0.4, 0.9, 0.5, 0.5, 0.5])
    duplicate_of = find_duplicates(np.zeros(5, int), quality, content)

    np.testing.assert_array_equal(duplicate_of, [1, -1, -1, -1, -1])


def test_faces_of_different_identities_are_never_compared() -> None:
    content, _ = hashes(IDENTICAL)

    assert np.all(find_duplicates(np.array([0, 1]), np.ones(2), content) == -1)
    assert np.all(find_duplicates(np.array([-1, -1]), np.ones(2), content) == -1)


def test_reencoded_and_resized_copies_are_near_duplicates(tmp_path: Path) -> None:
    originals = [CELEBA / "000114.jpg", CELEBA / "000131.jpg", LFW / "AJ_Cook" / "AJ_Cook_0001.jpg"]
    copies = []
    for number, path in enumerate(originals):
        image = Image.open(path).convert("RGB")
        reencoded, resized = tmp_path / f"{number}_q40.jpg", tmp_path / f"{number}_small.png"
        image.save(reencoded, quality=40)
        image.resize((image.width * 3 // 5, image.height * 3 // 5), Image.Resampling.BILINEAR).save(resized)
        copies += [reencoded, resized]
    content, perceptual = hashes(originals + copies)
    # Originals are the better copies; the resized copy of the first photo is better still.
    quality = np.r_[np.ones(3), np.full(6, 0.5)]
    quality[4] = 2.0
    duplicate_of = find_duplicates(np.zeros(9, int), quality, content, perceptual_hashes=perceptual)

    np.testing.assert_array_equal(duplicate_of, [4, -1, -1, 4, -1, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def miner():  # noqa: ANN201
    embedder = create_embedder("sface", SFACE_WEIGHTS, device="cpu")
    return build_miner(IngestConfig(), DetectConfig(), QualityConfig(), embedder, 16, False, 1)


def test_cropped_copy_is_found_by_chip_embedding_but_another_shot_is_not(tmp_path: Path, miner) -> None:  # noqa: ANN001
    # A 6% crop moves the perceptual hash too far, but the face chip is the same pixels.
    original = LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"
    image = Image.open(original).convert("RGB")
    margin = image.width * 6 // 100
    cropped = tmp_path / "cropped.jpg"
    image.crop((margin, margin, image.width - margin, image.height - margin)).save(cropped, quality=95)
    # Two different shots of one person must not count as copies.
    powell = LFW / "Colin_Powell"
    paths = [original, cropped, powell / "Colin_Powell_0001.jpg", powell / "Colin_Powell_0002.jpg"]
    records = miner.process([str(path) for path in paths])
    faces = [max(record.faces, key=lambda face: face.detection.box[2] - face.detection.box[0]) for record in records]
    embeddings = np.stack([face.embedding for face in faces])
    content = [record.content_hash for record in records]
    perceptual = [record.perceptual_hash for record in records]
    quality = np.array([1.0, 0.5, 1.0, 1.0])

    by_hash = find_duplicates(np.zeros(4, int), quality, content, perceptual_hashes=perceptual)
    by_embedding = find_duplicates(np.zeros(4, int), quality, content, embeddings=embeddings)

    assert by_hash[1] == -1
    np.testing.assert_array_equal(by_embedding, [-1, 0, -1, -1])


def test_outliers_lie_far_from_their_identity_centroid() -> None:
    vectors = sphere_clusters(2, 10, noise=0.5)
    stranger = sphere_clusters(1, 1, seed=42)
    labels = np.r_[np.zeros(10, int), np.ones(10, int), 0, -1]
    outliers = find_outliers(np.vstack([vectors, stranger, stranger]), labels, DedupConfig().outlier_max_distance)

    np.testing.assert_array_equal(np.flatnonzero(outliers), [20])


def test_malformed_perceptual_hash_is_an_error() -> None:
    with pytest.raises(FacemineError, match="not hexadecimal"):
        find_duplicates(np.zeros(2, int), np.ones(2), ["a", "b"], perceptual_hashes=["zz" * 8, "00" * 8])

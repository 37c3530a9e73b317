"""Embedders: SFace parity with onnxruntime, verification on real LFW pairs, facenet, checkpoints."""
from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch
from facenet_pytorch import MTCNN, InceptionResnetV1

from conftest import DATA, SFACE_WEIGHTS
from pipeline.align import align_face
from pipeline.embed import (
    EMBEDDERS,
    Embedder,
    create_embedder,
    register_embedder,
    save_checkpoint,
)
from pipeline.errors import FacemineError
from pipeline.hashing import file_sha256

LFW = DATA / "lfw"
# OpenCV's published cosine threshold for SFace (same person at or above it).
SFACE_SAME_PERSON_COSINE = 0.363
PAIRS_PER_CLASS = 40


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def sface() -> Embedder:
    return create_embedder("sface", SFACE_WEIGHTS, device="cpu")


def aligned_largest_faces(paths: list[str], batch_size: int = 32) -> dict[str, np.ndarray]:
    """arcface_112 chips of the largest MTCNN face per LFW photo; photos without a face are left out."""
    # LFW faces span ~50-100 px of the 150 px photos, so smaller pyramid levels would only cost time.
    detector = MTCNN(keep_all=True, min_face_size=40, device="cpu")
    chips = {}
    for start in range(0, len(paths), batch_size):
        batch_paths = paths[start : start + batch_size]
        images = np.stack([read_rgb(LFW / path) for path in batch_paths])  # all 150x150
        batch_boxes, _, batch_landmarks = detector.detect(images, landmarks=True)
        for path, image, boxes, landmarks in zip(batch_paths, images, batch_boxes, batch_landmarks):
            if boxes is None:
                continue
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            chips[path] = align_face(image, landmarks[np.argmax(areas)], "arcface_112")
    return chips


@pytest.fixture(scope="module")
def lfw_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligned chips of LFW pairs (a, b) and whether each pair is the same person."""
    pairs = pd.read_csv(LFW / "pairs.csv")
    sample = pd.concat(
        [group.sample(PAIRS_PER_CLASS, random_state=0) for _, group in pairs.groupby("same")]
    )
    chips = aligned_largest_faces(sorted(set(sample.path_a) | set(sample.path_b)))
    usable = sample[sample.path_a.isin(chips) & sample.path_b.isin(chips)]
    assert len(usable) >= 0.95 * len(sample), "MTCNN missed faces in too many LFW photos"
    chips_a = np.stack([chips[path] for path in usable.path_a])
    chips_b = np.stack([chips[path] for path in usable.path_b])
    return chips_a, chips_b, usable.same.to_numpy().astype(bool)


@pytest.fixture(scope="module")
def lfw_photos_112() -> np.ndarray:
    """Real (unaligned) LFW photos resized to the SFace input: real pixel statistics, no detector needed."""
    paths = pd.read_csv(LFW / "labels.csv").path.iloc[:6]
    return np.stack([cv2.resize(read_rgb(LFW / path), (112, 112), interpolation=cv2.INTER_AREA) for path in paths])


def test_sface_matches_onnxruntime(sface: Embedder, lfw_photos_112: np.ndarray) -> None:
    session = onnxruntime.InferenceSession(str(SFACE_WEIGHTS), providers=["CPUExecutionProvider"])
    # The ONNX model takes raw 0..255 RGB floats in NCHW and normalises internally.
    reference = session.run(None, {"data": lfw_photos_112.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(sface.embed(lfw_photos_112), reference, atol=1e-4)


def test_sface_output_is_normalised_deterministic_and_batch_independent(
    sface: Embedder, lfw_photos_112: np.ndarray
) -> None:
    embeddings = sface.embed(lfw_photos_112)
    assert embeddings.shape == (len(lfw_photos_112), 128)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(sface.embed(lfw_photos_112), embeddings)
    np.testing.assert_allclose(sface.embed(lfw_photos_112, batch_size=4), embeddings, atol=1e-5)
    # Different faces give different embeddings.
    assert np.abs(embeddings[0] - embeddings[1]).max() > 0.01


def test_embed_runs_in_eval_and_inference_mode_then_restores_training(
    sface: Embedder, lfw_photos_112: np.ndarray
) -> None:
    seen: list[tuple[bool, bool]] = []
    hook = sface.module.register_forward_hook(
        lambda module, inputs, output: seen.append((module.training, torch.is_inference_mode_enabled()))
    )
    sface.module.train()
    try:
        sface.embed(lfw_photos_112, batch_size=4)
        assert sface.module.training, "embed must hand a training module back in training mode"
    finally:
        hook.remove()
        sface.module.eval()
    assert seen == [(False, True), (False, True)]


def test_inference_copy_embeds_the_same_and_refuses_training(sface: Embedder, lfw_photos_112: np.ndarray) -> None:
    fast = sface.for_inference()
    assert fast.weights_hash == sface.weights_hash and fast.module is not sface.module
    np.testing.assert_allclose(fast.embed(lfw_photos_112, batch_size=4), sface.embed(lfw_photos_112), atol=1e-5)
    np.testing.assert_allclose(
        fast.embed(lfw_photos_112[:1], flip_tta=True), sface.embed(lfw_photos_112[:1], flip_tta=True), atol=1e-5
    )
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fast.module.train()


def test_empty_input_gives_empty_embeddings(sface: Embedder) -> None:
    embeddings = sface.embed(np.zeros((0, 112, 112, 3), dtype=np.uint8))
    assert embeddings.shape == (0, 128)
    assert embeddings.dtype == np.float32


def test_to_tensor_rejects_chips_that_do_not_fit(sface: Embedder) -> None:
    with pytest.raises(FacemineError, match="re-align"):
        sface.to_tensor(np.zeros((1, 160, 160, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        sface.to_tensor(np.zeros((1, 112, 112, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        sface.to_tensor(np.zeros((1, 112, 112), dtype=np.uint8))


def test_to_tensor_applies_colour_order_and_normalisation(sface: Embedder) -> None:
    chip = np.zeros((1, 112, 112, 3), dtype=np.uint8)
    chip[..., 0] = 255  # pure red
    rgb = sface.to_tensor(chip)
    assert rgb.shape == (1, 3, 112, 112) and rgb.dtype == torch.float32
    assert rgb[0, 0].eq(255).all() and rgb[0, 1:].eq(0).all()
    bgr_model = dataclasses.replace(
        sface,
        preprocessing=dataclasses.replace(sface.preprocessing, color="BGR", mean=(127.5,) * 3, std=(128.0,) * 3),
    )
    bgr = bgr_model.to_tensor(chip)
    assert bgr[0, 2].eq((255 - 127.5) / 128).all() and bgr[0, :2].eq(-127.5 / 128).all()


@pytest.fixture(scope="module")
def lfw_pair_embeddings(sface: Embedder, lfw_pairs) -> tuple[np.ndarray, np.ndarray]:
    chips_a, chips_b, _ = lfw_pairs
    return sface.embed(chips_a), sface.embed(chips_b)


@pytest.mark.slow
def test_sface_verifies_real_lfw_pairs(lfw_pairs, lfw_pair_embeddings) -> None:
    same = lfw_pairs[2]
    cosine = rowwise_cosine(*lfw_pair_embeddings)
    accuracy = np.mean((cosine >= SFACE_SAME_PERSON_COSINE) == same)
    assert accuracy >= 0.95, f"verification accuracy {accuracy:.3f}"


@pytest.mark.slow
def test_wrong_colour_order_lowers_same_person_similarity(sface: Embedder, lfw_pairs, lfw_pair_embeddings) -> None:
    chips_a, chips_b, same = lfw_pairs
    rgb = rowwise_cosine(lfw_pair_embeddings[0][same], lfw_pair_embeddings[1][same])
    bgr = rowwise_cosine(sface.embed(chips_a[same][..., ::-1]), sface.embed(chips_b[same][..., ::-1]))
    assert bgr.mean() < rgb.mean() - 0.01, f"RGB {rgb.mean():.3f} vs BGR {bgr.mean():.3f}"


@pytest.mark.slow
def test_flip_tta_is_close_to_but_not_the_plain_embedding(sface: Embedder, lfw_pairs, lfw_pair_embeddings) -> None:
    chips, plain = lfw_pairs[0][:16], lfw_pair_embeddings[0][:16]
    with_flip = sface.embed(chips, flip_tta=True)
    np.testing.assert_allclose(np.linalg.norm(with_flip, axis=1), 1.0, atol=1e-5)
    cosine = rowwise_cosine(plain, with_flip)
    assert cosine.min() > 0.9
    assert cosine.max() < 0.9999, "flip TTA changed nothing"
    # Chip + mirror is symmetric: the mirrored chips give the same TTA embedding.
    np.testing.assert_allclose(sface.embed(chips[:, :, ::-1], flip_tta=True), with_flip, atol=1e-4)


def test_missing_sface_weights_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FacemineError, match="weights not found"):
        create_embedder("sface", tmp_path / "absent.onnx", device="cpu")
    with pytest.raises(FacemineError, match="needs a weights file"):
        create_embedder("sface", None, device="cpu")


def test_corrupt_sface_weights_is_a_user_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(FacemineError, match="cannot read SFace ONNX"):
        create_embedder("sface", corrupt, device="cpu")


def test_unknown_embedder_name_lists_known_ones() -> None:
    with pytest.raises(FacemineError, match="sface"):
        create_embedder("no-such-model")


def test_registry_holds_the_documented_embedders_and_refuses_duplicates() -> None:
    assert {"sface", "facenet-vggface2", "facenet-casia", "checkpoint"} <= set(EMBEDDERS)
    with pytest.raises(ValueError, match="already registered"):
        register_embedder("sface")(lambda weights, device: None)


def test_facenet_loads_a_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state_dict = InceptionResnetV1(classify=False).state_dict()
    # facenet-pytorch's released files also carry the training classifier; it must be ignored.
    state_dict["logits.weight"] = torch.zeros(7, 512)
    state_dict["logits.bias"] = torch.zeros(7)
    weights = tmp_path / "facenet.pt"
    torch.save(state_dict, weights)

    embedder = create_embedder("facenet-vggface2", weights, device="cpu")
    assert embedder.preprocessing.template == "facenet_160"
    assert embedder.preprocessing.embedding_dim == 512
    assert embedder.weights_hash == file_sha256(weights)
    chips = np.random.default_rng(0).integers(0, 256, (2, 160, 160, 3), dtype=np.uint8)
    embeddings = embedder.embed(chips)
    assert embeddings.shape == (2, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_facenet_without_weights_or_internet_asks_for_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty download cache

    def offline(url: str, destination: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("facenet_pytorch.models.inception_resnet_v1.download_url_to_file", offline)
    with pytest.raises(FacemineError, match="pass a local weights file"):
        create_embedder("facenet-casia", device="cpu")


def test_facenet_rejects_weights_of_another_model(tmp_path: Path) -> None:
    weights = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(FacemineError, match="not an InceptionResnetV1"):
        create_embedder("facenet-vggface2", weights, device="cpu")


def test_checkpoint_round_trip_keeps_trained_weights(
    sface: Embedder, lfw_photos_112: np.ndarray, tmp_path: Path
) -> None:
    trained = create_embedder("sface", SFACE_WEIGHTS, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trained.module.parameters():
            parameter.add_(0.02 * parameter.std().nan_to_num() * torch.randn_like(parameter))
    expected = trained.embed(lfw_photos_112)
    assert rowwise_cosine(expected, sface.embed(lfw_photos_112)).min() < 0.9999, "perturbation had no effect"

    path = save_checkpoint(trained, tmp_path / "model.pt", extra={"epoch": 3})
    assert sorted(tmp_path.iterdir()) == [path], "temporary file left behind"
    loaded = create_embedder("checkpoint", path, device="cpu")

    np.testing.assert_allclose(loaded.embed(lfw_photos_112), expected, atol=1e-6)
    assert loaded.preprocessing == sface.preprocessing
    assert (loaded.name, loaded.kind) == ("checkpoint", "sface")
    assert loaded.weights_hash == file_sha256(path) != sface.weights_hash
    # A checkpoint of a checkpoint still rebuilds from the SFace architecture.
    again = create_embedder("checkpoint", save_checkpoint(loaded, tmp_path / "again.pt"), device="cpu")
    np.testing.assert_allclose(again.embed(lfw_photos_112), expected, atol=1e-6)


def test_checkpoint_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"format": "something-else/2"}, path)
    with pytest.raises(FacemineError, match="not a facemine checkpoint"):
        create_embedder("checkpoint", path, device="cpu")

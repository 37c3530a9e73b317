"""Ingest: walking folders, decoding odd and broken files, hashing; on real photos."""
from __future__ import annotations

import hashlib
import itertools
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.errors import FacemineError
from pipeline.hashing import NotARegularFile, file_sha256, open_regular_file
from pipeline.ingest import (
    ImageRejected,
    downscale_for_detection,
    hamming_distance,
    iter_image_files,
    load_image,
    path_from_key,
    path_key,
    walk_photos,
)

from odd_files import (
    DIFFERENT_PHOTOS_MIN_BITS,
    LFW_IMAGES,
    SAME_PHOTO_MAX_BITS,
    SCENES,
    TEST_MAX_PIXELS,
    make_hostile_folder,
    make_odd_folder,
    offered_outcomes,
    real_rgb,
    walk_outcomes,
)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder with every kind of odd file; returns it and name -> expected outcome."""
    root = tmp_path_factory.mktemp("photos")
    return root, make_odd_folder(root)


def outcome(path: Path) -> str:
    try:
        load_image(path, IngestConfig(max_image_pixels=TEST_MAX_PIXELS))
    except ImageRejected as rejected:
        return f"{rejected.status}: {rejected.reason}"
    return "ok"


def load(path: Path):
    return load_image(path, IngestConfig(max_image_pixels=TEST_MAX_PIXELS))


def test_walk_lists_each_image_once_in_sorted_order(odd_folder):
    root, expected = odd_folder
    found = list(walk_photos([root], IngestConfig().extensions))
    relative = [Path(file.path).relative_to(root).as_posix() for file in found]
    assert all(Path(file.path).is_absolute() for file in found)
    assert relative == sorted(expected, key=lambda name: name.split("/")), "each file once, sorted"
    rejected = {name for name, file in zip(relative, found) if file.status}
    assert rejected == {"broken_link.jpg"}, "only the broken link is rejected without being opened"
    mined = [path.relative_to(root).as_posix() for path in iter_image_files([root], IngestConfig().extensions)]
    assert mined == [name for name in relative if name not in rejected]


def test_every_file_is_accounted_for(odd_folder):
    root, expected = odd_folder
    outcomes = walk_outcomes(str(root), TEST_MAX_PIXELS)
    assert set(outcomes) == set(expected)
    for name, outcome_seen in outcomes.items():
        assert outcome_seen.startswith(expected[name]), name


def test_reasons_carry_details(odd_folder):
    root, _ = odd_folder
    assert outcome(root / "bomb.jpg") == "failed: decompression-bomb: 3.1e+06 pixels"
    assert outcome(root / "broken_link.jpg") == "failed: unreadable: FileNotFoundError: No such file or directory"
    assert outcome(root / "folder.jpg") == "failed: unreadable: not a regular file (folder)"


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile")
    yield root, make_hostile_folder(root)
    (root / "locked").chmod(0o755)  # let pytest clean up


def test_hostile_inputs_are_offered_with_their_reasons(hostile_folder):
    """FIFOs, devices, sockets, loops, unreadable files and folders, odd names and damaged or
    unnamed photos: the walk finishes, offers each once with the right outcome, and never
    enters a store's data folder or a dataset export."""
    root, expected = hostile_folder
    outcomes = offered_outcomes(root)  # permissions apply; bounded in time (a FIFO read would hang)
    assert set(outcomes) == set(expected)
    for name, outcome_seen in outcomes.items():
        assert outcome_seen.startswith(expected[name]), (name, outcome_seen)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: opening a FIFO for reading blocks until a writer comes."""
    def give_up(_signal: int, _frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_special_files_are_never_opened_for_reading(hostile_folder):
    root, _ = hostile_folder
    with deadline(20):
        for name, kind in (("fifo.jpg", "FIFO"), ("device.jpg", "character device"), ("socket.png", "socket")):
            with pytest.raises(NotARegularFile, match=rf"not a regular file \({kind}\)"):
                file_sha256(root / name)
            assert outcome(root / name) == f"failed: unreadable: not a regular file ({kind})"


def test_fifo_swapped_in_after_the_type_check_is_not_read(hostile_folder, monkeypatch):
    root, _ = hostile_folder
    regular = os.stat(root / "jpeg_named.png")
    real_stat = os.stat
    def stat_before_the_swap(path, *args, **kwargs):  # noqa: ANN001, ANN202 - os.stat's signature
        return regular if str(path).endswith("fifo.jpg") else real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", stat_before_the_swap)
    with deadline(20), pytest.raises(NotARegularFile, match="FIFO"):
        open_regular_file(root / "fifo.jpg")


def test_non_utf8_name_gets_a_printable_stable_key(hostile_folder):
    root, _ = hostile_folder
    [found] = [file for file in walk_photos([root], IngestConfig().extensions) if "caf" in file.path]
    assert found.key == path_key(root) + "/caf\\xe9.jpg"
    found.key.encode("utf-8")  # storable as text
    assert os.fsencode(found.path) == os.fsencode(root) + b"/caf\xe9.jpg", "mined through its real bytes"
    assert path_from_key(found.key) == found.path
    assert load_image(found.path, IngestConfig()).width == 360


def test_excluded_folders_are_never_entered(odd_folder):
    root, expected = odd_folder
    walked = walk_photos([root], IngestConfig().extensions, excluded=[root / "nested"])
    found = {Path(file.path).relative_to(root).as_posix() for file in walked}
    assert found == set(expected) - {"link_to_nested/inner.png"}


def test_pillow_global_limit_is_left_alone(odd_folder):
    root, _ = odd_folder
    before = Image.MAX_IMAGE_PIXELS
    assert outcome(root / "bomb.jpg").startswith("failed: decompression-bomb")
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(root / "bomb.jpg", IngestConfig()).width == 1986


def test_loaded_image_fields(odd_folder):
    root, _ = odd_folder
    data = (root / "plain.jpg").read_bytes()
    loaded = load(root / "plain.jpg")
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (480, 360, 3)
    assert (loaded.width, loaded.height) == (360, 480)
    assert loaded.content_hash == hashlib.sha256(data).hexdigest()
    assert loaded.size_bytes == len(data)
    assert len(loaded.perceptual_hash) == 16
    assert loaded.rgb.flags.writeable


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_greyscale_becomes_three_equal_channels(odd_folder):
    rgb = load(odd_folder[0] / "grey.jpg").rgb
    grey = np.array(Image.fromarray(real_rgb()).convert("L"))
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    assert mean_abs_difference(rgb[..., 0], grey) < 3


def test_transparency_is_composited_on_white(odd_folder):
    original = real_rgb()
    half = original.shape[1] // 2
    grey = np.array(Image.fromarray(original).convert("L").convert("RGB"))
    for name, reference in (("rgba.png", original), ("grey_alpha.png", grey)):
        rgb = load(odd_folder[0] / name).rgb
        assert np.all(rgb[:, :half] == 255), name
        assert np.array_equal(rgb[:, half:], reference[:, half:]), name


def test_cmyk_converts_to_rgb(odd_folder):
    assert mean_abs_difference(load(odd_folder[0] / "cmyk.jpg").rgb, real_rgb()) < 8


def test_sixteen_bit_is_scaled_not_clipped(odd_folder):
    rgb = load(odd_folder[0] / "sixteen_bit.png").rgb
    grey = np.array(Image.fromarray(real_rgb()).convert("L"))
    assert np.array_equal(rgb[..., 0], grey) and np.array_equal(rgb[..., 2], grey)


def test_palette_image_keeps_its_colours(odd_folder):
    quantized = np.array(Image.fromarray(real_rgb()).quantize(colors=64).convert("RGB"))
    assert np.array_equal(load(odd_folder[0] / "palette.png").rgb, quantized)


def test_animated_gif_uses_first_frame(odd_folder):
    rgb = load(odd_folder[0] / "animated.gif").rgb
    assert rgb.shape == (48, 64, 3)
    assert np.all(rgb == [255, 0, 0])


@pytest.mark.parametrize("name", ["exif_6.jpg", "exif_8.jpg"])
def test_exif_orientation_is_applied(odd_folder, name):
    path = odd_folder[0] / name
    with Image.open(path) as stored:
        assert stored.size == (480, 360), "stored sideways"
    loaded = load(path)
    assert (loaded.width, loaded.height) == (360, 480)
    assert mean_abs_difference(loaded.rgb, real_rgb()) < 4


def test_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(FacemineError, match="folder not found"):
        list(iter_image_files([tmp_path, tmp_path / "missing"], IngestConfig().extensions))


def test_file_root_is_yielded_as_is(tmp_path, monkeypatch):
    (tmp_path / "photo.raw").write_bytes(b"data")
    monkeypatch.chdir(tmp_path)
    [found] = iter_image_files(["photo.raw"], IngestConfig().extensions)
    assert found.is_absolute() and found.samefile(tmp_path / "photo.raw")


def test_overlapping_roots_list_each_file_once(odd_folder):
    root, expected = odd_folder
    found = [file.path for file in walk_photos([root, root / "nested"], IngestConfig().extensions)]
    assert len(found) == len(set(found)) == len(expected)


REAL_PHOTOS = [
    SCENES / "single_face" / "facenet_kate_siegel.jpg",
    SCENES / "single_face" / "skimage_astronaut.png",
    SCENES / "multi_face" / "couple.jpg",
    SCENES / "multi_face" / "selfie-many-people.jpg",
    SCENES / "annotated" / "2008_002506.jpg",
    SCENES / "no_face" / "skimage_coffee.png",
    LFW_IMAGES / "AJ_Cook" / "AJ_Cook_0001.jpg",
    LFW_IMAGES / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg",
]


@pytest.mark.parametrize("path", REAL_PHOTOS, ids=lambda path: path.name)
def test_perceptual_hash_survives_reencoding_and_resizing(tmp_path, path):
    original = load_image(path, IngestConfig())
    smaller = Image.fromarray(original.rgb).reduce(2)
    copy = tmp_path / "copy.jpg"
    smaller.save(copy, quality=40)
    distance = hamming_distance(original.perceptual_hash, load_image(copy, IngestConfig()).perceptual_hash)
    assert distance <= SAME_PHOTO_MAX_BITS


def test_perceptual_hash_separates_different_photos():
    hashes = [load_image(path, IngestConfig()).perceptual_hash for path in REAL_PHOTOS]
    distances = [hamming_distance(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) >= DIFFERENT_PHOTOS_MIN_BITS


def test_hamming_distance():
    assert hamming_distance("00000000000000ff", "0000000000000001") == 7
    assert hamming_distance("ffffffffffffffff", "0000000000000000") == 64
    with pytest.raises(ValueError):
        hamming_distance("ff", "00ff")


def test_downscale_for_detection_geometry():
    image = np.zeros((3000, 2000, 3), dtype=np.uint8)
    image[1500, 1000] = 255
    small, scale = downscale_for_detection(image, 1600)
    assert small.shape == (1600, 1067, 3)
    assert scale == pytest.approx(1600 / 3000)
    y, x = np.unravel_index(small[..., 0].argmax(), small.shape[:2])
    assert np.allclose(np.array([x, y]) / scale, [1000, 1500], atol=2)
    unchanged, unit = downscale_for_detection(small, 1600)
    assert unchanged is small and unit == 1.0

"""A folder of every kind of odd and broken photo file, made at test time from one real photo."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
SCENES = SHARED / "data" / "scenes"
LFW_IMAGES = SHARED / "data" / "lfw" / "images"
PORTRAIT = SCENES / "annotated" / "2008_001009.jpg"  # 360 wide, 480 high
LARGE_PHOTO = SCENES / "multi_face" / "dlib_bald_guys.jpg"  # 1986 x 1545
# Small enough that LARGE_PHOTO counts as a bomb, large enough for every other test photo.
TEST_MAX_PIXELS = 1_000_000
EXIF_ORIENTATION = 0x0112
# Bits of 64 that may differ between copies of one photo, and must differ between photos.
SAME_PHOTO_MAX_BITS = 4
DIFFERENT_PHOTOS_MIN_BITS = 16


def real_rgb(path: Path = PORTRAIT) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels but holds no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def save_with_orientation(rgb: np.ndarray, path: Path, orientation: int, stored_as: Image.Transpose) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(rgb).transpose(stored_as).save(path, quality=95, exif=exif.tobytes())


def make_odd_folder(root: Path) -> dict[str, str]:
    """Fill `root`; returns relative path -> expected outcome ("ok" or "status: reason-prefix")."""
    rgb = real_rgb()
    grey = np.array(Image.fromarray(rgb).convert("L"))
    opaque_right_half = np.zeros(grey.shape, dtype=np.uint8)
    opaque_right_half[:, grey.shape[1] // 2:] = 255

    Image.fromarray(rgb).save(root / "plain.jpg", quality=95)
    Image.fromarray(rgb).save(root / "UPPER_CASE.JPG", quality=95)
    Image.fromarray(grey).save(root / "grey.jpg", quality=95)
    Image.fromarray(np.dstack([rgb, opaque_right_half])).save(root / "rgba.png")
    grey_alpha = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(opaque_right_half)])
    grey_alpha.save(root / "grey_alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "sixteen_bit.png")
    Image.fromarray(rgb).quantize(colors=64).save(root / "palette.png")
    red, blue = (Image.new("RGB", (64, 48), colour) for colour in ("red", "blue"))
    red.save(root / "animated.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    # Orientation 6: displayed = stored turned 90 degrees clockwise; 8: counter-clockwise.
    save_with_orientation(rgb, root / "exif_6.jpg", 6, stored_as=Image.Transpose.ROTATE_90)
    save_with_orientation(rgb, root / "exif_8.jpg", 8, stored_as=Image.Transpose.ROTATE_270)

    (root / "empty.jpg").touch()
    jpeg = (root / "plain.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.jpg").write_text("not a photo\n")
    (root / "bomb.jpg").write_bytes(LARGE_PHOTO.read_bytes())
    (root / "header_bomb.png").write_bytes(png_header_claiming(30_000, 30_000))
    (root / "broken_link.jpg").symlink_to(root / "deleted.jpg")
    (root / "notes.txt").write_text("not an image extension: never listed\n")

    nested = root / "nested"
    nested.mkdir()
    Image.fromarray(rgb).save(nested / "inner.png")
    (nested / "loop").symlink_to(root, target_is_directory=True)
    (root / "link_to_nested").symlink_to(nested, target_is_directory=True)
    folder_named_like_photo = root / "folder.jpg"
    folder_named_like_photo.mkdir()
    Image.fromarray(rgb).save(folder_named_like_photo / "in_folder.webp")

    expected = {
        "UPPER_CASE.JPG": "ok", "animated.gif": "ok", "cmyk.jpg": "ok", "exif_6.jpg": "ok",
        "exif_8.jpg": "ok", "grey.jpg": "ok", "grey_alpha.png": "ok", "palette.png": "ok",
        "plain.jpg": "ok", "rgba.png": "ok", "sixteen_bit.png": "ok",
        # The symlink sorts first, so the nested folder is listed through it, and only once.
        "folder.jpg/in_folder.webp": "ok", "link_to_nested/inner.png": "ok",
        "empty.jpg": "failed: empty-file",
        "truncated.jpg": "failed: truncated",
        "text.jpg": "skipped: not-an-image",
        "bomb.jpg": "failed: decompression-bomb",
        "header_bomb.png": "failed: decompression-bomb",
        "broken_link.jpg": "failed: unreadable",
    }
    return expected


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_hostile_folder(root: Path) -> dict[str, str]:
    """Fill `root` with kinds of input that hang, abort or pollute a naive miner; returns relative
    record key -> expected outcome, as `make_odd_folder`. The unreadable file and folder are
    unreadable only without root's permission override (see `offered_outcomes`)."""
    rgb = real_rgb()
    jpeg = jpeg_bytes(rgb)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    os.mkfifo(root / "fifo.jpg")
    (root / "device.jpg").symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(root / "socket.png"))
    (root / "loop_a.jpg").symlink_to(root / "loop_b.jpg")
    (root / "loop_b.jpg").symlink_to(root / "loop_a.jpg")
    (root / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg)  # Latin-1 name: not UTF-8
    (root / "new\nline.jpg").write_bytes(jpeg)
    (root / "no_extension").write_bytes(jpeg)
    (root / "jpeg_named.png").write_bytes(jpeg)
    (root / "png_named.txt").write_bytes(png.getvalue())
    (root / "README").write_text("no photo, no photo name: never offered\n")
    (root / "damaged_header.jpg").write_bytes(jpeg[:4] + bytes(range(256)) * 8)
    with open(root / "too_large.jpg", "wb") as sparse:  # no disk used: a hole after the photo
        sparse.write(jpeg)
        sparse.truncate(TEST_MAX_PIXELS * 8 + 1)
    (root / "unreadable.jpg").write_bytes(jpeg)
    (root / "unreadable.jpg").chmod(0)
    locked = root / "locked"
    locked.mkdir()
    (locked / "inside.jpg").write_bytes(jpeg)
    locked.chmod(0)
    store = root / "facemine-data"  # a store's data folder: its chips are never mined again
    (store / "chips" / "ab").mkdir(parents=True)
    (store / "facemine.db").touch()
    (store / "chips" / "ab" / "chip.png").write_bytes(png.getvalue())
    export = root / "datasets" / "v1"  # a dataset export copied elsewhere
    (export / "000001_anna").mkdir(parents=True)
    (export / "dataset_card.json").write_text("{}")
    (export / "manifest.parquet").touch()
    (export / "000001_anna" / "chip.png").write_bytes(png.getvalue())
    not_regular = "failed: unreadable: not a regular file"
    return {
        "fifo.jpg": f"{not_regular} (FIFO)",
        "device.jpg": f"{not_regular} (character device)",
        "socket.png": f"{not_regular} (socket)",
        "loop_a.jpg": "failed: unreadable: OSError: Too many levels of symbolic links",
        "loop_b.jpg": "failed: unreadable: OSError: Too many levels of symbolic links",
        "caf\\xe9.jpg": "ok",
        "new\nline.jpg": "ok",
        "no_extension": "ok",
        "jpeg_named.png": "ok",
        "png_named.txt": "ok",
        "damaged_header.jpg": "failed: corrupt: JPEG header damaged",
        "too_large.jpg": "failed: too-large",
        "unreadable.jpg": "failed: unreadable: PermissionError",
        "locked": "failed: unreadable: folder cannot be listed: PermissionError",
    }


def without_root_override(command: list[str]) -> list[str]:
    """`command` run so that file permissions apply: as root, without the capabilities that
    let root read anything (tests run as root in containers)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root: util-linux's setpriv is needed to test unreadable files"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]


def offered_outcomes(root: Path, max_pixels: int = TEST_MAX_PIXELS) -> dict[str, str]:
    """Relative record key -> outcome of every file the walk offers under `root` (rejected by
    the walk, or loaded), computed in a process where file permissions apply."""
    script = (
        "import json, sys; from odd_files import walk_outcomes; "
        "print(json.dumps(walk_outcomes(sys.argv[1], int(sys.argv[2]))))"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    done = subprocess.run(without_root_override([sys.executable, "-c", script, str(root), str(max_pixels)]),
                          capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(done.stdout)


def walk_outcomes(root: str, max_pixels: int) -> dict[str, str]:
    from pipeline.config import IngestConfig
    from pipeline.ingest import ImageRejected, load_image, path_key, walk_photos

    config = IngestConfig(max_image_pixels=max_pixels)
    prefix = path_key(root) + "/"
    outcomes = {}
    for found in walk_photos([root], config.extensions):
        outcome = f"{found.status}: {found.reason}" if found.status else "ok"
        if found.status is None:
            try:
                load_image(found.path, config)
            except ImageRejected as rejected:
                outcome = f"{rejected.status}: {rejected.reason}"
        outcomes[found.key.removeprefix(prefix)] = outcome
    return outcomes

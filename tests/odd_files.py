"""A folder of every kind of odd and broken photo file, made at test time from one real photo."""
from __future__ import annotations

import struct
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

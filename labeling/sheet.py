"""Contact sheets: an identity's face chips in a grid, each captioned with its face id (PNG)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import FacemineError
from labeling.actions import IdentityInfo
from storage.dataroot import atomic_write_bytes
from storage.files import encode_png
from storage.identities import face_table
from storage.store import Store

CAPTION_HEIGHT = 14
BACKGROUND = 255


def contact_sheet(store: Store, chip_paths: list[str], captions: list[str], columns: int = 10, title: str = "") -> np.ndarray:
    """RGB uint8 grid of chips (as stored, resized to the first chip's size) with a caption under each."""
    if not chip_paths:
        raise FacemineError("no faces to draw")
    chips = [store.chips.get(path) for path in chip_paths]
    height, width = chips[0].shape[:2]
    columns = max(1, min(columns, len(chips)))
    rows = math.ceil(len(chips) / columns)
    header = CAPTION_HEIGHT + 4 if title else 0
    cell_h = height + CAPTION_HEIGHT
    canvas = Image.new("RGB", (columns * width, header + rows * cell_h), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for index, (chip, caption) in enumerate(zip(chips, captions)):
        x, y = (index % columns) * width, header + (index // columns) * cell_h
        tile = Image.fromarray(chip)
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.BILINEAR)
        canvas.paste(tile, (x, y))
        draw.text((x + 2, y + height + 1), caption, fill=(0, 0, 0), font=font)
    return np.clip(np.asarray(canvas), 0, 255).astype(np.uint8)


def write_identity_sheet(store: Store, identity: IdentityInfo, run_id: int, out: Path, columns: int = 10) -> Path:
    """Write an identity's faces in the current labelling as a PNG contact sheet at `out`."""
    if not identity.faces:
        raise FacemineError(f"identity {identity.id} has no faces in clustering run {run_id}")
    chip_paths = face_table(store).set_index("face_id").chip_path.loc[list(identity.faces)].tolist()
    title = f"{identity.label()} - {len(identity.faces)} faces - clustering run {run_id}"
    sheet = contact_sheet(store, chip_paths, [str(face) for face in identity.faces], columns, title)
    atomic_write_bytes(out, encode_png(sheet))
    return out

"""Face chips as terminal thumbnails, cached.

``halfblock`` (default) draws two pixels per character cell with coloured half blocks
(rich-pixels): it works in every colour terminal, tmux and CI included. ``graphics`` uses
textual-image, which picks the terminal's own graphics protocol (Sixel, Kitty) when the terminal
answers its query and falls back to half blocks otherwise; it queries the terminal on import,
so it is chosen before the app starts.
"""
from __future__ import annotations

from functools import lru_cache

from PIL import Image as PILImage
from rich_pixels import Pixels
from textual.widget import Widget
from textual.widgets import Static

from pipeline.errors import FacemineError
from storage.files import ChipStore

THUMBNAIL_MODES = ("halfblock", "graphics")


class Thumbnails:
    def __init__(self, chips: ChipStore, mode: str = "halfblock", size: int = 16, cache_size: int = 4096) -> None:
        if mode not in THUMBNAIL_MODES:
            raise FacemineError(f"unknown thumbnail mode {mode!r}; choose from {', '.join(THUMBNAIL_MODES)}")
        if size < 4 or size % 2:
            raise FacemineError(f"thumbnail size must be an even number of at least 4 columns, got {size}")
        self.chips, self.mode, self.size = chips, mode, size
        # Columns x rows of one thumbnail: a cell shows two pixel rows.
        self.columns, self.rows = size, size // 2
        self._image = lru_cache(maxsize=cache_size)(self._load)
        if mode == "graphics":
            from textual_image.widget import Image  # queries the terminal: must run before Textual starts

            self._graphics_widget = Image
        self._pixels = lru_cache(maxsize=cache_size)(self._render_pixels)

    def _load(self, chip_path: str) -> PILImage.Image:
        chip = self.chips.get(chip_path)
        return PILImage.fromarray(chip).resize((self.size, self.size), PILImage.Resampling.BILINEAR)

    def _render_pixels(self, chip_path: str) -> Pixels:
        return Pixels.from_image(self._image(chip_path))

    def widget(self, chip_path: str) -> Widget:
        if self.mode == "graphics":
            image = self._graphics_widget(self._image(chip_path), classes="thumb")
            image.styles.width, image.styles.height = self.columns, self.rows
            return image
        return Static(self._pixels(chip_path), classes="thumb")

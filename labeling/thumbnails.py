"""Face chips as terminal thumbnails, cached.

``auto`` (default) shows real images through textual-image when the terminal speaks a graphics
protocol (Sixel: xterm, foot, WezTerm, iTerm2 3.5+; Kitty's graphics protocol) and half blocks
otherwise. ``halfblock`` draws two pixels per character cell with coloured half blocks
(rich-pixels): it works in every colour terminal, tmux and CI included, in true colour where the
terminal has it (Textual reduces the colours where it does not). ``graphics`` always uses
textual-image. textual-image queries the terminal on import, so the mode is settled before the app
starts.
"""
from __future__ import annotations

from functools import lru_cache

from PIL import Image as PILImage
from rich_pixels import Pixels
from textual.widget import Widget
from textual.widgets import Static

from pipeline.errors import FacemineError
from storage.files import ChipStore

THUMBNAIL_MODES = ("auto", "halfblock", "graphics")
# Below this a face cannot be judged; the app shrinks thumbnails no further.
MIN_SIZE = 8


def terminal_has_graphics() -> bool:
    """Whether textual-image found a graphics protocol (Sixel or Kitty's) in this terminal."""
    from textual_image.renderable import Image, SixelImage, TGPImage  # queries the terminal

    return Image in (SixelImage, TGPImage)


class Thumbnails:
    """Thumbnails `size` columns wide and `size // 2` rows high (a half-block cell is two pixels)."""

    def __init__(self, chips: ChipStore, mode: str = "auto", size: int = 32, cache_size: int = 4096) -> None:
        if mode not in THUMBNAIL_MODES:
            raise FacemineError(f"unknown thumbnail mode {mode!r}; choose from {', '.join(THUMBNAIL_MODES)}")
        if size < MIN_SIZE or size % 2:
            raise FacemineError(f"thumbnail size must be an even number of at least {MIN_SIZE} columns, got {size}")
        self.chips, self.size = chips, size
        self.graphics = mode == "graphics" or (mode == "auto" and terminal_has_graphics())
        self.mode = "graphics" if self.graphics else "halfblock"
        if self.graphics:
            from textual_image.widget import Image  # queries the terminal: must run before Textual starts

            self._graphics_widget = Image
        self._chip = lru_cache(maxsize=cache_size)(self._load)
        self._pixels = lru_cache(maxsize=cache_size)(self._render_pixels)

    def _load(self, chip_path: str) -> PILImage.Image:
        return PILImage.fromarray(self.chips.get(chip_path))

    def _render_pixels(self, chip_path: str, size: int) -> Pixels:
        return Pixels.from_image(self._chip(chip_path).resize((size, size), PILImage.Resampling.LANCZOS))

    def widget(self, chip_path: str, size: int | None = None) -> Widget:
        """The chip `size` columns wide (default: the configured size)."""
        size = size or self.size
        if self.graphics:
            # The whole chip: the terminal scales it to the cells, at its own pixel density.
            image = self._graphics_widget(self._chip(chip_path), classes="thumb")
            image.styles.width, image.styles.height = size, size // 2
            return image
        return Static(self._pixels(chip_path, size), classes="thumb")

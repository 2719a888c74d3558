"""Whole-slide images to patches: readers (cuCIM, OpenSlide), tissue masks, patch grids, streaming."""

from .reader import SlideReader, open_slide

__all__ = ["SlideReader", "open_slide"]

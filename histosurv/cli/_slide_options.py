"""Options shared by the commands that start from slides (tile, predict --slide, demo)."""

from __future__ import annotations

import argparse
import sys


def add_slide_options(parser: argparse.ArgumentParser, encoder_options: bool = True) -> None:
    from ..runtime.slides.tiler import GridConfig
    from ..runtime.slides.tissue import TissueConfig

    g, t = GridConfig(), TissueConfig()
    group = parser.add_argument_group("slides")
    if encoder_options:
        group.add_argument("--encoder", help="patch-encoder model in the repository (default: the one that fits)")
        group.add_argument("--encoder-version", type=int, help="default: the highest")
        group.add_argument("--encoder-engine", default="auto", help="patch-encoder engine (default: auto)")
    group.add_argument("--mpp", type=float, default=g.mpp, help=f"µm per pixel of the patches (default: {g.mpp}, i.e. 20x)")
    group.add_argument("--min-tissue", type=float, default=g.min_tissue,
                       help=f"fraction of a patch that must be tissue (default: {g.min_tissue})")
    group.add_argument("--threshold", default=t.threshold,
                       help="tissue saturation threshold 0-255, or 'otsu' (default: otsu, clipped to "
                       f"[{t.otsu_min:g}, {t.otsu_max:g}])")
    group.add_argument("--mask-downsample", type=float, default=t.downsample,
                       help=f"resolution of the tissue mask, relative to level 0 (default: {t.downsample:g})")
    group.add_argument("--batch-size", type=int, default=32, help="patches per encoder call (default: 32)")
    group.add_argument("--workers", type=int, default=2, help="slide decode workers (default: 2)")
    group.add_argument("--reader", default="auto", choices=["auto", "cucim", "openslide"])
    group.add_argument("--device", default="cpu", help="decode and mask slides on: cpu or cuda (default: cpu)")
    if encoder_options:  # the server takes it per request
        group.add_argument("--slide-mpp", type=float, help="µm per pixel of level 0, for slides that do not record it")


def slide_config(args: argparse.Namespace):
    from ..errors import InputError
    from ..runtime.pipeline import SlideConfig
    from ..runtime.slides.tiler import GridConfig
    from ..runtime.slides.tissue import TissueConfig

    threshold = args.threshold
    if threshold != "otsu":
        try:
            threshold = float(threshold)
        except ValueError:
            raise InputError(f"--threshold must be 'otsu' or a number 0-255, got {threshold!r}") from None
    return SlideConfig(
        tissue=TissueConfig(downsample=args.mask_downsample, threshold=threshold),
        grid=GridConfig(mpp=args.mpp, min_tissue=args.min_tissue),
        batch_size=args.batch_size,
        num_workers=args.workers,
        reader=args.reader,
        device=args.device,
        slide_mpp=getattr(args, "slide_mpp", None),
    )


def progress_printer(label: str):
    """Prints 'label: done/total patches' to stderr about every 10%, so long slides show progress."""
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if done / total >= state["next"] or done == total:
            print(f"\r{label}: {done}/{total} patches", end="\n" if done == total else "", file=sys.stderr, flush=True)
            state["next"] = done / total + 0.1

    return report

"""Options shared by the commands that start from slides (tile, predict --slide, score, serve).

Defaults come from the config dataclasses (``SlideConfig``, ``TissueConfig``, ``GridConfig``), so
they are written once. The µm/px is not a default at all: patches are cut at the scale the model's
training bags were cut at (see ``runtime.encoder_match``); ``--mpp`` overrides it, with a warning, and
every output made under it records the override.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_slide_options(parser: argparse.ArgumentParser, encoder_options: bool = True) -> None:
    from ..runtime.pipeline import SlideConfig

    s = SlideConfig()
    g, t = s.grid, s.tissue
    group = parser.add_argument_group("slides")
    if encoder_options:
        group.add_argument("--encoder", help="patch-encoder model in the repository (default: the one the model's "
                           "training bags were made with, found by its record)")
        group.add_argument("--encoder-version", type=int, help="version of --encoder (default: the highest)")
        group.add_argument("--encoder-engine", default="auto", help="patch-encoder engine: a manifest key such as "
                           "onnxruntime, or auto, the best this machine runs (default: auto)")
        group.add_argument("--allow-encoder-mismatch", action="store_true",
                           help="score with an encoder, or bags, other than the ones the model was trained on "
                           "(refused without it; the outputs record the override)")
    group.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                       help="cut patches at this µm/px instead of the model's training scale (an override: it "
                       "prints a warning and is recorded in the outputs; default: the training bags' µm/px, "
                       "else the encoder's)")
    group.add_argument("--min-tissue", type=float, default=g.min_tissue,
                       help=f"fraction of a patch that must be tissue (default: {g.min_tissue:g})")
    group.add_argument("--threshold", default=t.threshold,
                       help="tissue saturation threshold 0-255, or otsu (default: otsu, clipped to "
                       f"[{t.otsu_min:g}, {t.otsu_max:g}])")
    group.add_argument("--mask-downsample", type=float, default=t.downsample,
                       help=f"resolution of the tissue mask, relative to level 0 (default: {t.downsample:g})")
    group.add_argument("--batch-size", type=int, default=s.batch_size,
                       help="patches per encoder call (default: 32, or 8 for an INT8 encoder: the fastest measured)")
    group.add_argument("--threads", type=int, metavar="N",
                       help="encoder threads (default: HISTOSURV_THREADS, else every core this process may use: "
                       "its CPU affinity and cgroup quota)")
    group.add_argument("--workers", type=int, default=s.num_workers, metavar="N",
                       help="slide decode workers (default: one per four usable cores beside a CPU encoder, all "
                       "cores but one beside a GPU encoder)")
    group.add_argument("--reader", default=s.reader, choices=["auto", "cucim", "openslide"],
                       help=f"slide reader (default: {s.reader}: cuCIM where it reads the format, else OpenSlide)")
    group.add_argument("--device", default=s.device, choices=["cpu", "cuda"],
                       help=f"decode and mask slides on (default: {s.device}; cuda needs cuCIM with CuPy and a GPU)")
    if encoder_options:  # the server takes it per request
        group.add_argument("--slide-mpp", type=float, metavar="UM_PER_PX",
                           help="µm/px of level 0, for slide files that do not record it")


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
    if args.mpp is not None and not args.mpp > 0:
        raise InputError(f"--mpp must be a positive number of µm per pixel, got {args.mpp}")
    for flag, value in (("--threads", args.threads), ("--workers", args.workers), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if args.threads is not None:
        # read by every engine this process loads (and by the Ray workers it starts), as the user's own setting
        os.environ["HISTOSURV_THREADS"] = str(args.threads)
    if args.device == "cuda":
        _check_gpu()
    return SlideConfig(
        tissue=TissueConfig(downsample=args.mask_downsample, threshold=threshold),
        grid=GridConfig(min_tissue=args.min_tissue),
        batch_size=args.batch_size,
        num_workers=args.workers,
        reader=args.reader,
        device=args.device,
        slide_mpp=getattr(args, "slide_mpp", None),
    )


def _check_gpu() -> None:
    """--device cuda on a machine that cannot decode on a GPU is the environment's problem, said before
    any slide is opened (else it would surface as an error about the first slide)."""
    from ..errors import HistosurvError
    from ..runtime.slides.tissue import gpu_available

    if not gpu_available():
        raise HistosurvError(
            "--device cuda: this machine cannot decode or mask slides on a GPU (it needs a CUDA device, cupy and "
            "cuCIM: pip install 'histosurv[gpu]'); use --device cpu"
        )


def print_notes(command: str, notes) -> None:
    """Overrides in effect and facts that could not be checked, on stderr, once each."""
    for note in dict.fromkeys(notes):
        print(f"histosurv {command}: {'warning' if note.startswith('override') else 'note'}: {note}", file=sys.stderr)


def progress_printer(label: str, stream=None):
    """Prints 'label: done/total patches' to ``stream`` (stderr) as a slide is encoded. On a terminal one
    line is rewritten about every 10%; elsewhere (CI logs, nohup, Ray workers) a carriage return is not
    a new line, so whole lines are printed, about every 25%."""
    stream = sys.stderr if stream is None else stream
    tty = stream.isatty()
    step = 0.1 if tty else 0.25
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if done / total >= state["next"] or done == total:
            text = f"{label}: {done}/{total} patches"
            if tty:
                print("\r" + text, end="\n" if done == total else "", file=stream, flush=True)
            else:
                print(text, file=stream, flush=True)
            state["next"] = done / total + step

    return report

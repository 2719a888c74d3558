"""histosurv tile: slides -> CLAM-layout feature files (tissue mask, patch grid, encoder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._slide_options import add_slide_options, print_notes, progress_printer, slide_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tile",
        help="find the tissue of slides, cut it into patches and encode them into h5 feature files",
        description="Writes one CLAM-layout h5 per slide: 'features' (N x D), 'coords' (N x 2, level-0 top-left "
        "corners) and attributes (the encoder's record, patch size, level, µm/px, sha256 of the slide). Patches are "
        "cut at the encoder's µm/px, or with --model at the scale that model's training bags were cut at, by the "
        "encoder they were made with.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (.svs, .tiff, .ndpi, ...)")
    p.add_argument("--out", required=True, help="output .h5 for one slide, or a folder for <slide name>.h5 files")
    p.add_argument("--repo", required=True, help="model repository holding the patch encoder")
    p.add_argument("--model", help="make the features this survival model takes: its training encoder and µm/px")
    p.add_argument("--overwrite", action="store_true", help="replace feature files that exist")
    add_slide_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.features import bag_path, write_bag
    from ..errors import HistosurvError, InputError
    from ..runtime.pipeline import featurize_slide, open_encoder
    from ..runtime.repository import ModelRepository

    out = Path(args.out)
    single_file = out.suffix.lower() in (".h5", ".hdf5")
    if single_file and len(args.slides) > 1:
        raise InputError(f"--out {out} is one file but {len(args.slides)} slides were given; give a folder")
    targets = [out if single_file else bag_path(out, Path(s).name) for s in args.slides]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise InputError(f"{', '.join(existing[:3])} already exist; pass --overwrite to replace them")
    config = slide_config(args)
    model = ModelRepository(args.repo).version(args.model, verify=False) if args.model else None
    encoder, choice = open_encoder(
        args.repo, model, args.encoder, args.encoder_version, args.encoder_engine, args.mpp, args.allow_encoder_mismatch
    )
    print_notes("tile", choice.notes)
    failed = 0
    for slide, target in zip(args.slides, targets):
        try:
            result = featurize_slide(slide, encoder, config, progress_printer(Path(slide).name))
        except HistosurvError as e:
            if len(args.slides) == 1:
                raise
            failed += 1
            print(f"histosurv tile: {slide}: error: {e}")
            continue
        write_bag(target, result.bag)
        print(f"{target}: {len(result.bag)} x {result.bag.dim} features from {slide} ({result.slide['backend']}, "
              f"level {result.grid.level}, {result.grid.mpp:.3g} µm/px, encoder {encoder.version.label})")
        print(f"  {result.timing_line()}")
    if failed:
        print(f"{failed} of {len(args.slides)} slides failed")
        return 2
    return 0

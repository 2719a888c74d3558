"""``histosurv`` command line: one module per command, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import HistosurvError

__all__ = ["main"]

COMMANDS = ("demo", "synth", "train", "import", "export", "verify", "tile", "predict", "serve", "score")
MODULES = {"import": "import_checkpoint"}  # a command named like a Python keyword


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histosurv",
        description="Inference runtime for multimodal (whole-slide image + genes) survival models.",
    )
    parser.add_argument("--version", action="version", version=f"histosurv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = __import__(f"histosurv.cli.{MODULES.get(name, name)}", fromlist=["add_parser"])
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands whose flags a config file can also set
    try:
        return int(args.handler(args) or 0)
    except (HistosurvError, FileExistsError) as e:
        print(f"histosurv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histosurv {args.command}: interrupted", file=sys.stderr)
        return 130

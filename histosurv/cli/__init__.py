"""``histosurv`` command line: one module per command, each with ``add_parser`` and ``run``.

The serving commands (predict, evaluate, tile, score, serve, synth, report) run on the base install. The PyTorch side
(train, import, export, verify, demo) needs the ``train`` extra; where it is absent such a command is
still listed, and running it says how to install the extra instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .. import __version__
from ..errors import HistosurvError

__all__ = ["main"]

COMMANDS = ("demo", "synth", "train", "import", "export", "verify", "tile", "predict", "evaluate", "serve", "score", "report")
MODULES = {"import": "import_checkpoint"}  # a command named like a Python keyword
# The commands of the PyTorch side: without torch each is listed with a note and explains itself when run.
TRAIN_COMMANDS = frozenset({"demo", "train", "import", "export", "verify"})
INSTALL_TRAIN = "pip install 'histosurv[train]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histosurv",
        description="Inference runtime for multimodal (whole-slide image + genes) survival models.",
    )
    parser.add_argument("--version", action="version", version=f"histosurv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    without_torch = importlib.util.find_spec("torch") is None
    for name in COMMANDS:
        module = importlib.import_module(f"histosurv.cli.{MODULES.get(name, name)}")
        if without_torch and name in TRAIN_COMMANDS:
            _add_stub(sub, name, module)
        else:
            module.add_parser(sub)
    return parser


def _add_stub(sub, name: str, module) -> None:
    """``name`` as a command that says which extra it needs (whatever its arguments) and exits 2."""
    summary = (module.__doc__ or "").strip().splitlines()[0].partition(": ")[2].rstrip(".")
    p = sub.add_parser(name, help=f"{summary} (needs the train extra: {INSTALL_TRAIN})",
                       description=f"histosurv {name} needs the PyTorch side, which this install lacks: {INSTALL_TRAIN}")
    p.set_defaults(handler=lambda args: _refuse(name), takes_any_arguments=True)


def _refuse(name: str) -> int:
    print(f"histosurv {name}: error: needs the PyTorch side, which this install lacks (no module named 'torch'): "
          f"{INSTALL_TRAIN}", file=sys.stderr)
    return 2


# Optional packages a command may need, and how to get them (the extras of pyproject.toml).
_OPTIONAL_PACKAGES = {
    "tensorrt": "TensorRT, which is not installed: pip install 'histosurv[tensorrt]' on a machine with an NVIDIA GPU "
                "(the wheels come from NVIDIA's index)",
    "torch": "PyTorch, which is not installed (the serving set does not have it): pip install 'histosurv[train]'",
    "onnxscript": "onnxscript, which is not installed: pip install 'histosurv[train]'",
    "onnx": "onnx, which is not installed: pip install 'histosurv[train]'",
    "safetensors": "safetensors, which is not installed: pip install 'histosurv[train]'",
    "ray": "Ray, which is not installed: pip install 'histosurv[ray]'",
    "cupy": "CuPy, which is not installed: pip install 'histosurv[gpu]' on a machine with an NVIDIA GPU",
    "matplotlib": "matplotlib, which is not installed: pip install 'histosurv[report]'",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):  # a stub explains itself whatever it is given
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # for commands whose flags a config file can also set
    try:
        return int(args.handler(args) or 0)
    except (HistosurvError, FileExistsError) as e:
        print(f"histosurv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        hint = _OPTIONAL_PACKAGES.get((e.name or "").split(".")[0])
        if hint is None:  # not an optional package: a broken install, whose traceback is the useful answer
            raise
        print(f"histosurv {args.command}: error: this needs {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histosurv {args.command}: interrupted", file=sys.stderr)
        return 130

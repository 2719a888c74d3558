"""No non-finite number is ever served as a success (DESIGN.md).

Two checks, one on each side of an engine:

* :func:`check_input_range`: finite inputs can still be far outside anything the model was trained on
  (genes of 3e38 are finite FP32, and their standardised value overflows inside the graph). Genes whose
  distance from the training mean, in training standard deviations, exceeds ``MAX_GENE_SDS`` are
  refused as INVALID_ARGUMENT naming the genes. The bound is far beyond any real expression value (a
  log-scaled expression 10^6 sd from its mean is a units or parsing error), so it refuses only what
  cannot be meant.
* :func:`check_outputs`: whatever got through, a NaN or infinite risk, survival or attention is an
  engine failure (:class:`NonFiniteOutput`, INTERNAL, counted as a failure), never an answer.
"""

from __future__ import annotations

import numpy as np

from ..errors import HistosurvError, InputError

__all__ = ["MAX_GENE_SDS", "NonFiniteOutput", "check_input_range", "check_outputs"]

MAX_GENE_SDS = 1e6


class NonFiniteOutput(HistosurvError, RuntimeError):
    """An engine returned NaN or an infinity: a failure of the model on this input, not an answer."""


def check_input_range(info, inputs: dict[str, np.ndarray]) -> None:
    """InputError naming the genes of ``inputs`` that lie beyond ``MAX_GENE_SDS`` training standard deviations
    (NaN, the marker of a missing vector, is not checked here)."""
    genes, spec = inputs.get("genes"), getattr(info, "genes", None)
    if genes is None or spec is None or spec.mean is None or spec.scale is None:
        return
    z = np.abs((np.asarray(genes, np.float64).reshape(-1) - np.asarray(spec.mean)) / np.asarray(spec.scale))
    far = np.flatnonzero(z > MAX_GENE_SDS)
    if far.size:
        shown = ", ".join(f"{spec.names[i]} = {float(np.asarray(genes).reshape(-1)[i]):.3g}" for i in far[:5])
        raise InputError(
            f"'genes' is out of the range the model was trained on: {shown} "
            f"(more than {MAX_GENE_SDS:.0e} training standard deviations from the mean; check the units)"
        )


def check_outputs(outputs: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
    bad = [name for name, array in outputs.items()
           if np.asarray(array).dtype.kind == "f" and not np.isfinite(array).all()]
    if bad:
        raise NonFiniteOutput(f"model '{model}' produced non-finite {', '.join(bad)} for this input")
    return outputs

"""Patch positions are checked wherever a bag enters (issue 22): a corrupted h5 or a malformed request
with negative or impossible coordinates is refused by name, not turned into a risk."""

from __future__ import annotations

import numpy as np
import pytest

from histosurv.data.features import MAX_COORD, Bag, validate_bag
from histosurv.errors import InputError


def _bag(coords):
    coords = np.asarray(coords, np.int64)
    return Bag(np.ones((len(coords), 4), np.float32), coords, {}, "slide.h5")


def test_positions_inside_any_slide_pass():
    assert validate_bag(_bag([[0, 0], [256, 512], [MAX_COORD, 0]])).coords.dtype == np.int64


@pytest.mark.parametrize("coords, message", [
    ([[0, 0], [-256, 0]], r"slide\.h5: 'coords' has a negative position \(-256\)"),
    ([[0, 2**62]], r"slide\.h5: 'coords' has a position of 4611686018427387904 px, beyond any slide \(at most 10,000,000 px\)"),
])
def test_impossible_positions_are_refused(coords, message):
    with pytest.raises(InputError, match=message):
        validate_bag(_bag(coords))

"""Harrell's concordance index: it lives in :mod:`histosurv.data.concordance`, where the serving side
(``histosurv evaluate``, which never imports ``export/``) reads it too; these names stay for the
training code and for callers that import them from here."""

from __future__ import annotations

from ..data.concordance import Concordance, concordance_index

__all__ = ["Concordance", "concordance_index"]

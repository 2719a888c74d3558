"""The few exceptions histosurv raises on purpose.

Each names what was received, what was expected and, where it helps, what to do next. They
subclass built-in types so callers that already catch ValueError or FileNotFoundError keep working;
the CLI turns any :class:`HistosurvError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

__all__ = ["HistosurvError", "InputError", "MissingInputError", "RepositoryError", "SlideError", "EmptySlideError",
           "MismatchError", "StartupError"]


class HistosurvError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputError(HistosurvError, ValueError):
    """A file or tensor given to histosurv is malformed (wrong shape, NaN, missing column, ...)."""


class MissingInputError(HistosurvError, FileNotFoundError):
    """A file or entry that the input refers to does not exist."""


class RepositoryError(HistosurvError, ValueError):
    """A model repository is missing, incomplete, or its files do not match the manifest."""


class SlideError(InputError):
    """A slide file cannot be opened or read: not a slide, an unsupported format, damaged or cut short."""


class EmptySlideError(InputError):
    """A slide was read but holds no tissue patches to score (an empty bag), so no risk can be given."""


class StartupError(HistosurvError, OSError):
    """The machine cannot do what was asked of it at start-up: a port in use, an address not its own."""


class MismatchError(InputError):
    """Features would reach a model from another patch encoder, or another µm/px, than its training bags
    came from (see ``runtime.encoder_match``): the risk would be meaningless, so it is refused."""

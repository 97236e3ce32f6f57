"""Errors that carry a one-line, actionable message for the CLI and the app.

Every failure a user can cause (a bad model id, no network, a non-GPT-2
checkpoint, empty text...) is raised as a :class:`NolnError` subclass whose
``str()`` is a single line saying what happened and what to do.  Callers show
that line; they never need the traceback.
"""

from __future__ import annotations


class NolnError(Exception):
    """Base class: ``str(err)`` is one line meant for the user."""

    def __str__(self) -> str:  # keep it to one line whatever the message held
        return " ".join(super().__str__().split())


class ModelLoadError(NolnError):
    """A model could not be loaded (base class of the specific cases)."""


class UnknownModelError(ModelLoadError):
    """The repo id or revision does not exist (or is private/gated)."""


class OfflineError(ModelLoadError):
    """No network and nothing cached for this model."""


class NotGPT2Error(ModelLoadError):
    """The checkpoint is not a GPT-2-architecture model."""


class CorruptCheckpointError(ModelLoadError):
    """Files are missing, truncated or inconsistent."""


class UnsafeCheckpointError(ModelLoadError):
    """The weights file holds executable (pickled) objects besides tensors: refused, never run."""


class InputError(NolnError):
    """Bad user input to an analysis (empty text, unknown token, bad position)."""


class TokenizerMismatchError(InputError):
    """The models being compared do not tokenise the text identically."""

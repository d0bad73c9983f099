"""Exceptions sac_rag raises. Each message says what to do about it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class SACError(Exception):
    """Base class of every error sac_rag raises on purpose."""


class InvalidInputError(SACError, ValueError):
    """An argument has the wrong type or value (empty text, ratio out of range, ...)."""


class FingerprintMismatchError(SACError):
    """Compressed data or a checkpoint was made by another model or compressor than the one in use.

    Mixing them would produce fluent but wrong answers, so it is refused. Both fingerprints are
    named in the message and kept as attributes.
    """

    def __init__(self, what: str, expected: str, found: str, advice: str, against: str = "the model in use"):
        self.expected = expected
        self.found = found
        super().__init__(f"{what} was built for {found!r}, but {against} is {expected!r}. {advice}")


class ModelNotAvailableError(SACError):
    """A model name could not be resolved to weights on this machine."""


class UnsupportedModelError(SACError):
    """The base model's architecture lacks something SAC needs (e.g. static RoPE)."""


class CheckpointError(SACError):
    """A compressor checkpoint directory is missing files or is corrupt."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (e.g. a full disk); one already there is left as it was."""


class PromptError(InvalidInputError):
    """A prompt cannot be decoded as given (e.g. it ends with a compressed context)."""


class PromptTooLongError(PromptError):
    """A prompt needs more positions than the model has: its text, the tokens its compressed
    contexts stand for (they keep their positions), and at least one for the answer."""


def exit_with_message(main: Callable[[], int]) -> NoReturn:
    """Run a command-line ``main`` and exit with its status; a SACError (input the user can fix,
    e.g. a prediction file that lacks questions) exits with its one-line message, no traceback."""
    try:
        sys.exit(main())
    except SACError as err:
        sys.exit(f"error: {err}")

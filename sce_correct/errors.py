"""The one error hierarchy for users' mistakes, shared by every layer of the product.

An `SceError` is something a user caused and can fix (a bad file, an option out of range, a
collection that does not exist): its message is one line that names the problem, and the
command line and the web UI show it as it is. Any other exception is a bug: the command line
says so in one line and shows the traceback with ``--debug``.

The subclasses also derive from the built-in exception a caller would expect (a bad value is a
``ValueError``, a missing thing a ``LookupError``), so ``except ValueError`` keeps working.
This module lives in the lowest layer (``sce_correct``) so that every layer can raise them.
"""
from __future__ import annotations


class SceError(Exception):
    """A user's mistake or a condition the user can fix; the message is one line."""


class InputError(SceError, ValueError):
    """Bad input: a malformed file, an option out of range, data that cannot be used."""


class NotFoundError(SceError, LookupError):
    """Something the user named does not exist (a collection, a correction, a file, a field)."""

    def __str__(self) -> str:  # KeyError-style quoting would wrap the message in quotes
        return str(self.args[0]) if self.args else type(self).__name__


class ConflictError(SceError, RuntimeError):
    """The request clashes with the state of the collection (busy, wrong encoder, stale job)."""


class MissingDependencyError(SceError, ImportError):
    """A package or model file the requested feature needs is not installed; the message names it."""


__all__ = ["SceError", "InputError", "NotFoundError", "ConflictError", "MissingDependencyError"]

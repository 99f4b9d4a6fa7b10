"""The web UI's error boundary: what the page shows when an action fails.

A user's mistake (the `sce_correct.errors` hierarchy: `SceError` and its subclasses) or an
operating-system error about the user's files (`OSError`: a missing or unreadable file, a
full disk) reaches the page as its one-line message. Anything else is a bug: the page says so
in one line and the server log gets the traceback. No traceback ever reaches the page.

Only the app's tab modules import this module (when the app is built), so importing gradio
here does not slow the command line.
"""
from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from sce_correct.errors import SceError

logger = logging.getLogger(__name__)

#: Failures a user can cause and fix: their message is shown as it is.
USER_ERRORS = (SceError, OSError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without its quotes)."""
    if isinstance(error, KeyError) and error.args and type(error).__str__ is KeyError.__str__:
        text = str(error.args[0])
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


def page_message(error: BaseException) -> str:
    """What the page shows for ``error`` (HTML-escaped: Gradio renders it as HTML)."""
    if isinstance(error, USER_ERRORS):
        text = one_line(error)
    else:
        text = (f"Unexpected error ({type(error).__name__}: {one_line(error)}). This is a bug; "
                "the server log has the traceback.")
    return html.escape(text, quote=False)


def user_errors(fn: Callable) -> Callable:
    """Wrap an action so that every failure reaches the page as a one-line ``gr.Error``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as error:
            logger.info("%s refused: %s", fn.__name__, one_line(error))
            raise gr.Error(page_message(error), print_exception=False) from None
        except Exception as error:  # the UI boundary: anything else is a bug, logged in full
            logger.exception("%s failed (a bug)", fn.__name__)
            raise gr.Error(page_message(error), print_exception=False) from None

    return wrapper


def bind(actions: object, names: Sequence[str]) -> dict[str, Callable]:
    """The actions' methods by name, each wrapped by :func:`user_errors`."""
    return {name: user_errors(getattr(actions, name)) for name in names}

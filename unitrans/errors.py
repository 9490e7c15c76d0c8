"""Exceptions for mistakes a user can act on.

The command line catches :class:`UserError` (and its subclasses, such as :class:`unitrans.spec.SpecError`) and
prints its message without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a bad spec, a missing file, a mismatch between components).

    The message must say what was received, what is allowed and, where known, how to fix it.
    """


class DataError(UserError):
    """A data file is missing, unreadable or malformed; the message names the file (and the entry)."""

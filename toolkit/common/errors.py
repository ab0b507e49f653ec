"""The one base class for errors a user can fix (bad input, missing files, wrong options).

Every such error in the library subclasses :class:`UserError` (keeping its older base too,
e.g. ``class BundleError(UserError, ValueError)``, so callers that catch ``ValueError`` still
work). The command line catches this one class and prints its message as one line with exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the CLI prints its message as one line and exits with 2."""

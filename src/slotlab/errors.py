"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (unknown preset, bad override, missing or corrupt file).
The CLI prints it as one line ``error: <message>`` and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the offending thing."""

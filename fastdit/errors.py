"""Errors that a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """A bad argument, file or setting, with a message that names the value and the fix."""


class DownloadError(UserError):
    """A file could not be downloaded (offline, HTTP error, interrupted transfer)."""

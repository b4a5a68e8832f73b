"""The one error a user's mistake raises: launch/ prints it as one ``pst-ds: error:`` line."""


class ConfigError(Exception):
    """A user-facing configuration problem; the message is the whole explanation."""

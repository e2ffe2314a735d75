"""Errors caused by the user's input: the CLI prints them as one clear message, no traceback."""


class UserError(Exception):
    """Bad input (config, file, URL list, checkpoint...): the message says what and where."""

"""The error of bad input (a config, URL list, checkpoint or damaged file): the command line prints
it as one line naming what is wrong and where, and exits with status 2, never a traceback.

It lives here, in the lowest layer, because the contracts raise it too; ``pipeline.errors``
re-exports it for the rest of the code."""


class UserError(Exception):
    """Bad input (config, file, URL list, checkpoint...): the message says what and where."""
